"""``ds.export`` / ``orchestrator export``: COCO and JSONL exports ingest back as the same items
(ids, media bytes, labels, boxes, polygons, tags, attributes), on both backends, for the demo data
and for edge cases (no instances, polygons only, tag instances, unicode names, ids that are not
file names); YOLO files hold the normalised boxes; an export is whole or absent."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import orchestrator
from orchestrator.errors import ExportError, ItemError
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("ray_cluster")

#: id -> (image file under images/, its JSONL record without path and id): the edge cases.
EDGE: dict[str, dict] = {
    "empty.jpg": {},
    "polys/only.jpg": {"instances": [
        {"label": "puddle", "polygon": [10, 10, 60, 12, 40, 50]},
        {"label": "puddle", "polygon": [70.25, 20.5, 90, 20.5, 80.125, 44.75], "attributes": {"depth": "3 cm"}}]},
    "Straße/çà ü.jpg": {"instances": [{"label": "верблюд", "bbox": [5, 6, 70.5, 40.25]},
                                      {"label": "traffic light", "bbox": [0.1, 0.2, 100.3, 30.7]},
                                      {"label": "blurry", "kind": "tag", "attributes": {"by": "qa"}}],
                        "attributes": {"città": "Zürich"}, "tags": ["夜", "rain"]},
    "../escape.jpg": {"instances": [{"label": "car", "bbox": [1, 2, 3, 4]}]},
    "frame-7": {"tags": ["no extension"]},
    "Cam/A.jpg": {"instances": [{"label": "car", "bbox": [1, 1, 9, 9]}]},
    "cam/a.jpg": {"instances": [{"label": "car", "bbox": [2, 2, 8, 8]}]},
    "tiny-poly": {"instances": [{"label": "puddle", "kind": "polygon", "polygon": [3, 3, 9, 9]}]},
}


def edge_source(demo: Path, out: Path) -> Path:
    """``out/items.jsonl`` over copies of demo images (``Straße/çà ü.jpg`` under that name)."""
    images = sorted((demo / "images").iterdir())
    (out / "images" / "Straße").mkdir(parents=True)
    lines = []
    for k, (item_id, record) in enumerate(EDGE.items()):
        name = "Straße/çà ü.jpg" if item_id.startswith("Straße") else images[k].name
        shutil.copyfile(images[k], out / "images" / name)
        lines.append(json.dumps({"item_id": item_id, "path": f"images/{name}", **record}, ensure_ascii=False))
    path = out / "items.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def ingest_export(store: orchestrator.Store, name: str, out: Path, fmt: str):
    if fmt == "coco":
        return store.ingest(name, coco=out / "annotations.json", images=out / "images")
    return store.ingest(name, jsonl=out / "items.jsonl")


def media_files(out: Path, fmt: str) -> dict[str, Path]:
    """item id -> its exported media file, as the export's annotations name it."""
    if fmt == "coco":
        doc = json.loads((out / "annotations.json").read_text(encoding="utf-8"))
        return {im["item_id"]: out / "images" / im["file_name"] for im in doc["images"]}
    records = [json.loads(line) for line in (out / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    return {r["item_id"]: out / r["path"] for r in records}


@pytest.mark.parametrize("fmt", ["coco", "jsonl"])
def test_export_ingests_back_as_the_same_items(street, store_uri, demo_small, tmp_path, fmt):
    src = edge_source(demo_small, tmp_path / "edge")
    assert street.ingest("street", jsonl=src).committed  # v1: the 60 demo items and the edge cases
    ds = street.dataset("street")
    out = tmp_path / "export"
    report = ds.export(out, fmt)
    assert report.items == len(ds) == 60 + len(EDGE) and report.format == fmt

    # Byte-identical media, each file inside the export, named by its id where the id can be a name.
    blobs = dict(zip(*ds.manifest_rows(["item_id", "blob"]).to_pydict().values(), strict=True))
    files = media_files(out, fmt)
    assert sorted(files) == sorted(blobs)
    for item_id, path in files.items():
        assert path.resolve().is_relative_to(out.resolve())
        assert hashlib.sha256(path.read_bytes()).hexdigest() == blobs[item_id]
    assert files["Straße/çà ü.jpg"] == out / "images" / "Straße" / "çà ü.jpg"
    assert files["frame-7"].name == "frame-7.jpg" and files["../escape.jpg"].name.startswith("item-")
    assert str(files["Cam/A.jpg"]).casefold() != str(files["cam/a.jpg"]).casefold()  # case-insensitive disks too
    assert report.renamed >= 1  # ../escape.jpg (and one of the case twins)

    provenance = json.loads((out / "export.json").read_text())
    assert provenance["dataset"] == "street" and provenance["version"] == ds.version
    assert provenance["store"] == store_uri and provenance["items"] == report.items

    back = ingest_export(street, "copy", out, fmt)
    assert back.rejected == [] and back.warnings == [], (back.rejected, back.warnings)
    copy = street.dataset("copy")
    diff = ds.diff(copy)
    assert diff.added == () and diff.removed == ()
    if fmt == "coco":  # COCO cannot hold a polygon of two points: it comes back as its box
        assert [(c.item_id, c.parts) for c in diff.changed] == [("tiny-poly", ("boxes", "polygons"))]
        assert report.dropped == {"polygons of fewer than 3 points (kept as boxes)": 1}
        assert copy.label_map == ds.label_map  # categories in label-map order: the same ids
    else:
        assert diff.changed == () and report.dropped == {}
        assert set(copy.label_map.names) == set(ds.label_map.names)  # every label is used here
    for item_id in ("Straße/çà ü.jpg", "polys/only.jpg", ds.item_ids()[0]):
        a, b = ds.get(item_id), copy.get(item_id)
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["boxes"], b["boxes"])
        assert a["label_names"] == b["label_names"] and a["instance_tags"] == b["instance_tags"]
        assert a["tags"] == b["tags"] and a["attributes"] == b["attributes"]
        assert a["instance_attributes"] == b["instance_attributes"]
        assert all(np.array_equal(p, q) for p, q in zip(a["polygons"], b["polygons"], strict=True))
    assert ds.get("Straße/çà ü.jpg")["instance_tags"] == ["blurry"]


def test_yolo_holds_the_normalised_boxes_and_says_what_it_drops(street, store_uri, tmp_path):
    ds = street.dataset("street").slice("labels.car >= 1")
    r = run_cli("export", "street", "--store", store_uri, "--query", "labels.car >= 1", "--format", "yolo",
                "--out", str(tmp_path / "yolo"), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["items"] == len(ds) and report["query"] == "labels.car >= 1"
    assert report["dropped"].get("polygons (their boxes are kept)", 0) > 0
    assert "item attribute maps" in report["dropped"]  # the demo's time_of_day
    yaml_text = (tmp_path / "yolo" / "data.yaml").read_text()
    for i, name in enumerate(ds.label_map.names):
        assert f'  {i}: "{name}"' in yaml_text
    for item in ds:
        lines = (tmp_path / "yolo" / "labels" / item["id"]).with_suffix(".txt").read_text().splitlines()
        got = np.array([[float(v) for v in line.split()] for line in lines]).reshape(-1, 5)
        w, h = item["width"], item["height"]
        boxes = item["boxes"].astype(np.float64)
        want = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2 / w, (boxes[:, 1] + boxes[:, 3]) / 2 / h,
                         (boxes[:, 2] - boxes[:, 0]) / w, (boxes[:, 3] - boxes[:, 1]) / h], axis=1)
        assert got[:, 0].astype(int).tolist() == item["labels"].tolist()
        assert np.allclose(got[:, 1:], want, atol=2e-6)
        assert (tmp_path / "yolo" / "images" / item["id"]).is_file()


