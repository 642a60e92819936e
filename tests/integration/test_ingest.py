"""Ingest end to end on both backends: versions, merges, re-use of blobs, plain-Parquet reads."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import orchestrator
from orchestrator.scan import label_totals, read_table

pytestmark = pytest.mark.usefixtures("ray_cluster")


def coco_counts(coco_path: Path) -> dict[str, Counter]:
    """Per file_name, instances per label, straight from the COCO file."""
    doc = json.loads(coco_path.read_text())
    names = {c["id"]: c["name"] for c in doc["categories"]}
    files = {i["id"]: i["file_name"] for i in doc["images"]}
    out = {f: Counter() for f in files.values()}
    for a in doc["annotations"]:
        out[files[a["image_id"]]][names[a["category_id"]]] += 1
    return out


def plain_parquet_rows(store: orchestrator.Store, dataset: str, version: int) -> pa.Table:
    """Read a version the way a user without this package would: replay the Delta JSON log by
    hand, then read the listed Parquet files with pyarrow."""
    fs = store.fs
    log_dir = store.location.join("datasets", dataset, "manifest", "_delta_log")
    files: set[str] = set()
    for v in range(version + 1):
        with fs.open_input_stream(f"{log_dir}/{v:020d}.json") as f:
            for line in f.read().decode().splitlines():
                action = json.loads(line)
                if "add" in action:
                    files.add(action["add"]["path"])
                if "remove" in action:
                    files.discard(action["remove"]["path"])
    base = store.location.join("datasets", dataset, "manifest")
    tables = [pq.read_table(f"{base}/{p}", filesystem=fs) for p in sorted(files)]
    return pa.concat_tables(tables, promote_options="permissive")


def test_ingest_commits_version_zero_that_plain_pyarrow_reads(store_uri, demo_small):
    store = orchestrator.connect(store_uri)
    report = store.ingest("street", coco=demo_small / "annotations.json", images=demo_small / "images")
    assert report.version == 0 and report.rejected == []
    assert report.items == 60 and report.blobs_uploaded == 60 and report.blobs_reused == 0

    expected = coco_counts(demo_small / "annotations.json")
    rows = plain_parquet_rows(store, "street", 0).to_pylist()
    assert sorted(r["item_id"] for r in rows) == sorted(expected)
    snapshot = store.manifest("street").snapshot(0)
    packs = store.handle.packs("street")
    for r in rows:
        counts = {orchestrator.manifest.label_name(k): v for k, v in r["labels"].items() if v}
        dropped = sum(1 for w in report.warnings if w.startswith(r["item_id"] + ":") and "dropped" in w)
        assert sum(counts.values()) == sum(expected[r["item_id"]].values()) - dropped
        assert len(r["instances"]) == sum(counts.values())
        # The bytes, found from the plain row alone: size_bytes at pack_offset of pack (the default).
        data = packs.read_range(r["pack"], r["pack_offset"], r["pack_offset"] + r["size_bytes"])
        assert hashlib.sha256(data).hexdigest() == r["blob"]
    cols = ["item_id", "blob", "width", "height", "labels", "instances", "attributes", "tags"]
    ours = read_table(store.location, snapshot).sort_by("item_id").select(cols).to_pylist()
    assert ours == sorted(({c: r[c] for c in cols} for r in rows), key=lambda r: r["item_id"])
    assert store.datasets() == ["street"]


def test_an_identical_reingest_commits_nothing_and_a_correction_commits_only_what_changed(
        store_uri, demo_small, tmp_path):
    store = orchestrator.connect(store_uri)
    coco, images = demo_small / "annotations.json", demo_small / "images"
    first = store.ingest("street", coco=coco, images=images)
    again = store.ingest("street", coco=coco, images=images, message="same input")
    assert (again.committed, again.version, again.changed, again.unchanged) == (False, 0, 0, 60)
    assert again.blobs_uploaded == 0 and "nothing committed" in again.summary()
    assert [v.version for v in store.versions("street")] == [0]  # no empty version in the history

    # A corrected annotation file: every car removed from the first image.
    doc = json.loads(coco.read_text())
    first_image = doc["images"][0]
    car_id = next(c["id"] for c in doc["categories"] if c["name"] == "car")
    doc["annotations"] = [
        a for a in doc["annotations"]
        if not (a["image_id"] == first_image["id"] and a["category_id"] == car_id)
    ]
    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps(doc))
    corrected = store.ingest("street", coco=fixed, images=images, message="fix cars")
    assert (corrected.committed, corrected.version, corrected.changed, corrected.unchanged) == (True, 1, 1, 59)
    assert corrected.blobs_uploaded == 0

    manifest = store.manifest("street")
    v0, v1 = manifest.snapshot(first.version), manifest.snapshot(1)
    before = label_totals(store.location, v0)
    after = label_totals(store.location, v1)
    removed = coco_counts(coco)[first_image["file_name"]]["car"]
    assert removed > 0
    assert after["car"] == before["car"] - removed
    assert {k: v for k, v in after.items() if k != "car"} == {k: v for k, v in before.items() if k != "car"}
    assert v0.rows == v1.rows == 60
    assert [v.message for v in store.versions("street")] == ["ingest COCO annotations.json", "fix cars"]
    # The untouched items keep the time they were first committed.
    rows = read_table(store.location, v1, ["item_id", "ingested_at"]).to_pylist()
    times = {r["item_id"]: r["ingested_at"] for r in rows}
    assert len({t for i, t in times.items() if i != first_image["file_name"]}) == 1


def _jpeg_bytes(size=(32, 24), color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def test_every_bad_input_is_reported_and_good_items_land(store_uri, tmp_path):
    img = tmp_path / "images"
    img.mkdir()
    good = _jpeg_bytes()
    (img / "good.jpg").write_bytes(good)
    (img / "copy_of_good.jpg").write_bytes(good)  # duplicate file: one blob, two items
    (img / "overhang.jpg").write_bytes(_jpeg_bytes(color=(0, 0, 255)))
    (img / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    (img / "truncated.jpg").write_bytes(_jpeg_bytes((300, 300), (9, 99, 9))[:700])
    (img / "empty.jpg").write_bytes(b"")
    (img / "notes.png").write_text("not an image at all")
    (img / "unknown_cat.jpg").write_bytes(_jpeg_bytes(color=(1, 2, 3)))
    names = ["good.jpg", "copy_of_good.jpg", "overhang.jpg", "corrupt.jpg", "truncated.jpg",
             "empty.jpg", "notes.png", "missing.jpg", "unknown_cat.jpg"]
    doc = {
        "images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
        "annotations": [
            {"id": 1, "image_id": 0, "category_id": 1, "bbox": [1, 1, 5, 5]},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [20, 10, 30, 30]},  # overhangs 32x24
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [100, 100, 5, 5]},  # fully outside
            {"id": 4, "image_id": 8, "category_id": 42, "bbox": [1, 1, 2, 2]},
            {"id": 5, "image_id": 99, "category_id": 1, "bbox": [1, 1, 2, 2]},
        ],
        "categories": [{"id": 1, "name": "car"}],
    }
    coco = tmp_path / "ann.json"
    coco.write_text(json.dumps(doc))
    store = orchestrator.connect(store_uri)
    report = store.ingest("messy", coco=coco, images=img)

    reasons = {r.file: r.reason for r in report.rejected}
    assert set(reasons) == {
        "corrupt.jpg", "truncated.jpg", "empty.jpg", "notes.png", "missing.jpg",
        "unknown_cat.jpg", "annotation 5",
    }
    assert "truncated" in reasons["truncated.jpg"] or "corrupt" in reasons["truncated.jpg"]
    assert "corrupt" in reasons["corrupt.jpg"] or "not an image" in reasons["corrupt.jpg"]
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["notes.png"] == "not an image Pillow can read"
    assert reasons["missing.jpg"] == "file not found"
    assert "unknown category_id 42" in reasons["unknown_cat.jpg"]
    assert "image_id 99" in reasons["annotation 5"]
    assert report.items == 3 and report.version == 0
    assert report.blobs_uploaded == 2  # good and copy_of_good share one blob
    assert report.boxes_clipped == 1 and report.instances_dropped == 1

    rows = {r["item_id"]: r for r in read_table(store.location, store.manifest("messy").snapshot()).to_pylist()}
    assert rows["good.jpg"]["blob"] == rows["copy_of_good.jpg"]["blob"]
    assert rows["overhang.jpg"]["instances"][0]["bbox"] == [20.0, 10.0, 32.0, 24.0]
    assert rows["overhang.jpg"]["labels"]["car"] == 1

    as_json = report.as_dict()
    assert {"version", "items", "rejected", "blobs_uploaded", "blobs_reused", "warnings"} <= set(as_json)
    json.dumps(as_json)


def test_delete_items_is_a_version_and_unknown_ids_change_nothing(store_uri, demo_small):
    store = orchestrator.connect(store_uri)
    store.ingest("street", coco=demo_small / "annotations.json", images=demo_small / "images")
    ids = sorted(read_table(store.location, store.manifest("street").snapshot(), ["item_id"])
                 .column("item_id").to_pylist())
    version, deleted = store.delete("street", ids[:3], message="drop three")
    assert (version, deleted) == (1, 3)
    with pytest.raises(orchestrator.errors.DatasetNotFound, match="no-such-item"):
        store.delete("street", [ids[5], "no-such-item"])
    versions = store.versions("street")
    assert [(v.version, v.items, v.operation) for v in versions] == [(0, 60, "ingest"), (1, 57, "delete")]


def test_jsonl_ingest_and_label_schema_evolution(store_uri, tmp_path):
    (tmp_path / "a.jpg").write_bytes(_jpeg_bytes(color=(5, 5, 5)))
    (tmp_path / "b.jpg").write_bytes(_jpeg_bytes(color=(6, 6, 6)))
    first = tmp_path / "one.jsonl"
    first.write_text(json.dumps({"path": "a.jpg", "instances": [{"label": "car", "bbox": [0, 0, 3, 3]}]}))
    second = tmp_path / "two.jsonl"
    second.write_text(json.dumps({"path": "b.jpg", "tags": ["night"], "instances": [
        {"label": "traffic light", "bbox": [1, 1, 2, 2]}, {"label": "Car", "kind": "tag"}]}))
    store = orchestrator.connect(store_uri)
    store.ingest("evolve", jsonl=first)
    store.ingest("evolve", jsonl=second)
    snap = store.manifest("evolve").snapshot()
    assert snap.label_map.names == ("car", "traffic light", "Car")
    rows = {r["item_id"]: r for r in read_table(store.location, snap).to_pylist()}
    # a.jpg was written before the new labels existed: their counts read as 0, not null.
    assert rows["a.jpg"]["labels"] == {"car": 1, "traffic%20light": 0, "%43ar": 0}
    assert rows["b.jpg"]["labels"] == {"car": 0, "traffic%20light": 1, "%43ar": 1}
    assert rows["b.jpg"]["tags"] == ["night"]
    assert store.manifest("evolve").snapshot(0).label_map.names == ("car",)
    shown = store.dataset("evolve").manifest_rows(["item_id", "labels"]).to_pylist()
    shown = {r["item_id"]: r["labels"] for r in shown}
    assert shown["b.jpg"] == {"car": 0, "traffic light": 1, "Car": 1}  # what users read: label names


@pytest.mark.slow
def test_2000_images_into_s3_version_zero_then_zero_reupload(seaweed, demo_2000):
    """The acceptance run: 2,000 demo images into SeaweedFS as version 0, read back with plain
    pyarrow, then the same input again uploads and commits nothing."""
    import time

    store = orchestrator.connect(f"s3://orchestrator-test/accept-{time.time_ns()}")
    coco, images = demo_2000 / "annotations.json", demo_2000 / "images"
    report = store.ingest("street", coco=coco, images=images)
    assert (report.version, report.items, report.rejected) == (0, 2000, [])
    assert report.blobs_uploaded == 2000 and report.boxes_clipped > 0  # demo data overhangs ~1.5%

    expected = coco_counts(coco)
    dropped = Counter(w.split(":")[0] for w in report.warnings if "dropped" in w)
    rows = plain_parquet_rows(store, "street", 0).to_pylist()
    assert len(rows) == 2000 and {r["item_id"] for r in rows} == set(expected)
    for r in rows:
        assert sum(r["labels"].values()) == sum(expected[r["item_id"]].values()) - dropped[r["item_id"]]
        assert r["labels"]["car"] == expected[r["item_id"]]["car"] or dropped[r["item_id"]]

    again = store.ingest("street", coco=coco, images=images)
    # Identical input: nothing uploaded, nothing committed (the compare reads manifest columns only).
    assert (again.committed, again.version, again.unchanged, again.blobs_uploaded) == (False, 0, 2000, 0)


def test_dataset_object_pins_its_version(store_uri, demo_small):
    store = orchestrator.connect(store_uri)
    coco, images = demo_small / "annotations.json", demo_small / "images"
    store.ingest("street", coco=coco, images=images)
    ds = store.dataset("street")
    store.delete("street", ["street_000000.jpg"])
    assert (ds.version, len(ds)) == (0, 60)  # pinned at open: the delete is not seen
    latest = store.dataset("street")
    assert (latest.version, len(latest)) == (1, 59)
    assert [v.version for v in ds.versions()] == [0, 1]
    assert ds.label_map.names == ("car", "pedestrian", "traffic light", "bicycle")
    gone = next(r for r in read_table(store.location, store.manifest("street").snapshot(0)).to_pylist()
                if r["item_id"] == "street_000000.jpg")
    old, new = ds.label_counts(), latest.label_counts()
    for name in ds.label_map.names:
        assert old[name] - new[name] == gone["labels"][orchestrator.manifest.label_field(name)]
    with pytest.raises(orchestrator.errors.VersionNotFound, match="versions 0..1 exist"):
        store.dataset("street", version=5)
    with pytest.raises(orchestrator.errors.DatasetNotFound):
        store.dataset("nope")
