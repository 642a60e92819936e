"""query.compile: the compiled predicate equals an independent Python evaluation on random
manifests and random queries, and file pruning / pushdown never drop a matching row."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.errors import QueryError
from orchestrator.manifest import ColumnStats, FileStats, manifest_schema
from orchestrator.query.compile import QueryContext, _may_must, compile_query
from orchestrator.query.parse import to_text
from orchestrator.scan import fill_label_counts
from tests.query_strategies import LABELS, manifest_rows, queries, reference

CONTEXT = QueryContext(LABELS)
SCHEMA = manifest_schema(list(LABELS))
PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def _file_stats(table: pa.Table) -> FileStats:
    """Statistics as the Delta log records them: min/max/null count per numeric column."""
    cols = {}
    for name in ("width", "height", "size_bytes"):
        col = table.column(name)
        mm = pc.min_max(col)
        cols[name] = ColumnStats(mm["min"].as_py(), mm["max"].as_py(), col.null_count)
    labels = table.column("labels").combine_chunks()
    for i in range(labels.type.num_fields):
        child = labels.field(i)
        mm = pc.min_max(child)
        cols[f"labels.{labels.type.field(i).name}"] = ColumnStats(
            mm["min"].as_py(), mm["max"].as_py(), child.null_count
        )
    return FileStats(table.num_rows, cols)


@PROPERTY
@given(manifest_rows(), queries())
def test_compiled_query_matches_reference(rows, ast):
    query = compile_query(to_text(ast), CONTEXT)
    table = fill_label_counts(_table(rows))
    got = table.filter(query.evaluate(table)).column("item_id").to_pylist() if rows else []
    expected = [r["item_id"] for r in rows if reference(ast, r)]
    assert got == expected


@PROPERTY
@given(st.lists(manifest_rows(min_size=1, max_size=8), min_size=1, max_size=5), queries())
def test_file_pruning_and_pushdown_never_drop_a_match(files, ast):
    query = compile_query(to_text(ast), CONTEXT)
    pushdown = query.pushdown
    for rows in files:
        table = _table(rows)
        matches = {r["item_id"] for r in rows if reference(ast, r)}
        if not query.file_may_match(_file_stats(table)):
            assert not matches, "a file with matching rows was pruned"
        if pushdown is not None:
            kept = set(pads.dataset(table).to_table(filter=pushdown).column("item_id").to_pylist())
            assert matches <= kept, "the pushdown dropped a matching row"


def test_selective_numeric_query_prunes_files_by_stats():
    q = compile_query("labels.car >= 5 and not labels.pedestrian = 0", CONTEXT)
    low = FileStats(10, {"labels.car": ColumnStats(0, 4, 0), "labels.pedestrian": ColumnStats(1, 3, 0)})
    high = FileStats(10, {"labels.car": ColumnStats(2, 6, 0), "labels.pedestrian": ColumnStats(1, 3, 0)})
    none_ped = FileStats(10, {"labels.car": ColumnStats(5, 6, 0), "labels.pedestrian": ColumnStats(None, None, 10)})
    unknown = FileStats(10, {})
    assert not q.file_may_match(low)
    assert q.file_may_match(high)
    assert not q.file_may_match(none_ped)  # pedestrian all null reads as 0
    assert q.file_may_match(unknown)


@pytest.mark.parametrize(
    "query, needle",
    [
        ("labels.pedestrain >= 1", "did you mean 'pedestrian'?"),
        ("labels.truck >= 1", "known labels: 'car', 'pedestrian', 'traffic light', 'Bike'"),
        ("labels.car > 'three'", "is a number"),
        ("labels.car = true", "is a number"),
        ("file.media_type > 'image'", "is text"),
        ("attributes.weather >= 'rain'", "is text"),
        ("attributes.weather = 3", "quote the value"),
        ("file.width = '640'", "is a number"),
        ("file.ingested_at > 5", "ISO date"),
        ("file.ingested_at > 'yesterday'", "not an ISO-8601"),
        ("file.colour = 'red'", "unknown file field"),
        ("tags = 'night'", "'value' in tags"),
    ],
)
def test_type_errors_before_anything_is_read(query, needle):
    with pytest.raises(QueryError) as err:
        compile_query(query, CONTEXT)
    assert needle in str(err.value)
    assert "^" in str(err.value)


def test_columns_needed_are_only_those_referenced():
    q = compile_query("labels.car > 1 and 'x' in tags or file.width < 3", CONTEXT)
    assert q.columns == ["item_id", "labels", "tags", "width"]


@settings(max_examples=1500, deadline=None)
@given(
    st.lists(st.one_of(st.none(), st.integers(0, 8)), min_size=1, max_size=6),
    st.sampled_from(["=", "!=", ">", ">=", "<", "<="]),
    st.one_of(st.integers(-1, 9), st.sampled_from([2.5, -0.5, 8.5])),
    st.lists(st.integers(-1, 9), min_size=1, max_size=3),
    st.booleans(),
)
def test_single_condition_bounds_are_sound(values, op, v, members, negate):
    """For one label column: may-match is never False when a row matches, must-match never
    True when a row does not, for comparisons, lists and their negations."""
    rows = [{"labels": {"car": x}} for x in values]
    present = [x for x in values if x is not None]
    stats = FileStats(len(values), {"labels.car": ColumnStats(
        min(present) if present else None, max(present) if present else None,
        len(values) - len(present))})
    for text in (f"labels.car {op} {v}", f"labels.car in {members}", f"labels.car not in {members}"):
        if negate:
            text = f"not ({text})"
        q = compile_query(text, CONTEXT)
        hits = [reference(q.ast, {**r, "attributes": {}, "tags": []}) for r in rows]
        may, must = _may_must(q.ast, stats)
        assert may or not any(hits), (text, values)
        assert not must or all(hits), (text, values)
