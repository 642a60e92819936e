"""Type-check a parsed slice against a dataset version and compile it three ways.

1. ``evaluate(table)``: the exact predicate over an Arrow table of manifest rows (vectorised
   pyarrow compute). It defines the semantics; the other two only ever prune.
2. ``file_may_match(stats)``: interval reasoning over one data file's min/max/null-count
   statistics from the Delta log, so whole files are skipped without being opened.
3. ``pushdown``: a pyarrow dataset expression over the numeric columns, handed to the Parquet
   scan so row groups are skipped by their statistics. It is a relaxation of the query (every
   matching row passes it), so applying ``evaluate`` afterwards stays exact.

Semantics: a label an item does not have counts 0. A missing attribute, or a null file field,
equals nothing: ``=`` and ``in`` are false for it, ``!=`` and ``not in`` true. Text fields allow
only ``=``, ``!=``, ``in`` and ``not in``; numeric fields allow every comparison;
``file.ingested_at`` compares with an ISO-8601 time string.
"""

from __future__ import annotations

import difflib
import operator
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from orchestrator.errors import QueryError
from orchestrator.manifest import FileStats, label_field
from orchestrator.query.parse import (
    And,
    Compare,
    Field,
    HasTag,
    InList,
    Literal,
    Node,
    Not,
    Or,
    caret_message,
    parse,
)

#: ``file.<name>`` fields and their query types.
FILE_FIELDS: dict[str, str] = {
    "width": "int", "height": "int", "size_bytes": "int",
    "media_type": "text", "source_name": "text", "item_id": "text",
    "ingested_at": "time",
}
TEXT_OPS = ("=", "!=")
_PY_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq, "!=": operator.ne, ">": operator.gt,
    ">=": operator.ge, "<": operator.lt, "<=": operator.le,
}
_PC_OPS = {"=": pc.equal, "!=": pc.not_equal, ">": pc.greater,
           ">=": pc.greater_equal, "<": pc.less, "<=": pc.less_equal}


class QueryTypeError(QueryError):
    """The query parses but does not fit the dataset (unknown label, wrong value type)."""


@dataclass(frozen=True)
class QueryContext:
    """What a query may refer to: the labels of one dataset version, minus the attributes the
    reader's role hides (a query on a hidden field could reveal its values)."""

    labels: tuple[str, ...]
    hidden_attributes: frozenset[str] = frozenset()
    # Labels a later version of the dataset knows and this one does not: each counts 0 here, so
    # one query runs on every version (``labels.truck >= 1`` on a version before any truck).
    absent_labels: frozenset[str] = frozenset()


@dataclass(frozen=True)
class CompiledQuery:
    text: str
    ast: Node
    absent_labels: frozenset[str] = frozenset()  # see QueryContext: 0 in every row, never pushed down

    @property
    def columns(self) -> list[str]:
        """Manifest columns the predicate reads (always includes ``item_id``)."""
        cols = {"item_id"}
        for leaf in _leaves(self.ast):
            cols.add(_column(leaf.field) if not isinstance(leaf, HasTag) else "tags")
        return sorted(cols)

    def evaluate(self, table: pa.Table) -> pa.BooleanArray:
        """Exact mask over manifest rows (label counts already null-filled to 0)."""
        if table.num_rows == 0:
            return pa.array([], pa.bool_())
        return _eval(self.ast, table)

    def file_may_match(self, stats: FileStats) -> bool:
        """False only when no row of the file can match, judged from its statistics."""
        return _may_must(self.ast, stats)[0]

    @property
    def pushdown(self) -> pads.Expression | None:
        return _pushdown(self.ast, self.absent_labels)


def compile_query(text: str, context: QueryContext) -> CompiledQuery:
    """Parse and type-check ``text``; raises ``QueryError`` (with a caret) before any read."""
    ast = parse(text)
    for leaf in _leaves(ast):
        _check(leaf, text, context)
    return CompiledQuery(text, ast, context.absent_labels)


