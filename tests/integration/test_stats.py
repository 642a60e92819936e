"""``ds.stats()`` / ``orchestrator stats``: figures equal to counts made independently from the
source files (the COCO file and the images themselves), on both backends; no media is read. And
``ds.contact_sheet`` / ``orchestrator show``: each shown item drawn, its boxes in their label's
colour, only the shown items read."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageOps

import orchestrator
from orchestrator.stream.cache import BlobCache
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_stats_match_the_coco_file_and_the_images(street, demo_small, store_uri, tmp_path):
    doc = json.loads((demo_small / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in doc["categories"]}
    files = {im["id"]: im["file_name"] for im in doc["images"]}
    per_image = Counter(files[a["image_id"]] for a in doc["annotations"])
    instances = Counter(names[a["category_id"]] for a in doc["annotations"])
    images = Counter(names[c] for _, c in {(a["image_id"], a["category_id"]) for a in doc["annotations"]})
    sizes = []
    for name in files.values():
        with Image.open(demo_small / "images" / name) as img:
            sizes.append(ImageOps.exif_transpose(img).size)

    ds = street.dataset("street", cache=BlobCache(memory_budget=1 << 20))
    stats = ds.stats()
    assert stats.items == len(files) == 60
    assert {k: v["instances"] for k, v in stats.labels.items() if v["instances"]} == dict(instances)
    assert {k: v["images"] for k, v in stats.labels.items() if v["images"]} == dict(images)
    counts = [per_image.get(f, 0) for f in files.values()]
    assert stats.instances_per_image["histogram"] == dict(Counter(counts))
    assert stats.instances_per_image["max"] == max(counts)
    assert stats.image_width["max"] == max(w for w, _ in sizes)
    assert stats.image_height["min"] == min(h for _, h in sizes)
    widths = np.array([a["bbox"][2] for a in doc["annotations"]])
    assert stats.kinds.get("box", 0) + stats.kinds.get("polygon", 0) == len(doc["annotations"])
    assert stats.box_width["max"] <= widths.max() + 1e-6 and stats.box_width["min"] >= 0
    assert ds.cache_stats()["misses"] == 0  # the manifest alone

    r = run_cli("stats", "street", "--store", store_uri, "--json", "--query", "labels.car >= 1")
    assert r.returncode == 0, r.stderr
    doc_stats = json.loads(r.stdout)
    assert doc_stats["items"] == sum(1 for f in files.values()
                                     if any(names[a["category_id"]] == "car" and files[a["image_id"]] == f
                                            for a in doc["annotations"]))
    r = run_cli("stats", "street", "--store", store_uri, "--plot", str(tmp_path / "stats.png"))
    assert r.returncode == 0 and "instances per image" in r.stdout and "label" in r.stdout, r.stderr
    with Image.open(tmp_path / "stats.png") as img:
        assert img.size == (1500, 850) and len(img.getcolors(1 << 16) or []) > 10  # drawn, not blank


def test_stats_count_tags_and_attribute_values(store_uri, demo_small, tmp_path):
    (tmp_path / "images").mkdir()
    name = sorted(p.name for p in (demo_small / "images").iterdir())[0]
    (tmp_path / "images" / name).write_bytes((demo_small / "images" / name).read_bytes())
    lines = [{"item_id": f"i{k}", "path": f"images/{name}", "tags": ["night"] if k % 2 else ["day", "rain"],
              "attributes": {"city": ["oslo", "bergen", "oslo"][k % 3]}, "instances": []} for k in range(6)]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(d) + "\n" for d in lines))
    store = orchestrator.connect(store_uri)
    store.ingest("tagged", jsonl=tmp_path / "items.jsonl")
    stats = store.dataset("tagged").stats()
    assert stats.tags == {"day": 3, "night": 3, "rain": 3}
    assert stats.attributes == {"city": {"oslo": 4, "bergen": 2}}
    assert stats.instances_per_image["histogram"] == {0: 6} and stats.labels == {}


def test_contact_sheet_draws_each_shown_item_and_reads_only_those(street, store_uri, tmp_path):
    from orchestrator.sheet import BACKGROUND, CAPTION_PX, label_colour

    ds = street.dataset("street", cache=BlobCache(memory_budget=64 << 20))
    sheet = ds.contact_sheet(8, seed=3, columns=4, thumb=128)
    assert sheet.size == (4 * 128, 2 * (128 + CAPTION_PX))
    cells = sheet.info["cells"]
    assert len(cells) == 8 and len({c["id"] for c in cells}) == 8
    assert ds.cache_stats()["misses"] == 8  # the items shown, no other
    boxes = 0
    for cell in cells:
        inside = sheet.crop((cell["x"], cell["y"], cell["x"] + cell["width"], cell["y"] + cell["height"]))
        assert len(inside.getcolors(1 << 16) or []) > 50  # a picture, not the background
        for drawn in cell["drawn"]:
            x0, y0, x1, y1 = drawn["box"]
            if drawn["polygon"] or x1 - x0 < 6 or y1 - y0 < 6:
                continue
            edges = [((x0 + x1) / 2, y0), ((x0 + x1) / 2, y1), (x0, (y0 + y1) / 2), (x1, (y0 + y1) / 2)]
            colours = {sheet.getpixel((round(x), round(y))) for x, y in edges}
            assert label_colour(drawn["label"]) in colours, (cell["id"], drawn)
            boxes += 1
    assert boxes >= 8
    assert sheet.getpixel((sheet.width - 1, sheet.height - 1)) == BACKGROUND
    # The same sheet from the command line, and the stable colour of a label everywhere.
    r = run_cli("show", "street", "--store", store_uri, "--n", "8", "--seed", "3", "--columns", "4", "--thumb",
                "128", "--out", str(tmp_path / "sheet.png"))
    assert r.returncode == 0 and "8 items" in r.stdout, r.stderr
    with Image.open(tmp_path / "sheet.png") as img:
        assert img.size == sheet.size and np.array_equal(np.asarray(img.convert("RGB")), np.asarray(sheet))
    assert label_colour("car") == label_colour("car") != label_colour("truck")
