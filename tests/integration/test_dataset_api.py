"""Edges of the Dataset API, both backends: ``item_ids()`` lists ids in ``ds[i]`` order,
``ds.get(item_id)`` reads one item by id, ``ds[i:j]`` and ``ds[[i, j]]`` give lists of items,
``store.dataset``'s version must be an int, and ``delete`` names its result."""

from __future__ import annotations

import json

import numpy as np
import pytest

import orchestrator
from orchestrator.errors import ConfigError, DatasetNotFound
from tests.conftest import run_cli
from tests.support.tiny_manifest import commit_items


@pytest.fixture
def unsorted(store_uri) -> orchestrator.Store:
    """Rows out of id order within a file, and across three files (one per version)."""
    store = orchestrator.connect(store_uri)
    commit_items(store, "d", ["m", "c", "x"])
    commit_items(store, "d", ["b", "z"])
    commit_items(store, "d", ["a", "y"])
    return store


def test_item_ids_follow_the_positions_of_ds_i(unsorted):
    ds = unsorted.dataset("d")
    ids = ds.item_ids()
    assert sorted(ids) == ["a", "b", "c", "m", "x", "y", "z"]
    assert [ds[i]["id"] for i in range(len(ds))] == ids
    assert [it["id"] for it in ds] == ids
    for x in ("c", "y"):
        assert ds[ids.index(x)]["id"] == x
    sl = ds.slice("labels.car >= 1")  # the second row of each commit on
    sl_ids = sl.item_ids()
    assert set(sl_ids) == {"c", "x", "z", "y"} and [sl[i]["id"] for i in range(len(sl))] == sl_ids


def test_get_reads_one_item_by_id_within_the_slice(unsorted):
    ds = unsorted.dataset("d")
    for x in ("m", "z", "a"):
        item = ds.get(x)
        assert item["id"] == x and item["image"].shape == (2, 2, 3) and item["version"] == 2
    assert ds.slice("labels.car >= 1").get("c")["id"] == "c"
    with pytest.raises(DatasetNotFound, match="has no item 'm' matching"):
        ds.slice("labels.car >= 1").get("m")  # in the dataset, not in the slice
    with pytest.raises(KeyError, match="has no item \"it's\""):
        ds.get("it's")
    assert unsorted.dataset("d", version=0).get("m")["version"] == 0
    with pytest.raises(DatasetNotFound):
        unsorted.dataset("d", version=0).get("z")  # added in version 1
    with pytest.raises(TypeError):
        ds.get(3)


@pytest.mark.parametrize("version", [True, False, "0", 1.0, [0]])
def test_dataset_version_must_be_an_int(unsorted, version):
    with pytest.raises(ConfigError, match="version must be a version number"):
        unsorted.dataset("d", version=version)


def test_dataset_version_accepts_numpy_integers(unsorted):
    assert unsorted.dataset("d", version=np.int64(1)).version == 1
    assert unsorted.dataset("d", version=0).version == 0


def test_a_pickled_read_plan_reads_the_same_slice(unsorted):
    """The read plan is what crosses into Ray tasks and DataLoader workers: unpickled, it holds
    no client or row, and a reader built from it sees the same version and rows, even after a
    later commit."""
    import pickle

    from orchestrator.stream.reader import ItemStream

    sl = unsorted.dataset("d").slice("labels.car >= 1")
    blob = pickle.dumps(sl.plan)
    commit_items(unsorted, "d", ["q"])  # a new version: the plan stays pinned
    plan = pickle.loads(blob)
    assert plan.version == sl.version and plan.handle == unsorted.handle
    assert [it["id"] for it in ItemStream(plan).iter_items()] == sl.item_ids()
    assert len(blob) < 20_000  # a snapshot's file list and a compiled query, not rows


def test_slices_and_lists_of_positions_give_items_in_that_order(unsorted):
    ds = unsorted.dataset("d")
    ids = ds.item_ids()
    assert [it["id"] for it in ds[1:4]] == ids[1:4] and [it["id"] for it in ds[::-3]] == ids[::-3]
    assert [it["id"] for it in ds[[4, 0, -1]]] == [ids[4], ids[0], ids[-1]]
    assert [it["id"] for it in ds[np.array([2, 2])]] == [ids[2], ids[2]]
    assert ds[5:2] == [] and ds[[]] == []
    with pytest.raises(IndexError):
        ds[[0, 99]]
    with pytest.raises(TypeError, match="integers"):
        ds[[0.5]]
    with pytest.raises(TypeError, match="integers"):
        ds["a"]


def test_delete_names_its_result_and_the_cli_takes_the_dataset_like_every_command(unsorted, store_uri):
    done = unsorted.delete("d", ["m"])
    assert (done.version, done.deleted) == (3, 1) and done.as_dict() == {"version": 3, "deleted": 1}
    version, deleted = unsorted.delete("d", ["c"])  # still a pair
    assert (version, deleted) == (4, 1)
    r = run_cli("delete", "d", "--items", "x", "--store", store_uri, "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"dataset": "d", "version": 5, "deleted": 1}, r.stderr
    r = run_cli("delete", "--dataset", "d", "--items", "b", "--store", store_uri)  # the older spelling
    assert r.returncode == 0 and "deleted 1 items as version 6" in r.stdout, r.stderr
    r = run_cli("delete", "d", "--dataset", "e", "--items", "z", "--store", store_uri)
    assert r.returncode == 2 and "two dataset names" in r.stderr
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("orchestrator ")


def test_repr_shows_version_item_count_and_slice(unsorted, store_uri):
    assert repr(unsorted.dataset("d", 1)) == f"Dataset('d', version=1, items=5, store={store_uri!r})"
    sliced = unsorted.dataset("d").slice("file.item_id in ['a', 'b', 'q']")
    assert repr(sliced) == (f"Dataset('d', version=2, items=2, query=\"file.item_id in ['a', 'b', 'q']\", "
                            f"store={store_uri!r})")