def named_fields(text: str, namespace: str) -> list[Field]:
    """The fields of ``namespace`` (``labels``, ``attributes``, ...) a query refers to, with
    their positions; raises ``QuerySyntaxError``."""
    return [leaf.field for leaf in _leaves(parse(text))
            if not isinstance(leaf, HasTag) and leaf.field.namespace == namespace]


def named_labels(text: str) -> set[str]:
    """The label names a query refers to (``labels.<name>``); raises ``QuerySyntaxError``."""
    return {f.name for f in named_fields(text, "labels")}


def unknown_attribute_error(text: str, field: Field, keys: list[str]) -> QueryTypeError:
    """``attributes.<key>`` that no item of the version has: an error with the likely key,
    rather than a slice that silently matches nothing."""
    return QueryTypeError(caret_message(text, field.pos, f"no item of this version has the attribute {field.name!r}")
                          + _suggest(field.name, tuple(keys), "attribute keys"))


def combine(queries: list[str]) -> str:
    """One query meaning all of ``queries`` (chained slices)."""
    return queries[0] if len(queries) == 1 else " and ".join(f"({q})" for q in queries)


# -- type checking ------------------------------------------------------------------------------
def _leaves(node: Node):
    if isinstance(node, (And, Or)):
        for o in node.operands:
            yield from _leaves(o)
    elif isinstance(node, Not):
        yield from _leaves(node.operand)
    else:
        yield node


def _field_type(field: Field, text: str, context: QueryContext) -> str:
    if field.namespace == "labels":
        if field.name not in context.labels and field.name not in context.absent_labels:
            known = (*context.labels, *sorted(context.absent_labels))
            raise QueryTypeError(
                caret_message(text, field.pos, f"unknown label {field.name!r}")
                + _suggest(field.name, known, "labels")
            )
        return "int"
    if field.namespace == "file":
        if field.name not in FILE_FIELDS:
            raise QueryTypeError(
                caret_message(text, field.pos, f"unknown file field {field.name!r}")
                + _suggest(field.name, tuple(FILE_FIELDS), "file fields")
            )
        return FILE_FIELDS[field.name]
    if field.namespace == "attributes":
        if field.name in context.hidden_attributes:
            raise QueryTypeError(caret_message(
                text, field.pos, f"{field} is hidden from you by the store's access policy"))
        return "text"
    raise QueryTypeError(
        caret_message(text, field.pos, "tags is a list: test membership with 'value' in tags")
    )


def _suggest(name: str, known: tuple[str, ...], what: str) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"\n  did you mean {close[0]!r}?" if close else ""
    listed = ", ".join(repr(k) for k in known) if known else "(none)"
    return f"{hint}\n  known {what}: {listed}"


def _check(leaf: Node, text: str, context: QueryContext) -> None:
    if isinstance(leaf, HasTag):
        return
    kind = _field_type(leaf.field, text, context)
    values = (leaf.value,) if isinstance(leaf, Compare) else leaf.values
    if isinstance(leaf, Compare) and kind == "text" and leaf.op not in TEXT_OPS:
        raise QueryTypeError(
            caret_message(text, leaf.pos, f"{leaf.field} is text: '{leaf.op}' needs a number field")
            + "\n  text fields allow =, !=, in and not in"
        )
    for v in values:
        if kind == "int" and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise QueryTypeError(
                caret_message(text, leaf.pos, f"{leaf.field} is a number, compared with {v!r}")
                + "\n  compare it with a number, e.g. labels.car > 3"
            )
        if kind == "text" and not isinstance(v, (str, bool)):
            raise QueryTypeError(
                caret_message(text, leaf.pos, f"{leaf.field} is text, compared with the number {v!r}")
                + f"\n  quote the value: {leaf.field} = '{v}'"
            )
        if kind == "time":
            if not isinstance(v, str):
                raise QueryTypeError(
                    caret_message(text, leaf.pos, f"{leaf.field} is a time: compare it with an ISO date")
                    + "\n  e.g. file.ingested_at >= '2026-01-31'"
                )
            try:
                _as_time(v)
            except ValueError:
                raise QueryTypeError(
                    caret_message(text, leaf.pos, f"{v!r} is not an ISO-8601 date or time")
                ) from None


