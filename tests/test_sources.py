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


# --- confinement: nothing outside the source folder is named for reading ---------------------


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    """images/ with one file, a sibling outside/ with a secret, and links from inside to it."""
    images, outside = tmp_path / "images", tmp_path / "outside"
    (images / "sub").mkdir(parents=True)
    outside.mkdir()
    (images / "a.png").write_bytes(b"inside")
    (outside / "secret.png").write_bytes(b"secret")
    (images / "link.png").symlink_to(outside / "secret.png")
    (images / "dirlink").symlink_to(outside, target_is_directory=True)
    return images, outside


ESCAPES = [
    "../outside/secret.png",
    "sub/../../outside/secret.png",
    "link.png",  # symlink to a file outside
    "dirlink/secret.png",  # symlinked folder outside
    "ABSOLUTE",  # replaced by the absolute path of the secret
    "a.png\x00../outside/secret.png",
]


def _name(name: str, outside: Path) -> str:
    return str(outside / "secret.png") if name == "ABSOLUTE" else name


@pytest.mark.parametrize("name", ESCAPES)
def test_coco_file_name_outside_images_is_rejected_with_reason(tmp_path, name):
    images, outside = _tree(tmp_path)
    name = _name(name, outside)
    doc = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": name}],
           "annotations": [{"id": 5, "image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1]}],
           "categories": [{"id": 1, "name": "car"}]}
    src = read_coco(_coco(tmp_path, doc), images)
    assert [i.source_name for i in src.items] == ["a.png"]
    (rej,) = src.rejected  # the image, not also its annotation as "image_id not in images"
    assert rej.file == name
    assert "outside" in rej.reason or "absolute" in rej.reason or "NUL" in rej.reason
    assert "--allow-root" in rej.reason or "NUL" in rej.reason


@pytest.mark.parametrize("name", ESCAPES)
def test_jsonl_path_outside_its_folder_is_rejected_with_reason(tmp_path, name):
    images, outside = _tree(tmp_path)
    name = _name(name, outside)
    p = images / "items.jsonl"
    p.write_text(json.dumps({"path": "a.png"}) + "\n" + json.dumps({"path": name}) + "\n")
    src = read_jsonl(p)
    assert [i.source_name for i in src.items] == ["a.png"]
    (rej,) = src.rejected
    assert rej.file == name and ("outside" in rej.reason or "absolute" in rej.reason or "NUL" in rej.reason)


def test_allow_root_opts_in_to_absolute_paths_and_links_under_it_only(tmp_path):
    images, outside = _tree(tmp_path)
    elsewhere = tmp_path / "elsewhere.png"
    elsewhere.write_bytes(b"x")
    names = [str(outside / "secret.png"), "link.png", "../outside/secret.png", str(elsewhere),
             str(outside / ".." / "elsewhere.png")]
    doc = {"images": [{"id": n, "file_name": f} for n, f in enumerate(names)], "annotations": []}
    src = read_coco(_coco(tmp_path, doc), images, allowed_roots=[outside])
    secret = str((outside / "secret.png").resolve())
    assert [(i.source_name, i.path) for i in src.items] == [(n, secret) for n in names[:3]]
    assert sorted(r.file for r in src.rejected) == sorted(names[3:])

    p = images / "items.jsonl"
    p.write_text("".join(json.dumps({"path": n}) + "\n" for n in names))
    src = read_jsonl(p, allowed_roots=[outside])
    assert [i.path for i in src.items] == [secret] * 3 and len(src.rejected) == 2


def test_jsonl_paths_are_confined_to_the_given_base(tmp_path):
    images, outside = _tree(tmp_path)
    p = tmp_path / "items.jsonl"  # the JSONL's own folder holds images/ and outside/
    p.write_text(json.dumps({"path": "a.png"}) + "\n" + json.dumps({"path": "../outside/secret.png"}) + "\n")
    src = read_jsonl(p, base=images)
    assert [i.path for i in src.items] == [str((images / "a.png").resolve())]
    assert [r.file for r in src.rejected] == ["../outside/secret.png"]


@pytest.mark.parametrize(
    "name",
    ["%2e%2e/outside/secret.png", "..%2foutside%2fsecret.png", "\uff0e\uff0e/outside/secret.png",
     "\u2025/outside/secret.png", "..\\outside\\secret.png", "sub/./../a.png"],
)
def test_encoded_and_look_alike_names_are_literal_names_inside_the_folder(tmp_path, name):
    """Nothing decodes or normalises names: each is a literal (here missing) name inside."""
    images, _ = _tree(tmp_path)
    doc = {"images": [{"id": 1, "file_name": name}, {"id": 2, "file_name": "../x.png"}]}
    src = read_coco(_coco(tmp_path, doc), images)
    (item,) = src.items
    assert Path(item.path).is_relative_to(images.resolve())
    assert [r.file for r in src.rejected] == ["../x.png"]


# --- ambiguities are reported, never silently resolved ----------------------------------------


def test_duplicate_image_ids_reject_every_image_sharing_the_id(tmp_path):
    doc = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"},
                      {"id": 2, "file_name": "c.jpg"}],
           "annotations": [{"id": 9, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}],
           "categories": [{"id": 1, "name": "car"}]}
    src = read_coco(_coco(tmp_path, doc), tmp_path)
    assert [(i.item_id, i.instances) for i in src.items] == [("c.jpg", [])]
    assert sorted(r.file for r in src.rejected) == ["a.jpg", "b.jpg"]
    assert all("image id 1" in r.reason and "a.jpg" in r.reason and "b.jpg" in r.reason
               for r in src.rejected)


