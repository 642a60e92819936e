"""sources: COCO and JSONL parsing, and every way an annotation file can be wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.errors import IngestError
from orchestrator.ingest.sources import read_coco, read_jsonl


def _coco(tmp_path: Path, doc: dict) -> Path:
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(doc))
    return p


BASE = {
    "images": [
        {"id": 1, "file_name": "a.jpg", "width": 10, "height": 10, "attributes": {"time_of_day": "night", "n": 3}},
        {"id": 2, "file_name": "sub/b.jpg", "width": 10, "height": 10, "tags": ["rain"]},
    ],
    "annotations": [
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]},
        {"id": 11, "image_id": 1, "category_id": 2, "bbox": [0, 0, 2, 2],
         "segmentation": [[0, 0, 2, 0, 2, 2]], "attributes": {"occluded": True}},
        {"id": 12, "image_id": 2, "category_id": 1, "bbox": [5, 5, 1, 1]},
    ],
    "categories": [{"id": 1, "name": "car"}, {"id": 2, "name": "traffic light"}, {"id": 3, "name": "bicycle"}],
}


def test_coco_items_instances_and_labels(tmp_path):
    src = read_coco(_coco(tmp_path, BASE), tmp_path / "images")
    assert src.labels == ["car", "traffic light", "bicycle"]
    assert not src.rejected
    a, b = src.items
    assert a.item_id == "a.jpg" and b.item_id == "sub/b.jpg"
    assert a.path == str((tmp_path / "images" / "a.jpg").resolve())
    assert a.attributes == {"time_of_day": "night", "n": "3"} and b.tags == ["rain"]
    car, light = a.instances
    assert (car.label, car.kind, car.bbox) == ("car", "box", [1, 2, 4, 6])
    assert (light.kind, light.polygon, light.attributes) == ("polygon", [0, 0, 2, 0, 2, 2], {"occluded": "true"})


def test_unknown_category_rejects_the_item_with_reason(tmp_path):
    doc = json.loads(json.dumps(BASE))
    doc["annotations"].append({"id": 13, "image_id": 2, "category_id": 99, "bbox": [0, 0, 1, 1]})
    src = read_coco(_coco(tmp_path, doc), tmp_path)
    assert [i.item_id for i in src.items] == ["a.jpg"]
    (rej,) = src.rejected
    assert rej.file == "sub/b.jpg" and "unknown category_id 99" in rej.reason and "1=car" in rej.reason


def test_annotation_for_unlisted_image_is_reported(tmp_path):
    doc = json.loads(json.dumps(BASE))
    doc["annotations"].append({"id": 14, "image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1]})
    src = read_coco(_coco(tmp_path, doc), tmp_path)
    assert len(src.items) == 2
    assert [(r.file, "image_id 7" in r.reason) for r in src.rejected] == [("annotation 14", True)]


def test_duplicate_file_name_and_bad_bbox(tmp_path):
    doc = json.loads(json.dumps(BASE))
    doc["images"].append({"id": 3, "file_name": "a.jpg"})
    doc["annotations"].append({"id": 15, "image_id": 2, "category_id": 1, "bbox": [0, "x", 1, 1]})
    src = read_coco(_coco(tmp_path, doc), tmp_path)
    assert any("duplicate item_id" in r.reason for r in src.rejected)
    assert any("annotation 15 dropped" in w for w in src.warnings)


@pytest.mark.parametrize(
    "content, needle",
    [("{not json", "not valid JSON"), ('{"annotations": []}', "needs an 'images' list")],
)
def test_unreadable_coco_file_is_an_ingest_error(tmp_path, content, needle):
    p = tmp_path / "ann.json"
    p.write_text(content)
    with pytest.raises(IngestError, match=needle):
        read_coco(p, tmp_path)
    with pytest.raises(IngestError, match="not found"):
        read_coco(tmp_path / "missing.json", tmp_path)


def test_jsonl_items_kinds_and_rejections(tmp_path):
    lines = [
        {"path": "x.jpg", "item_id": "X", "instances": [
            {"label": "car", "bbox": [0, 0, 1, 1]},
            {"label": "road", "polygon": [0, 0, 4, 0, 4, 2]},
            {"label": "night"}],
         "attributes": {"camera": "front"}, "tags": ["t1"]},
        {"path": "y.jpg", "instances": [{"label": "car", "kind": "blob"}]},
        {"path": "z.jpg", "instances": [{"bbox": [0, 0, 1, 1]}]},
        {"item_id": "no-path"},
        {"path": "w.jpg", "item_id": "X"},
    ]
    p = tmp_path / "items.jsonl"
    p.write_text("\n".join(json.dumps(l) for l in lines) + "\n\n{broken\n")
    src = read_jsonl(p)
    (item,) = src.items
    assert item.item_id == "X" and item.path == str((tmp_path / "x.jpg").resolve())
    assert [i.kind for i in item.instances] == ["box", "polygon", "tag"]
    assert item.instances[1].bbox == [0, 0, 4, 2]
    assert src.labels == ["car", "road", "night"]
    reasons = {r.file: r.reason for r in src.rejected}
    assert "kind 'blob'" in reasons["y.jpg"]
    assert "label" in reasons["z.jpg"]
    assert "missing 'path'" in reasons["items.jsonl:4"]
    assert "duplicate item_id" in reasons["w.jpg"]
    assert "invalid JSON" in reasons["items.jsonl:7"]
