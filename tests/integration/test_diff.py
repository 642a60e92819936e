"""Knowing what changed: ``ds.diff`` / ``orchestrator diff`` between versions (known edits of
every part), the same query on every version, and the query typos that now get help."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

import orchestrator
from orchestrator.errors import QueryError
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _item(i: int, image: str, **extra) -> dict:
    doc = {"item_id": f"item-{i}", "path": f"images/{image}", "tags": ["day"], "attributes": {"city": "oslo"},
           "instances": [{"label": "car", "bbox": [1, 1, 20, 20], "attributes": {"color": "red"}},
                         {"label": "person", "polygon": [30, 30, 40, 30, 35, 45]}]}
    doc.update(extra)
    return doc


def _write(folder: Path, docs: list[dict]) -> Path:
    path = folder / "items.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


@pytest.fixture
def edited(store_uri, demo_small, tmp_path):
    """Version 0: six items. Version 1: each edit below, one per item, by one JSONL ingest.
    Version 2: item-5 deleted."""
    (tmp_path / "images").mkdir()
    images = sorted(p.name for p in (demo_small / "images").iterdir())[:7]
    for name in images:
        shutil.copyfile(demo_small / "images" / name, tmp_path / "images" / name)
    base = [_item(i, images[i]) for i in range(6)]
    store = orchestrator.connect(store_uri)
    store.ingest("things", jsonl=_write(tmp_path, base))
    edits = [dict(d) for d in base]
    edits[0]["instances"] = [dict(base[0]["instances"][0], label="truck"), base[0]["instances"][1]]  # relabel
    edits[1]["instances"] = [dict(base[1]["instances"][0], bbox=[2, 2, 22, 22]), base[1]["instances"][1]]  # move
    edits[2]["instances"] = [base[2]["instances"][0],
                             dict(base[2]["instances"][1], polygon=[30, 30, 41, 30, 35, 46])]  # reshape
    edits[3] = dict(base[3], tags=["night"], attributes={"city": "bergen"})  # tags and attributes
    edits[4] = dict(base[4], path=f"images/{images[6]}")  # other image bytes
    edits[5]["instances"] = [dict(base[5]["instances"][0], attributes={"color": "blue"}),
                             base[5]["instances"][1]]  # an instance attribute
    edits.append(_item(6, images[5]))  # a new item
    report = store.ingest("things", jsonl=_write(tmp_path, edits))
    assert (report.version, report.changed, report.unchanged) == (1, 7, 0)
    store.delete("things", ["item-5"])
    return store


def test_diff_names_every_kind_of_edit_and_the_label_totals(edited):
    diff = edited.dataset("things", 0).diff(edited.dataset("things", 1))
    assert diff.added == ("item-6",) and diff.removed == () and diff.rows.unchanged == 0
    parts = {c.item_id: c.parts for c in diff.changed}
    assert parts == {"item-0": ("labels",), "item-1": ("boxes",), "item-2": ("polygons",),
                     "item-3": ("tags", "attributes"), "item-4": ("image",), "item-5": ("instance_attributes",)}
    assert {c.item_id: c.label_deltas for c in diff.changed}["item-0"] == {"car": -1, "truck": 1}
    assert diff.rows.label_totals == {"car": (6, 6), "person": (6, 7), "truck": (0, 1)}
    # The delete: one item removed, its instances gone from the totals.
    later = edited.dataset("things", 1).diff(edited.dataset("things", 2))
    assert (later.removed, later.added, later.changed) == (("item-5",), (), ())
    assert later.rows.label_deltas == {"car": -1, "person": -1}


def test_diff_of_one_slice_and_the_cli(edited, store_uri):
    cars = edited.dataset("things", 0).slice("labels.truck = 0").diff(
        edited.dataset("things", 1).slice("labels.truck = 0"))
    assert cars.removed == ("item-0",)  # it left the slice: relabelled to a truck
    r = run_cli("diff", "things", "0", "1", "--store", store_uri, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["counts"] == {"added": 1, "removed": 0, "changed": 6, "unchanged": 0}
    assert doc["label_totals"]["truck"] == {"before": 0, "after": 1, "delta": 1}
    r = run_cli("diff", "things", "1", "--store", store_uri)  # to the latest
    assert r.returncode == 0 and "1 -> 2" in r.stdout and "removed: item-5" in r.stdout, r.stdout


def test_one_query_runs_on_every_version_and_typos_get_help(edited):
    # truck first appears in version 1: in version 0 it counts 0 (pushed down nowhere, read as 0).
    assert len(edited.dataset("things", 0).slice("labels.truck >= 1")) == 0
    assert len(edited.dataset("things", 0).slice("labels.truck = 0")) == 6
    assert edited.dataset("things", 1).slice("labels.truck >= 1").item_ids() == ["item-0"]
    with pytest.raises(QueryError, match="unknown label 'truk'") as err:
        edited.dataset("things", 0).slice("labels.truk >= 1")
    assert "did you mean 'truck'" in str(err.value)
    with pytest.raises(QueryError, match="did you mean labels.car"):
        edited.dataset("things").slice("lables.car > 1")
    with pytest.raises(QueryError, match="no item of this version has the attribute 'cty'") as err:
        edited.dataset("things").slice("attributes.cty = 'oslo'")
    assert "did you mean 'city'" in str(err.value)
    assert edited.dataset("things").attribute_keys() == ["city"]


def test_an_image_in_a_new_file_with_the_same_bytes_is_not_a_change(store_uri, demo_small, tmp_path):
    """Only content counts: the same bytes under another file name, re-ingested, change nothing."""
    (tmp_path / "images").mkdir()
    name = sorted(p.name for p in (demo_small / "images").iterdir())[0]
    shutil.copyfile(demo_small / "images" / name, tmp_path / "images" / "renamed.jpg")
    with Image.open(tmp_path / "images" / "renamed.jpg") as img:
        assert img.size
    store = orchestrator.connect(store_uri)
    store.ingest("one", jsonl=_write(tmp_path, [_item(0, "renamed.jpg")]))
    again = store.ingest("one", jsonl=_write(tmp_path, [_item(0, "renamed.jpg")]))
    assert (again.committed, again.changed) == (False, 0)
