"""Slices on real manifests, both backends: file skipping on 100+ data files, DuckDB agreement,
laziness (no blob is read), chaining, versions and the CLI."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import duckdb
import pyarrow as pa
import pytest
from deltalake import write_deltalake

import orchestrator
from orchestrator.blobs import BlobStore
from orchestrator.errors import QueryError
from orchestrator.manifest import manifest_schema
from orchestrator.packs import PackStore
from tests.conftest import run_cli
from tests.integration.test_ingest import plain_parquet_rows

pytestmark = pytest.mark.usefixtures("ray_cluster")

LABELS = ["car", "pedestrian"]


def _many_file_manifest(store: orchestrator.Store, files: int = 120, rows_per_file: int = 5) -> None:
    """A manifest of ``files`` data files: every row of file k has k cars (k % 12) and k % 3
    pedestrians, so file statistics decide which files can match."""
    manifest = store.manifest("many")
    now = datetime(2026, 5, 1, tzinfo=UTC)
    for k in range(files):
        rows = [
            {"item_id": f"f{k:03d}-{i}", "blob": f"{k:060x}{i:04x}", "media_type": "image/jpeg",
             "width": 100 + k, "height": 50, "size_bytes": 10, "source_name": "x.jpg",
             "instances": [], "labels": {"car": k % 12, "pedestrian": k % 3},
             "attributes": {"weather": "rain" if k % 2 else "sun"},
             "tags": ["night"] if k % 5 == 0 else [], "ingested_at": now}
            for i in range(rows_per_file)
        ]
        table = pa.Table.from_pylist(rows, schema=manifest_schema(LABELS))
        write_deltalake(manifest.uri, table, mode="append", storage_options=manifest._options)


def test_selective_query_reads_fewer_files_than_a_full_scan(store_uri):
    store = orchestrator.connect(store_uri)
    _many_file_manifest(store)
    ds = store.dataset("many")
    assert len(ds.manifest_rows(["item_id"])) == 600 and ds.last_scan.files_read == 120

    sel = ds.slice("labels.car = 11 and labels.pedestrian >= 2")
    ids = sel.item_ids()
    files = {i.split("-")[0] for i in ids}
    assert files == {f"f{k:03d}" for k in range(120) if k % 12 == 11 and k % 3 == 2}
    assert len(ids) == 5 * len(files)
    stats = sel.last_scan
    assert stats.files_total == 120
    assert stats.files_read == len(files) < 120  # every other file ruled out by its statistics
    assert stats.rows_in_files_read == len(ids)

    # A text-only predicate cannot use statistics: all files are read, and it is still exact.
    rain = ds.slice("attributes.weather = 'rain' and 'night' in tags")
    assert len(rain) == 5 * len([k for k in range(120) if k % 2 and k % 5 == 0])
    assert rain.last_scan.files_read == 120


QUERIES = [
    ("labels.car > 3 and labels.pedestrian >= 1",
     "labels.car > 3 and labels.pedestrian >= 1"),
    ("labels.\"traffic light\" >= 2 or labels.bicycle = 0",
     "labels.\"traffic%20light\" >= 2 or labels.bicycle = 0"),
    ("not (labels.car in [0, 1, 2]) and file.width > 400",
     "not (labels.car in (0, 1, 2)) and width > 400"),
    ("attributes.time_of_day = 'night' or attributes.weather in ['rain', 'fog']",
     "coalesce(element_at(attributes, 'time_of_day')[1] = 'night', false) "
     "or coalesce(element_at(attributes, 'weather')[1] in ('rain', 'fog'), false)"),
    ("attributes.weather != 'clear' and file.height <= 300",
     "coalesce(element_at(attributes, 'weather')[1] != 'clear', true) and height <= 300"),
    ("file.item_id = 'street_000007.jpg' or file.media_type != 'image/jpeg'",
     "item_id = 'street_000007.jpg' or media_type != 'image/jpeg'"),
]


@pytest.mark.parametrize("query, sql", QUERIES)
def test_slices_agree_with_duckdb_sql_on_plain_parquet(store_uri, demo_small, query, sql):
    store = orchestrator.connect(store_uri)
    store.ingest("street", coco=demo_small / "annotations.json", images=demo_small / "images")
    manifest = plain_parquet_rows(store, "street", 0)  # read without this package
    con = duckdb.connect()
    con.register("manifest", manifest)
    expected = sorted(r[0] for r in con.execute(f"select item_id from manifest where {sql}").fetchall())
    got = store.dataset("street").slice(query).item_ids()
    assert got == expected
    assert 0 < len(expected) < 60 or query.startswith("file.item_id")


def test_slice_is_lazy_chainable_and_never_fetches_blobs(store_uri, demo_small, monkeypatch):
    store = orchestrator.connect(store_uri)
    store.ingest("street", coco=demo_small / "annotations.json", images=demo_small / "images")

    def no_blobs(self, blob):
        raise AssertionError("slicing fetched a blob")

    def no_packs(self, pack, start, end):
        raise AssertionError("slicing read a pack")

    monkeypatch.setattr(BlobStore, "get", no_blobs)
    monkeypatch.setattr(PackStore, "read_range", no_packs)  # where the default layout's media are
    ds = store.dataset("street")
    both = ds.slice("labels.car > 3").slice("labels.pedestrian >= 1")
    assert both.query == "(labels.car > 3) and (labels.pedestrian >= 1)"
    assert both.item_ids() == ds.slice("labels.car > 3 and labels.pedestrian >= 1").item_ids()
    assert 0 < len(both) < len(ds.slice("labels.car > 3")) < len(ds) == 60

    # A bad query fails when the slice is made, before any read.
    with pytest.raises(QueryError, match="did you mean 'pedestrian'"):
        ds.slice("labels.car > 3").slice("labels.pedestrain > 0")

    # Slices work on any version: delete the matching items; version 0 still has them.
    store.delete("street", both.item_ids())
    assert len(store.dataset("street").slice(both.query)) == 0
    assert len(store.dataset("street", version=0).slice(both.query)) == len(both)


def test_cli_slice_count_ids_json_and_errors(store_uri, demo_small):
    store = orchestrator.connect(store_uri)
    store.ingest("street", coco=demo_small / "annotations.json", images=demo_small / "images")
    q = "labels.car > 3 and labels.pedestrian >= 1"
    expected = store.dataset("street").slice(q).item_ids()

    r = run_cli("slice", "--store", store_uri, "street", q, "--count")
    assert r.returncode == 0 and int(r.stdout) == len(expected)
    r = run_cli("slice", "--store", store_uri, "street", q, "--ids", "--version", "0")
    assert r.stdout.split() == expected
    r = run_cli("slice", "--store", store_uri, "street", q, "--json")
    out = json.loads(r.stdout)
    assert out["ids"] == expected and out["count"] == len(expected) and out["version"] == 0
    assert out["scan"]["files_total"] == 1

    r = run_cli("slice", "--store", store_uri, "street", "labels.car >> 3")
    assert r.returncode == 2 and "at position 12" in r.stderr and "^" in r.stderr
    assert "Traceback" not in r.stderr
