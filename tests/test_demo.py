"""Unit tests for orchestrator.dev.demo: determinism, COCO validity, label distribution, EXIF."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from orchestrator.dev import demo
from orchestrator.dev.demo import CATEGORIES, make_demo_data
from orchestrator.errors import ConfigError

N_BIG = 500


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "images").iterdir())}


def _counts(coco: dict) -> dict[int, Counter]:
    per: dict[int, Counter] = {im["id"]: Counter() for im in coco["images"]}
    for a in coco["annotations"]:
        per[a["image_id"]][a["category_id"]] += 1
    return per


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo500")
    path = make_demo_data(out, N_BIG, seed=0)
    return out, json.loads(path.read_text())


def test_same_seed_gives_identical_bytes_and_json(tmp_path: Path) -> None:
    a = make_demo_data(tmp_path / "a", 25, seed=7)
    b = make_demo_data(tmp_path / "b", 25, seed=7)
    assert a == tmp_path / "a" / "annotations.json"
    assert a.read_bytes() == b.read_bytes()
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(fa) == 25 and fa == fb
    make_demo_data(tmp_path / "c", 25, seed=8)
    assert _files(tmp_path / "c") != fa


def test_prefix_property(tmp_path: Path) -> None:
    small = json.loads(make_demo_data(tmp_path / "s", 20, seed=3).read_text())
    large = json.loads(make_demo_data(tmp_path / "l", 40, seed=3).read_text())
    fs, fl = _files(tmp_path / "s"), _files(tmp_path / "l")
    assert all(fl[name] == data for name, data in fs.items())
    assert large["images"][:20] == small["images"]
    assert [a for a in large["annotations"] if a["image_id"] <= 20] == small["annotations"]


def test_workers_match_single_process(tmp_path: Path) -> None:
    one = make_demo_data(tmp_path / "one", 30, seed=5, workers=1)
    two = make_demo_data(tmp_path / "two", 30, seed=5, workers=2)
    assert one.read_bytes() == two.read_bytes()
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_coco_structure(big: tuple[Path, dict]) -> None:
    out, coco = big
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [
        (1, "car"), (2, "pedestrian"), (3, "traffic light"), (4, "bicycle")
    ]
    assert coco["categories"] == [dict(c) for c in CATEGORIES]
    images = {im["id"]: im for im in coco["images"]}
    assert len(images) == N_BIG
    for i, im in enumerate(coco["images"]):
        assert im["file_name"] == f"street_{i:06d}.jpg"
        assert (out / "images" / im["file_name"]).is_file()
        assert 240 <= im["width"] <= 640 and 240 <= im["height"] <= 640
        assert im["attributes"]["time_of_day"] in ("day", "night")
        assert im["attributes"]["weather"] in ("clear", "overcast", "rain", "fog")
    assert {im["attributes"]["time_of_day"] for im in coco["images"]} == {"day", "night"}
    assert sum(im["height"] > im["width"] for im in coco["images"]) > 0  # a few portrait

    ids = [a["id"] for a in coco["annotations"]]
    assert ids == list(range(1, len(ids) + 1))
    outside = 0
    for a in coco["annotations"]:
        im = images[a["image_id"]]
        assert a["category_id"] in (1, 2, 3, 4)
        assert a["iscrowd"] == 0
        x, y, w, h = a["bbox"]
        assert all(isinstance(v, int) for v in a["bbox"]) and w > 0 and h > 0
        slack = 8
        assert -slack <= x and -slack <= y and x + w <= im["width"] + slack and y + h <= im["height"] + slack
        outside += x < 0 or y < 0 or x + w > im["width"] or y + h > im["height"]
        assert a["area"] > 0
        if "segmentation" in a:
            (poly,) = a["segmentation"]
            assert len(poly) >= 6 and len(poly) % 2 == 0
            assert all(x <= px <= x + w for px in poly[0::2])
            assert all(y <= py <= y + h for py in poly[1::2])
            assert a["area"] <= w * h
        else:
            assert a["area"] == w * h
    assert 0 < outside <= 0.025 * len(coco["annotations"])  # a few to clip, ~1.5%
    assert any("segmentation" in a for a in coco["annotations"])

    per = _counts(coco)
    limits = {1: 8, 2: 5, 3: 3, 4: 3}
    for c in per.values():
        assert all(c[k] <= m for k, m in limits.items())
    for k, m in limits.items():  # each label reaches 0 and (nearly) its maximum somewhere
        seen = {c[k] for c in per.values()}
        assert 0 in seen and max(seen) >= m - 1


def test_query_selects_a_real_minority(big: tuple[Path, dict]) -> None:
    _, coco = big
    per = _counts(coco)
    frac = sum(c[1] > 3 and c[2] >= 1 for c in per.values()) / len(per)
    assert 0.10 <= frac <= 0.40, frac


def test_exif_oriented_images_transpose_to_coco_size(big: tuple[Path, dict]) -> None:
    out, coco = big
    rotated = 0
    for im in coco["images"]:
        with Image.open(out / "images" / im["file_name"]) as f:
            assert f.format == "JPEG"
            orientation = f.getexif().get(0x0112, 1)
            upright = ImageOps.exif_transpose(f)
        assert upright.size == (im["width"], im["height"])
        if orientation != 1:
            rotated += 1
            assert orientation in (3, 6, 8)
            if orientation in (6, 8):
                assert f.size == (im["height"], im["width"])
            # pixels: the transposed file matches the upright rendering (up to JPEG loss)
            ref, *_ = demo._render(0, im["id"] - 1)
            diff = np.abs(np.asarray(upright, np.int16) - np.asarray(ref, np.int16)).mean()
            assert diff < 6, (im["file_name"], orientation, diff)
    assert 2 <= rotated <= 0.08 * N_BIG


def _drawn_box(draw_fn, args: tuple, size: tuple[int, int]) -> tuple[list[int], dict]:
    """Draw an object twice on black and white canvases; the pixels that agree are the drawing."""
    canvases, ann = [], {}
    for bg in ((0, 0, 0), (255, 255, 255)):
        im = Image.new("RGB", size, bg)
        ann = draw_fn(random.Random(1234), ImageDraw.Draw(im), *args)
        canvases.append(np.asarray(im))
    ys, xs = np.nonzero((canvases[0] == canvases[1]).all(-1))
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)], ann


def test_boxes_tightly_enclose_drawn_objects() -> None:
    rng = random.Random(0)
    for _ in range(60):
        h = rng.randint(10, 140)
        car_w = round(h * rng.choice((1.2, 1.35, 1.9, 2.4)))
        ped_w = max(6, round(h * 0.4))
        bike_w = round(h * 1.7)
        for fn, args in (
            (demo._car, (20, 30, car_w, h, rng.random() < 0.5, rng.uniform(0.4, 1.1))),
            (demo._pedestrian, (20, 30, ped_w, h + 6, rng.uniform(0.4, 1.1))),
            (demo._bicycle, (20, 30, bike_w, h + 2, rng.uniform(0.4, 1.1))),
        ):
            got, ann = _drawn_box(fn, args, (420, 220))
            assert got == ann["bbox"] == list(args[:4]), (fn.__name__, args)


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    for kwargs in ({"n": -1}, {"n": 3, "seed": -2}, {"n": 3, "workers": 0}):
        with pytest.raises(ConfigError):
            make_demo_data(tmp_path, **kwargs)
    empty = json.loads(make_demo_data(tmp_path / "empty", 0).read_text())
    assert empty["images"] == [] and empty["annotations"] == [] and len(empty["categories"]) == 4