def _as_time(value: str) -> datetime:
    t = datetime.fromisoformat(value)
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _coerce(field: Field, value: Literal) -> Any:
    kind = "text" if field.namespace == "attributes" else FILE_FIELDS.get(field.name, "int")
    if field.namespace == "labels":
        kind = "int"
    if kind == "text" and isinstance(value, bool):
        return "true" if value else "false"  # JSON booleans are stored as 'true'/'false'
    if kind == "time":
        return _as_time(value)  # type: ignore[arg-type]
    return value


def _column(field: Field) -> str:
    return field.name if field.namespace == "file" else field.namespace


# -- exact evaluation -------------------------------------------------------------------------
def _values(field: Field, table: pa.Table) -> pa.Array:
    if field.namespace == "labels":
        labels = table.column("labels").combine_chunks()
        if labels.type.get_field_index(label_field(field.name)) < 0:  # a label of a later version
            return pa.array(np.zeros(len(labels), np.int32))
        return pc.fill_null(pc.struct_field(labels, label_field(field.name)), 0)
    if field.namespace == "attributes":
        return pc.map_lookup(table.column("attributes").combine_chunks(), field.name, "first")
    return table.column(field.name).combine_chunks()


def _eval(node: Node, table: pa.Table) -> pa.BooleanArray:
    if isinstance(node, And):
        out = _eval(node.operands[0], table)
        for o in node.operands[1:]:
            out = pc.and_(out, _eval(o, table))
        return out
    if isinstance(node, Or):
        out = _eval(node.operands[0], table)
        for o in node.operands[1:]:
            out = pc.or_(out, _eval(o, table))
        return out
    if isinstance(node, Not):
        return pc.invert(_eval(node.operand, table))
    if isinstance(node, HasTag):
        tags = table.column("tags").combine_chunks()
        flat = pc.list_flatten(tags)
        parents = pc.list_parent_indices(tags)
        hit = np.zeros(len(table), dtype=bool)
        hit[parents.filter(pc.equal(flat, node.tag)).to_numpy(zero_copy_only=False)] = True
        mask = pa.array(hit)
        return pc.invert(mask) if node.negated else mask
    values = _values(node.field, table)
    literals = [_coerce(node.field, v) for v in
                (node.values if isinstance(node, InList) else (node.value,))]
    if pa.types.is_integer(values.type):
        values, literals = _numeric(values, literals)
    if isinstance(node, InList):
        mask = pc.fill_null(pc.is_in(values, value_set=pa.array(literals, type=values.type)), False)
        return pc.invert(mask) if node.negated else mask
    result = _PC_OPS[node.op](values, pa.scalar(literals[0], type=values.type))
    # null (missing attribute / field) equals nothing: only != holds for it
    return pc.fill_null(result, node.op == "!=")


def _numeric(values: pa.Array, literals: list) -> tuple[pa.Array, list]:
    """Compare integers exactly in int64 unless a literal needs float64."""
    if all(isinstance(v, int) and -(2**63) <= v < 2**63 for v in literals):
        return pc.cast(values, pa.int64()), literals
    return pc.cast(values, pa.float64()), [float(v) for v in literals]


# -- file pruning from Delta statistics ---------------------------------------------------------
_UNKNOWN = (True, False)


def _domain(field: Field, stats: FileStats):
    """(lo, hi, has_values, null_point) for a numeric leaf, or None when unknown."""
    if field.namespace == "labels":
        key = f"labels.{label_field(field.name)}"
    elif field.namespace == "file" and FILE_FIELDS.get(field.name) == "int":
        key = field.name
    else:
        return None
    col = stats.columns.get(key)
    if col is None or col.null_count is None:
        return None
    has_values = col.null_count < stats.num_records and col.min is not None and col.max is not None
    if not has_values and col.null_count < stats.num_records:
        return None
    null_point = 0 if field.namespace == "labels" else None  # labels: null reads as 0
    return col.min, col.max, has_values, (null_point if col.null_count > 0 else "absent")


