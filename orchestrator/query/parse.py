"""Slice query text → a small typed AST, with the position of every node for error carets.

Grammar (keywords case-insensitive; ``not`` binds tighter than ``and``, ``and`` than ``or``)::

    query   := or
    or      := and ("or" and)*
    and     := unary ("and" unary)*
    unary   := "not" unary | "(" or ")" | compare
    compare := field OP literal
             | field ["not"] "in" "[" literal ("," literal)* "]"
             | literal ["not"] "in" "tags"
    field   := "labels." name | "file." name | "attributes." name | "tags"
    name    := identifier | quoted string          (labels."traffic light")
    OP      := "=" | "==" | "!=" | ">" | ">=" | "<" | "<="
    literal := integer | float | 'string' | "string" | true | false

The text is only ever parsed, never evaluated: there is no path from a query to Python code.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from orchestrator.errors import QueryError

MAX_QUERY_CHARS = 10_000
MAX_DEPTH = 64
NAMESPACES = ("labels", "file", "attributes")
Literal = int | float | str | bool


class QuerySyntaxError(QueryError):
    """The text does not parse; the message shows the query with a caret."""


_SURROGATE = re.compile("[\ud800-\udfff]")


def caret_message(query: str, pos: int, problem: str) -> str:
    """``problem`` followed by the (one-line) query and a caret under ``pos``."""
    shown = _SURROGATE.sub("\ufffd", query.replace("\n", " ").replace("\t", " "))  # printable
    start = max(0, pos - 60)
    snippet = shown[start : start + 120]
    prefix = "…" if start else ""
    return f"{problem} at position {pos}:\n    {prefix}{snippet}\n    {' ' * (len(prefix) + pos - start)}^"


# -- AST --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Field:
    namespace: str  # "labels" | "file" | "attributes" | "tags"
    name: str  # "" for tags
    pos: int

    def __str__(self) -> str:
        if self.namespace == "tags":
            return "tags"
        plain = re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name)
        return f"{self.namespace}.{self.name if plain else _quote(self.name)}"


@dataclass(frozen=True)
class Compare:
    field: Field
    op: str  # one of = != > >= < <= ("==" normalised to "=")
    value: Literal
    pos: int


@dataclass(frozen=True)
class InList:
    field: Field
    values: tuple[Literal, ...]
    negated: bool
    pos: int


@dataclass(frozen=True)
class HasTag:
    tag: str
    negated: bool
    pos: int


@dataclass(frozen=True)
class Not:
    operand: Node
    pos: int


@dataclass(frozen=True)
class And:
    operands: tuple[Node, ...]
    pos: int


@dataclass(frozen=True)
class Or:
    operands: tuple[Node, ...]
    pos: int


Node = Compare | InList | HasTag | Not | And | Or


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def to_text(node: Node) -> str:
    """Canonical text of an AST (parse(to_text(n)) == n up to positions)."""
    if isinstance(node, Compare):
        return f"{node.field} {node.op} {_lit(node.value)}"
    if isinstance(node, InList):
        return f"{node.field} {'not in' if node.negated else 'in'} [{', '.join(_lit(v) for v in node.values)}]"
    if isinstance(node, HasTag):
        return f"{_quote(node.tag)} {'not in' if node.negated else 'in'} tags"
    if isinstance(node, Not):
        return f"not ({to_text(node.operand)})"
    joiner = " and " if isinstance(node, And) else " or "
    return "(" + joiner.join(to_text(o) for o in node.operands) + ")"


def _lit(value: Literal) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _quote(value)
    return repr(value)


# -- tokens -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Token:
    kind: str  # ident, string, number, op, punct, end
    text: str
    value: Literal | None
    pos: int


_TOKEN = re.compile(
    r"""(?P<ws>\s+)
      | (?P<number>[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)
      | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<op>==|!=|>=|<=|=|>|<)
      | (?P<punct>[()\[\],.])
      | (?P<quote>['"])
    """,
    re.VERBOSE,
)
_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "t": "\t", "r": "\r", "0": "\0"}


def tokenize(query: str) -> list[Token]:
    tokens: list[Token] = []
    pos = 0
    while pos < len(query):
        m = _TOKEN.match(query, pos)
        if m is None:
            raise QuerySyntaxError(caret_message(query, pos, f"unexpected character {query[pos]!r}"))
        kind = m.lastgroup
        if kind == "ws":
            pos = m.end()
            continue
        if kind == "quote":
            text, end = _read_string(query, pos)
            tokens.append(Token("string", query[pos:end], text, pos))
            pos = end
            continue
        text = m.group()
        value: Literal | None = None
        if kind == "number":
            value = float(text) if any(c in text for c in ".eE") else int(text)
        tokens.append(Token(kind, text, value, pos))
        pos = m.end()
    tokens.append(Token("end", "", None, len(query)))
    return tokens


def _read_string(query: str, start: int) -> tuple[str, int]:
    quote = query[start]
    out: list[str] = []
    i = start + 1
    while i < len(query):
        c = query[i]
        if c == quote:
            return "".join(out), i + 1
        if c == "\\":
            if i + 1 >= len(query):
                break
            e = query[i + 1]
            if e in _ESCAPES:
                out.append(_ESCAPES[e])
                i += 2
                continue
            if e == "u":
                code, i = _read_unicode_escape(query, i)
                out.append(chr(code))
                continue
            raise QuerySyntaxError(
                caret_message(query, i, f"bad escape \\{e} (use \\\\ \\' \\\" \\n \\t \\r \\0 or \\u and 4 hex digits)")
            )
        out.append(c)
        i += 1
    raise QuerySyntaxError(caret_message(query, start, f"unterminated string (missing closing {quote})"))


def _hex4(query: str, pos: int) -> int | None:
    digits = query[pos : pos + 4]
    if len(digits) == 4 and all(d in "0123456789abcdefABCDEF" for d in digits):
        return int(digits, 16)
    return None


def _read_unicode_escape(query: str, start: int) -> tuple[int, int]:
    """The code point of a ``\\u`` escape (four hex digits) at ``start`` (a UTF-16 surrogate pair written as two
    escapes, ``\\ud83d\\ude00``, is one character) and the position after it. A lone surrogate
    is no character: no item id or label can contain one, and Arrow cannot encode it."""
    code = _hex4(query, start + 2)
    if code is None:
        raise QuerySyntaxError(caret_message(query, start, "bad escape: \\u needs 4 hex digits"))
    end = start + 6
    if 0xD800 <= code <= 0xDBFF and query[end : end + 2] == "\\u":
        low = _hex4(query, end + 2)
        if low is not None and 0xDC00 <= low <= 0xDFFF:
            return 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00), end + 6
    if 0xD800 <= code <= 0xDFFF:
        raise QuerySyntaxError(caret_message(
            query, start, f"\\u{code:04x} is half of a UTF-16 surrogate pair, not a character "
            "(write the character itself, or both halves: \\ud83d\\ude00)"))
    return code, end


def _check_unicode(query: str) -> None:
    """Text that is not valid Unicode (a lone surrogate, e.g. from undecodable bytes) fails
    here with a caret, rather than deep inside Arrow when the string is encoded."""
    m = _SURROGATE.search(query)
    if m is not None:
        raise QuerySyntaxError(caret_message(
            query, m.start(), f"character U+{ord(m.group()):04X} is a lone UTF-16 surrogate, "
            "not valid Unicode (was the query decoded with the wrong encoding?)"))


# -- parser -----------------------------------------------------------------------------------
class _Parser:
    def __init__(self, query: str) -> None:
        self.query = query
        self.tokens = tokenize(query)
        self.i = 0
        self.depth = 0

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def fail(self, expected: str, tok: Token | None = None) -> QuerySyntaxError:
        tok = tok or self.tok
        got = "end of query" if tok.kind == "end" else repr(tok.text)
        return QuerySyntaxError(caret_message(self.query, tok.pos, f"expected {expected}, got {got}"))

    def _namespace_typo(self, tok: Token) -> QuerySyntaxError:
        """A field's namespace misspelt (``lables.car``): the error names the likely field."""
        error = self.fail("a field: labels.<name>, file.<field>, attributes.<key> or tags")
        close = difflib.get_close_matches(tok.text.lower(), (*NAMESPACES, "tags"), n=1, cutoff=0.6)
        if not close:
            return error
        after = self.tokens[self.i + 1: self.i + 3]
        named = (len(after) == 2 and after[0].kind == "punct" and after[0].text == "."
                 and after[1].kind in ("ident", "string"))
        guess = f"{close[0]}.{after[1].text}" if named and close[0] != "tags" else close[0]
        return QuerySyntaxError(f"{error}\n  did you mean {guess}?")

    def keyword(self, *words: str) -> bool:
        return self.tok.kind == "ident" and self.tok.text.lower() in words

    def advance(self) -> Token:
        tok = self.tok
        self.i += 1
        return tok

    def expect_punct(self, text: str, what: str) -> Token:
        if self.tok.kind == "punct" and self.tok.text == text:
            return self.advance()
        raise self.fail(what)

    def parse(self) -> Node:
        if self.tok.kind == "end":
            raise self.fail("a condition such as labels.car > 3")
        node = self.parse_or()
        if self.tok.kind != "end":
            raise self.fail("'and', 'or' or the end of the query")
        return node

    def parse_or(self) -> Node:
        start = self.tok.pos
        parts = [self.parse_and()]
        while self.keyword("or"):
            self.advance()
            parts.append(self.parse_and())
        return parts[0] if len(parts) == 1 else Or(tuple(parts), start)

    def parse_and(self) -> Node:
        start = self.tok.pos
        parts = [self.parse_unary()]
        while self.keyword("and"):
            self.advance()
            parts.append(self.parse_unary())
        return parts[0] if len(parts) == 1 else And(tuple(parts), start)

    def parse_unary(self) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise QuerySyntaxError(
                caret_message(self.query, self.tok.pos, f"query nested deeper than {MAX_DEPTH} levels")
            )
        try:
            if self.keyword("not"):
                tok = self.advance()
                return Not(self.parse_unary(), tok.pos)
            if self.tok.kind == "punct" and self.tok.text == "(":
                self.advance()
                node = self.parse_or()
                self.expect_punct(")", "')' to close the parenthesis")
                return node
            return self.parse_compare()
        finally:
            self.depth -= 1

    def parse_compare(self) -> Node:
        start = self.tok
        if start.kind in ("string", "number") or self.keyword("true", "false"):
            value = self.parse_literal()
            negated = self.parse_in_keyword("'in tags'")
            if not self.keyword("tags"):
                raise self.fail("'tags' (a literal can only be tested for membership in tags)")
            self.advance()
            if not isinstance(value, str):
                raise QuerySyntaxError(
                    caret_message(self.query, start.pos, "tags are strings: quote the tag, e.g. 'night' in tags")
                )
            return HasTag(value, negated, start.pos)
        field = self.parse_field()
        if self.keyword("in", "not"):
            negated = self.parse_in_keyword("'in'")
            return InList(field, self.parse_list(), negated, start.pos)
        if self.tok.kind != "op":
            raise self.fail("a comparison (= != > >= < <=) or 'in'")
        op = self.advance().text
        return Compare(field, "=" if op == "==" else op, self.parse_literal(), start.pos)

    def parse_in_keyword(self, what: str) -> bool:
        negated = False
        if self.keyword("not"):
            self.advance()
            negated = True
        if not self.keyword("in"):
            raise self.fail(what)
        self.advance()
        return negated

    def parse_field(self) -> Field:
        tok = self.tok
        if tok.kind != "ident":
            raise self.fail("a field: labels.<name>, file.<field>, attributes.<key> or tags")
        ns = tok.text.lower()
        if ns == "tags":
            self.advance()
            return Field("tags", "", tok.pos)
        if ns not in NAMESPACES:
            raise self._namespace_typo(tok)
        self.advance()
        self.expect_punct(".", f"'.' after {tok.text!r} (e.g. {ns}.name)")
        name_tok = self.tok
        if name_tok.kind not in ("ident", "string"):
            raise self.fail(f"a {ns} name after '{tok.text}.' (quote names with spaces: {ns}.\"a b\")")
        self.advance()
        name = name_tok.value if name_tok.kind == "string" else name_tok.text
        if not name:
            raise QuerySyntaxError(caret_message(self.query, name_tok.pos, "empty name"))
        return Field(ns, str(name), tok.pos)

    def parse_list(self) -> tuple[Literal, ...]:
        self.expect_punct("[", "'[' to start a list, e.g. in ['a', 'b']")
        values = [self.parse_literal()]
        while self.tok.kind == "punct" and self.tok.text == ",":
            self.advance()
            values.append(self.parse_literal())
        self.expect_punct("]", "',' or ']' to close the list")
        return tuple(values)

    def parse_literal(self) -> Literal:
        tok = self.tok
        if tok.kind in ("string", "number"):
            self.advance()
            return tok.value  # type: ignore[return-value]
        if self.keyword("true", "false"):
            self.advance()
            return tok.text.lower() == "true"
        raise self.fail("a value: a number, a quoted string, true or false")


def parse(query: str) -> Node:
    """Parse slice text into an AST; raise ``QuerySyntaxError`` with a caret on bad input."""
    if not isinstance(query, str):
        raise QuerySyntaxError(f"a query must be text, got {type(query).__name__}")
    if len(query) > MAX_QUERY_CHARS:
        raise QuerySyntaxError(
            caret_message(query[: MAX_QUERY_CHARS + 1], MAX_QUERY_CHARS,
                          f"query longer than {MAX_QUERY_CHARS} characters")
        )
    _check_unicode(query)
    return _Parser(query).parse()