def test_an_export_is_whole_or_absent_and_never_overwrites_by_accident(store_uri, demo_small, tmp_path):
    store = orchestrator.connect(store_uri)
    src = edge_source(demo_small, tmp_path / "edge")
    store.ingest("edge", jsonl=src, pack=False)  # loose blobs: one can be removed alone
    ds = store.dataset("edge")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = run_cli("export", "edge", "--store", store_uri, "--format", "jsonl", "--out", str(out))
    assert r.returncode == 2 and "is not empty" in r.stderr and "--overwrite" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    blob = dict(zip(*ds.manifest_rows(["item_id", "blob"]).to_pydict().values(), strict=True))["frame-7"]
    store.fs.delete_file(store.blobs("edge").path(blob))
    with pytest.raises(ItemError, match="frame-7"):
        store.dataset("edge").export(out, "coco", overwrite=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # untouched: nothing half-written

    report = store.dataset("edge").export(out, "coco", overwrite=True, on_error="skip")
    assert report.items == len(EDGE) - 1 and report.skipped["count"] == 1
    assert not (out / "notes.txt").exists() and (out / "annotations.json").is_file()
    assert json.loads((out / "export.json").read_text())["skipped"]["count"] == 1

    with pytest.raises(ExportError, match="is a file"):
        ds.export(out / "export.json", "coco")
    with pytest.raises(ExportError, match="unknown export format"):
        ds.export(tmp_path / "new", "voc")
    if store_uri.startswith("file://"):  # replacing a folder that holds the store is refused
        with pytest.raises(ExportError, match="holds"):
            ds.export(tmp_path, "coco", overwrite=True)
        assert (tmp_path / "store").is_dir()