def _interval(op: str, lo: Any, hi: Any, v: Any) -> tuple[bool, bool]:
    """(some value in [lo, hi] satisfies, every value does) for ``x op v``."""
    if op == "=":
        return lo <= v <= hi, lo == hi == v
    if op == "!=":
        return not (lo == hi == v), not (lo <= v <= hi)
    if op == ">":
        return hi > v, lo > v
    if op == ">=":
        return hi >= v, lo >= v
    if op == "<":
        return lo < v, hi < v
    return lo <= v, hi <= v  # "<="


def _compare_may_must(op: str, v: Any, domain) -> tuple[bool, bool]:
    lo, hi, has_values, null_point = domain
    parts = []
    if has_values:
        parts.append(_interval(op, lo, hi, v))
    if null_point != "absent":
        sat = (op == "!=") if null_point is None else _PY_OPS[op](null_point, v)
        parts.append((sat, sat))
    if not parts:
        return (False, True)  # an empty file
    return any(p[0] for p in parts), all(p[1] for p in parts)


def _may_must(node: Node, stats: FileStats) -> tuple[bool, bool]:
    if isinstance(node, And):
        parts = [_may_must(o, stats) for o in node.operands]
        return all(p[0] for p in parts), all(p[1] for p in parts)
    if isinstance(node, Or):
        parts = [_may_must(o, stats) for o in node.operands]
        return any(p[0] for p in parts), any(p[1] for p in parts)
    if isinstance(node, Not):
        may, must = _may_must(node.operand, stats)
        return not must, not may
    if isinstance(node, HasTag):
        return _UNKNOWN
    domain = _domain(node.field, stats)
    if domain is None:
        return _UNKNOWN
    if isinstance(node, Compare):
        return _compare_may_must(node.op, node.value, domain)
    eq = [_compare_may_must("=", v, domain) for v in node.values]
    lo, hi, has_values, null_point = domain
    single = (not has_values or lo == hi)
    may_in = any(e[0] for e in eq)
    must_in = single and any(e[1] for e in eq)
    return (not must_in, not may_in) if node.negated else (may_in, must_in)


# -- row-group pushdown -------------------------------------------------------------------------
def _pushdown(node: Node, absent: frozenset[str] = frozenset()) -> pads.Expression | None:
    """A relaxation over numeric columns, or None (no pruning) where none is sound. A label in
    ``absent`` has no column in the files: its leaves are evaluated after the read."""
    if isinstance(node, And):
        parts = [p for p in (_pushdown(o, absent) for o in node.operands) if p is not None]
        if not parts:
            return None
        out = parts[0]
        for p in parts[1:]:
            out = out & p
        return out
    if isinstance(node, Or):
        parts = [_pushdown(o, absent) for o in node.operands]
        if any(p is None for p in parts):
            return None
        out = parts[0]
        for p in parts[1:]:
            out = out | p
        return out
    if isinstance(node, Compare) and not (node.field.namespace == "labels" and node.field.name in absent):
        return _numeric_leaf(node)
    return None  # Not, lists, tags, text: evaluated exactly after the read


def _numeric_leaf(node: Compare) -> pads.Expression | None:
    field = node.field
    if field.namespace == "labels":
        ref = pads.field("labels", label_field(field.name))
        null_matches = _PY_OPS[node.op](0, node.value)
    elif field.namespace == "file" and FILE_FIELDS.get(field.name) == "int":
        ref = pads.field(field.name)
        null_matches = node.op == "!="
    else:
        return None
    cmp = {"=": ref == node.value, "!=": ref != node.value, ">": ref > node.value,
           ">=": ref >= node.value, "<": ref < node.value, "<=": ref <= node.value}[node.op]
    return (cmp | ref.is_null()) if null_matches else cmp
