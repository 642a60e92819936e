"""The pure parts of ``orchestrator.export``: media file names, and exact COCO boxes."""

from __future__ import annotations

import json
import random

from hypothesis import given
from hypothesis import strategies as st

from orchestrator.export import media_name


def test_an_id_that_is_a_safe_path_names_its_file() -> None:
    taken: set[str] = set()
    assert media_name("street_000001.jpg", "image/jpeg", taken) == ("street_000001.jpg", False)
    assert media_name("Straße/çà ü.jpg", "image/jpeg", taken) == ("Straße/çà ü.jpg", False)
    assert media_name("cam/frame-7", "image/jpeg", taken) == ("cam/frame-7.jpg", True)  # extension added
    assert media_name("scan.jpg", "image/png", taken) == ("scan.jpg.png", True)  # the bytes are PNG


def test_ids_that_are_not_safe_paths_get_hashed_names_inside_the_folder() -> None:
    taken: set[str] = set()
    for hostile in ("../escape.jpg", "/etc/passwd", "a//b.jpg", "./x.jpg", "a\\..\\b.jpg", "new\nline.jpg",
                    "x" * 300 + ".jpg", "a/../../b.jpg"):
        name, renamed = media_name(hostile, "image/jpeg", taken)
        assert renamed and name.startswith("item-") and name.endswith(".jpg") and "/" not in name


def test_names_never_meet_case_folded_nor_a_folder_nor_a_yolo_label() -> None:
    taken: set[str] = set()
    names = [media_name(i, m, taken)[0] for i, m in [
        ("Cam/A.jpg", "image/jpeg"), ("cam/a.jpg", "image/jpeg"),  # case twins
        ("x.jpg", "image/jpeg"), ("x.png", "image/png"),  # the same labels/x.txt in YOLO
        ("d.jpg", "image/jpeg"), ("d.jpg/e.jpg", "image/jpeg"),  # a file where a folder must go
        ("f/g.jpg", "image/jpeg"), ("f", "image/jpeg"),  # a folder where a file goes: f.jpg is fine
    ]]
    stems = [n.rsplit(".", 1)[0].casefold() for n in names]
    assert len(set(stems)) == len(stems)
    assert names[0] == "Cam/A.jpg" and names[1].startswith("item-")
    assert names[2] == "x.jpg" and names[3].startswith("item-")
    assert names[4] == "d.jpg" and names[5].startswith("item-")
    assert names[6] == "f/g.jpg" and names[7] == "f.jpg"


@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=40, unique=True))
def test_names_are_unique_for_any_ids(ids: list[str]) -> None:
    taken: set[str] = set()
    names = [media_name(i, "image/jpeg", taken)[0] for i in ids]
    assert len({n.casefold() for n in names}) == len(names)
    assert all(".." not in n.split("/") and not n.startswith("/") for n in names)


def test_coco_boxes_read_back_exactly_from_their_corners(tmp_path) -> None:
    """``x + (x_max - x)`` is one ulp off ``x_max`` for ~3% of boxes with two-decimal corners, and
    no width fixes it: the export's ``bbox_xyxy`` is read instead, unless ``bbox`` was edited."""
    from orchestrator.ingest.sources import read_coco

    rng = random.Random(1)
    boxes = []
    while len(boxes) < 50:
        x0, y0 = round(rng.uniform(0, 640), 2), round(rng.uniform(0, 480), 2)
        x1, y1 = round(x0 + rng.uniform(1, 640), 2), round(y0 + rng.uniform(1, 480), 2)
        if x0 + (x1 - x0) != x1:
            boxes.append([x0, y0, x1, y1])
    (tmp_path / "a.jpg").write_bytes(b"")
    anns = [{"id": k, "image_id": 1, "category_id": 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
             "bbox_xyxy": b} for k, b in enumerate(boxes)]
    anns.append({"id": 99, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "bbox_xyxy": [1, 1, 4, 4]})
    (tmp_path / "c.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                                 "categories": [{"id": 1, "name": "car"}], "annotations": anns}))
    got = [inst.bbox for inst in read_coco(tmp_path / "c.json", tmp_path).items[0].instances]
    assert got[:-1] == boxes  # bit for bit
    assert got[-1] == [1, 1, 6, 6]  # a box edited by another tool (stale corners) is read from bbox