def test_inverted_boxes_reject_their_item(tmp_path):
    doc = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
           "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [5, 5, -2, 3]},
                           {"id": 8, "image_id": 2, "category_id": 1, "bbox": [5, 5, 2, 3]}],
           "categories": [{"id": 1, "name": "car"}]}
    src = read_coco(_coco(tmp_path, doc), tmp_path)
    assert [i.item_id for i in src.items] == ["b.jpg"]
    (rej,) = src.rejected
    assert rej.file == "a.jpg" and "annotation 7" in rej.reason and "negative" in rej.reason

    p = tmp_path / "items.jsonl"
    p.write_text(json.dumps({"path": "a.jpg", "instances": [{"label": "car", "bbox": [9, 0, 1, 4]}]}) + "\n"
                 + json.dumps({"path": "b.jpg", "instances": [{"label": "car", "bbox": [0, 4, 1, 0]}]}) + "\n"
                 + json.dumps({"path": "c.jpg", "instances": [{"label": "car", "bbox": [0, 0, 1, 4]}]}) + "\n")
    src = read_jsonl(p)
    assert [i.item_id for i in src.items] == ["c.jpg"]
    assert [r.file for r in src.rejected] == ["a.jpg", "b.jpg"]
    assert all("x_min > x_max" in r.reason or "y_min > y_max" in r.reason for r in src.rejected)


def test_annotations_without_geometry_are_kept_as_tags_with_a_warning(tmp_path):
    doc = {"images": [{"id": 1, "file_name": "a.jpg"}],
           "annotations": [{"id": 3, "image_id": 1, "category_id": 1},
                           {"id": 4, "image_id": 1, "category_id": 1, "segmentation": {"counts": "x"}},
                           {"id": 6, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}],
           "categories": [{"id": 1, "name": "car"}]}
    src = read_coco(_coco(tmp_path, doc), tmp_path)
    assert [i.kind for i in src.items[0].instances] == ["tag", "tag", "box"]
    assert any("annotation 3" in w and "no bbox" in w and "tag" in w for w in src.warnings)
    assert any("annotation 4" in w and "no bbox" in w for w in src.warnings)
    assert not any("annotation 6" in w for w in src.warnings)

    p = tmp_path / "items.jsonl"
    p.write_text(json.dumps({"path": "a.jpg", "instances": [
        {"label": "car"}, {"label": "night", "kind": "tag"}]}) + "\n")
    src = read_jsonl(p)
    assert [i.kind for i in src.items[0].instances] == ["tag", "tag"]
    (w,) = src.warnings
    assert w.startswith("a.jpg: instance 0 (car)") and '"kind": "tag"' in w
