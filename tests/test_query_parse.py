"""query.parse: grammar, precedence, quoting, and every malformed input as a QueryError."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given

from orchestrator.errors import QueryError
from orchestrator.query.parse import (
    MAX_DEPTH,
    MAX_QUERY_CHARS,
    And,
    Compare,
    Field,
    HasTag,
    InList,
    Not,
    Or,
    parse,
    to_text,
)
from tests.query_strategies import queries


def strip(node):
    """The AST without positions, for structural comparison."""
    if dataclasses.is_dataclass(node):
        values = {f.name: strip(getattr(node, f.name)) for f in dataclasses.fields(node) if f.name != "pos"}
        return (type(node).__name__, tuple(sorted(values.items())))
    if isinstance(node, tuple):
        return tuple(strip(n) for n in node)
    return node


def test_precedence_not_over_and_over_or():
    ast = parse("labels.car > 3 or labels.bus = 1 and not 'x' in tags")
    assert isinstance(ast, Or)
    left, right = ast.operands
    assert isinstance(left, Compare) and left.field == Field("labels", "car", 0)
    assert isinstance(right, And) and isinstance(right.operands[1], Not)
    assert isinstance(right.operands[1].operand, HasTag)


def test_keywords_are_case_insensitive_and_parentheses_group():
    a = parse("(LABELS.car > 3 OR labels.bus == 1) AND NOT 'night' IN Tags")
    b = parse("(labels.car > 3 or labels.bus = 1) and not 'night' in tags")
    assert strip(a) == strip(b)
    assert isinstance(a, And) and isinstance(a.operands[0], Or)


def test_quoted_names_escapes_and_literals():
    ast = parse(r'''labels."traffic light" >= 1 and attributes.'it\'s' in ['a\tb', "q\"", true, 2.5e1, -3]''')
    first, second = ast.operands
    assert first.field.name == "traffic light"
    assert isinstance(second, InList) and second.field.name == "it's"
    assert second.values == ("a\tb", 'q"', True, 25.0, -3)
    assert parse(r"attributes.x = '\u00e9'").value == "é"
    assert parse("'night' not in tags") == HasTag("night", True, 0)
    assert parse("file.width not in [1, 2]").negated


@given(queries())
def test_canonical_text_round_trips(ast):
    assert strip(parse(to_text(ast))) == strip(ast)


@pytest.mark.parametrize(
    "query, pos, needle",
    [
        ("(labels.car > 3", 15, "')'"),
        ("labels.car > 3)", 14, "end of the query"),
        ("labels.car > 3 and", 18, "a condition" if False else "a field"),
        ("labels.car >", 12, "a value"),
        ("and labels.car > 1", 0, "a field"),
        ("labels.car > > 1", 13, "a value"),
        ("labels. > 1", 8, "a labels name"),
        ("labels.car 3", 11, "a comparison"),
        ("labels.car in 3", 14, "'['"),
        ("labels.car in [1, 2", 19, "']'"),
        ("labels.car in []", 15, "a value"),
        ("attributes.x = 'abc", 15, "unterminated string"),
        (r"attributes.x = 'a\qb'", 17, r"bad escape \q"),
        (r"attributes.x = '\u12'", 16, "4 hex digits"),
        ("__import__('os').system('rm -rf /')", 0, "a field"),
        ("labels.car.__class__ > 1", 10, "a comparison"),
        ("eval('1')", 0, "a field"),
        ("labels.car > 1; import os", 14, "unexpected character ';'"),
        ("3 in tags", 0, "tags are strings"),
        ("'x' in labels", 7, "'tags'"),
        ("", 0, "a condition"),
        ("   ", 3, "a condition"),
        ("foo.bar = 1", 0, "a field"),
        ("labels.car = 1 labels.bus = 2", 15, "'and', 'or'"),
        ("not", 3, "a field"),
        ("labels.car = 'x' + 'y'", 17, "unexpected character '+'"),
    ],
)
def test_malformed_queries_raise_query_error_with_a_caret(query, pos, needle):
    with pytest.raises(QueryError) as err:
        parse(query)
    text = str(err.value)
    assert needle in text, text
    assert f"at position {pos}" in text, text
    caret_line = text.splitlines()[-1]
    assert caret_line.strip() == "^"


def test_very_long_and_deeply_nested_inputs_are_refused_quickly():
    long = " or ".join(["labels.car > 1"] * (MAX_QUERY_CHARS // 10))
    with pytest.raises(QueryError, match="longer than"):
        parse(long)
    deep = "(" * (MAX_DEPTH + 5) + "labels.car > 1" + ")" * (MAX_DEPTH + 5)
    with pytest.raises(QueryError, match="nested deeper"):
        parse(deep)
    nots = "not " * (MAX_DEPTH + 1) + "labels.car > 1"
    with pytest.raises(QueryError, match="nested deeper"):
        parse(nots)
    ok = " and ".join(["labels.car > 1"] * 200)  # long but flat is fine
    assert len(parse(ok).operands) == 200


def test_non_text_is_refused():
    with pytest.raises(QueryError, match="must be text"):
        parse(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "query, pos, needle",
    [
        (r"file.item_id = '\ud83d'", 16, "half of a UTF-16 surrogate pair"),  # escape, lone high
        (r"file.item_id = '\ude00x'", 16, "half of a UTF-16 surrogate pair"),  # escape, lone low
        (r"file.item_id = '\ud83d\u0041'", 16, "half of a UTF-16 surrogate pair"),  # not a pair
        ("file.item_id = '\ud83d'", 16, "lone UTF-16 surrogate"),  # the character itself
        ("labels.\"a\udcff\" > 1", 9, "U+DCFF"),  # undecodable argv bytes (surrogateescape)
    ],
)
def test_lone_surrogates_are_a_query_error_with_a_caret(query, pos, needle):
    with pytest.raises(QueryError) as err:
        parse(query)
    text = str(err.value)
    assert needle in text and f"at position {pos}" in text, text
    snippet, caret = text.splitlines()[-2:]
    assert caret.strip() == "^" and snippet[caret.index("^")] in "\\\ufffd"
    text.encode("utf-8")  # printable: the message itself holds no surrogate


def test_a_surrogate_pair_written_as_two_escapes_is_one_character():
    assert parse(r"file.item_id = '\ud83d\ude00.jpg'").value == "\U0001f600.jpg"
    assert parse("file.item_id = '\U0001f600'").value == "\U0001f600"
