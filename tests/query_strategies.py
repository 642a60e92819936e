"""Hypothesis strategies for slice queries and manifests, and a plain-Python reference evaluator.

The reference is written from the documented semantics, independently of the compiler: it walks
row dicts one at a time with ordinary Python comparisons.
"""

from __future__ import annotations

import operator
from datetime import UTC, datetime, timedelta

from hypothesis import strategies as st

from orchestrator.manifest import label_field
from orchestrator.query.parse import And, Compare, Field, HasTag, InList, Not, Or

LABELS = ("car", "pedestrian", "traffic light", "Bike")
ATTR_KEYS = ("weather", "time of day", "camera")
ATTR_VALUES = ("rain", "sun", "night", "day", "true", "it's")
TAGS = ("night", "blurry", "review", "o'clock")
MEDIA = ("image/jpeg", "image/png")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
TIMES = tuple((T0 + timedelta(days=d)).isoformat() for d in range(0, 5))
NUM_FILE_FIELDS = ("width", "height", "size_bytes")
OPS = ("=", "!=", ">", ">=", "<", "<=")

small_int = st.integers(-2, 9)


def _compare() -> st.SearchStrategy:
    label = st.builds(lambda n, op, v: Compare(Field("labels", n, 0), op, v, 0),
                      st.sampled_from(LABELS), st.sampled_from(OPS),
                      st.one_of(small_int, st.floats(-1, 9, allow_nan=False).map(lambda f: round(f, 1))))
    num = st.builds(lambda n, op, v: Compare(Field("file", n, 0), op, v, 0),
                    st.sampled_from(NUM_FILE_FIELDS), st.sampled_from(OPS), st.integers(0, 700))
    text = st.builds(lambda n, op, v: Compare(Field("file", n, 0), op, v, 0),
                     st.sampled_from(("media_type", "item_id", "source_name")),
                     st.sampled_from(("=", "!=")),
                     st.sampled_from(MEDIA + ("i3", "i0", "i7.jpg", "nope")))
    attr = st.builds(lambda k, op, v: Compare(Field("attributes", k, 0), op, v, 0),
                     st.sampled_from(ATTR_KEYS), st.sampled_from(("=", "!=")),
                     st.one_of(st.sampled_from(ATTR_VALUES), st.booleans()))
    time = st.builds(lambda op, v: Compare(Field("file", "ingested_at", 0), op, v, 0),
                     st.sampled_from(OPS), st.sampled_from(TIMES))
    return st.one_of(label, num, text, attr, time)


def _in_list() -> st.SearchStrategy:
    label = st.builds(lambda n, vs, neg: InList(Field("labels", n, 0), tuple(vs), neg, 0),
                      st.sampled_from(LABELS), st.lists(small_int, min_size=1, max_size=4), st.booleans())
    attr = st.builds(lambda k, vs, neg: InList(Field("attributes", k, 0), tuple(vs), neg, 0),
                     st.sampled_from(ATTR_KEYS), st.lists(st.sampled_from(ATTR_VALUES), min_size=1, max_size=3),
                     st.booleans())
    media = st.builds(lambda vs, neg: InList(Field("file", "media_type", 0), tuple(vs), neg, 0),
                      st.lists(st.sampled_from(MEDIA), min_size=1, max_size=2), st.booleans())
    width = st.builds(lambda vs, neg: InList(Field("file", "width", 0), tuple(vs), neg, 0),
                      st.lists(st.integers(0, 700), min_size=1, max_size=3), st.booleans())
    return st.one_of(label, attr, media, width)


def _leaf() -> st.SearchStrategy:
    tag = st.builds(lambda t, neg: HasTag(t, neg, 0), st.sampled_from(TAGS), st.booleans())
    return st.one_of(_compare(), _compare(), _in_list(), tag)


def queries() -> st.SearchStrategy:
    """Random ASTs over every operator and field kind."""
    return st.recursive(
        _leaf(),
        lambda children: st.one_of(
            st.builds(lambda c: Not(c, 0), children),
            st.builds(lambda cs: And(tuple(cs), 0), st.lists(children, min_size=2, max_size=3)),
            st.builds(lambda cs: Or(tuple(cs), 0), st.lists(children, min_size=2, max_size=3)),
        ),
        max_leaves=8,
    )


@st.composite
def manifest_rows(draw, min_size: int = 0, max_size: int = 30) -> list[dict]:
    """Rows with the manifest's columns; some rows lack some label fields (null counts)."""
    n = draw(st.integers(min_size, max_size))
    rows = []
    for i in range(n):
        labels = {}
        for name in LABELS:
            labels[label_field(name)] = draw(st.one_of(st.none(), st.integers(0, 8)))
        attrs = draw(st.dictionaries(st.sampled_from(ATTR_KEYS), st.sampled_from(ATTR_VALUES), max_size=3))
        rows.append({
            "item_id": f"i{i}",
            "blob": "0" * 64,
            "media_type": draw(st.sampled_from(MEDIA)),
            "width": draw(st.integers(1, 700)),
            "height": draw(st.integers(1, 700)),
            "size_bytes": draw(st.integers(1, 700)),
            "source_name": f"i{i}.jpg",
            "instances": [],
            "labels": labels,
            "attributes": attrs,
            "tags": draw(st.lists(st.sampled_from(TAGS), max_size=3)),
            "ingested_at": T0 + timedelta(hours=draw(st.integers(0, 24 * 5))),
        })
    return rows


# -- the reference ----------------------------------------------------------------------------
_OPS = {"=": operator.eq, "!=": operator.ne, ">": operator.gt,
        ">=": operator.ge, "<": operator.lt, "<=": operator.le}


def _value(row: dict, field: Field):
    if field.namespace == "labels":
        return row["labels"].get(label_field(field.name)) or 0
    if field.namespace == "attributes":
        return dict(row["attributes"]).get(field.name)
    return row[field.name]


def _lit(field: Field, v):
    if field.namespace == "attributes" and isinstance(v, bool):
        return "true" if v else "false"
    if field.namespace == "file" and field.name == "ingested_at":
        return datetime.fromisoformat(v)
    return v


def reference(node, row: dict) -> bool:
    if isinstance(node, And):
        return all(reference(o, row) for o in node.operands)
    if isinstance(node, Or):
        return any(reference(o, row) for o in node.operands)
    if isinstance(node, Not):
        return not reference(node.operand, row)
    if isinstance(node, HasTag):
        return (node.tag in row["tags"]) != node.negated
    value = _value(row, node.field)
    if isinstance(node, InList):
        hit = value is not None and any(value == _lit(node.field, v) for v in node.values)
        return hit != node.negated
    if value is None:
        return node.op == "!="
    return _OPS[node.op](value, _lit(node.field, node.value))
