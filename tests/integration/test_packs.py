"""Packed media, both backends: ingest writes new media into packs and records where each item's
bytes are; every read path delivers the same items as from loose blobs; a sequential pass makes
one request per run of items; media the dataset holds are not stored again; loose and packed
rows mix in one dataset; a damaged pack is named per item."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pyarrow.fs as pafs
import pytest

import orchestrator
from orchestrator.errors import ItemError
from orchestrator.packs import PackStore
from orchestrator.scan import read_table
from orchestrator.stream.cache import BlobCache

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _ingest(store, name, demo, *, pack=True, pack_mb=1, coco=None):
    return store.ingest(name, coco=coco or demo / "annotations.json", images=demo / "images",
                        pack=pack, pack_mb=pack_mb)


def _rows(store, name):
    return read_table(store.location, store.manifest(name).snapshot()).to_pylist()


def _objects(store, name, kind):
    fs, base = store.fs, store.location.join("datasets", name, kind)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return {i.path: i.size for i in infos if i.type == pafs.FileType.File}


@pytest.fixture
def packed(store_uri, demo_small):
    store = orchestrator.connect(store_uri)
    report = _ingest(store, "street", demo_small)
    return store, report


def test_ingest_writes_packs_not_loose_blobs_and_rows_say_where(packed):
    store, report = packed
    rows = _rows(store, "street")
    packs = _objects(store, "street", "packs")
    assert len(rows) == 60 and report.blobs_uploaded == len({r["blob"] for r in rows})
    assert _objects(store, "street", "blobs") == {}
    assert len(packs) >= 2  # 60 images of ~20 KB in 1 MB packs
    assert sum(packs.values()) == sum(r["size_bytes"] for r in {r["blob"]: r for r in rows}.values())
    packstore = store.handle.packs("street")
    for r in rows:  # every row's range holds exactly its blob's bytes
        assert r["pack"] is not None and packstore.path(r["pack"]) in packs
        data = packstore.read_range(r["pack"], r["pack_offset"], r["pack_offset"] + r["size_bytes"])
        assert hashlib.sha256(data).hexdigest() == r["blob"]


def test_packed_and_loose_datasets_yield_identical_items(packed, demo_small):
    store, _ = packed
    _ingest(store, "loose", demo_small, pack=False)
    a, b = store.dataset("street"), store.dataset("loose")
    assert a.item_ids() == b.item_ids()
    items = {it["id"]: it for it in b}
    for it in a:  # sequential, coalesced
        ref = items.pop(it["id"])
        assert np.array_equal(it["image"], ref["image"]) and np.array_equal(it["boxes"], ref["boxes"])
    assert not items
    for i in (0, 17, 59):  # random access: one range each
        assert np.array_equal(a[i]["image"], b[i]["image"])
    shuffled = [it["id"] for it in a.iter_items(shuffle=True, seed=3)]
    assert sorted(shuffled) == sorted(a.item_ids())
    ray_ids = sorted(r["id"] for r in a.to_ray().take_all())
    assert ray_ids == sorted(a.item_ids())


def test_a_sequential_pass_makes_one_request_per_run_of_items(packed, monkeypatch):
    store, _ = packed
    calls = []
    real = PackStore.read_range

    def counting(self, pack, start, end):
        calls.append((pack, start, end))
        return real(self, pack, start, end)

    monkeypatch.setattr(PackStore, "read_range", counting)
    ds = store.dataset("street", cache=BlobCache(memory_budget=64 << 20))
    assert len(list(ds)) == 60
    packs = {r["pack"] for r in _rows(store, "street")}
    assert len(calls) == len(packs)  # each pack read in one request (1 MB packs, 8 MB requests)
    calls.clear()
    assert len(list(ds)) == 60 and calls == []  # the second epoch comes from the cache


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_dataloader_workers_fetch_each_packed_byte_once(packed, shuffle):
    """Workers shard by runs: each requests only its own items' ranges, so the bytes both
    workers' requests returned add up to the packs' bytes, once (dealt item by item, both
    would request the merged range of every pack: twice the bytes). Every item exactly once."""
    store, _ = packed
    ds = store.dataset("street", cache=BlobCache(memory_budget=64 << 20))
    loader = ds.dataloader(batch_size=8, num_workers=2, shuffle=shuffle, seed=1)
    ids = [i for batch in loader for i in batch["id"]]
    assert sorted(ids) == sorted(ds.item_ids()) and len(ids) == 60
    stats = loader.dataset.fetch_stats()
    rows = {r["blob"]: r["size_bytes"] for r in _rows(store, "street")}
    assert stats["bytes_fetched"] == sum(rows.values()) and stats["misses"] == len(rows)
    assert stats["bytes_requested"] == sum(_objects(store, "street", "packs").values()), stats
    assert stats["requests"] >= 2  # one or more per worker: both fetched


def test_media_already_in_the_dataset_are_not_stored_again(packed, demo_small, tmp_path):
    store, first = packed
    before = _objects(store, "street", "packs")
    again = _ingest(store, "street", demo_small)
    assert again.blobs_uploaded == 0 and again.blobs_reused == first.blobs_uploaded
    assert _objects(store, "street", "packs") == before
    # A new item whose bytes the dataset holds points at the existing bytes.
    doc = json.loads((demo_small / "annotations.json").read_text())
    image = {**doc["images"][0], "id": 10_000, "file_name": "copy.jpg"}
    (tmp_path / "images").mkdir()
    shutil.copy(demo_small / "images" / doc["images"][0]["file_name"], tmp_path / "images" / "copy.jpg")
    (tmp_path / "dup.json").write_text(json.dumps({**doc, "images": [image], "annotations": []}))
    third = store.ingest("street", coco=tmp_path / "dup.json", images=tmp_path / "images", pack=True)
    assert third.blobs_uploaded == 0 and third.blobs_reused == 1
    assert _objects(store, "street", "packs") == before
    rows = {r["item_id"]: r for r in _rows(store, "street")}
    copy, original = rows["copy.jpg"], rows[doc["images"][0]["file_name"]]
    assert (copy["pack"], copy["pack_offset"]) == (original["pack"], original["pack_offset"])


def test_loose_and_packed_rows_mix_in_one_dataset(store_uri, demo_small, tmp_path):
    store = orchestrator.connect(store_uri)
    doc = json.loads((demo_small / "annotations.json").read_text())
    half = tmp_path / "half.json"
    keep = {im["id"] for im in doc["images"][:30]}
    half.write_text(json.dumps({**doc, "images": doc["images"][:30],
                                "annotations": [a for a in doc["annotations"] if a["image_id"] in keep]}))
    _ingest(store, "mixed", demo_small, pack=False, coco=half)  # a store from before packs
    _ingest(store, "mixed", demo_small, pack=True)  # the rest packed; the first 30 stay loose
    rows = _rows(store, "mixed")
    assert sum(r["pack"] is None for r in rows) == 30 and sum(r["pack"] is not None for r in rows) == 30
    _ingest(store, "ref", demo_small, pack=False)
    ref = {it["id"]: it["image"] for it in store.dataset("ref")}
    got = {it["id"]: it["image"] for it in store.dataset("mixed")}
    assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref)


def test_a_damaged_pack_is_named_per_item(store_uri, demo_small, tmp_path):
    store = orchestrator.connect(store_uri)
    _ingest(store, "street", demo_small)
    rows = sorted(_rows(store, "street"), key=lambda r: (r["pack"], r["pack_offset"]))
    packstore = store.handle.packs("street")
    victim = rows[1]  # flip one byte inside the second item of the first pack
    path = packstore.path(victim["pack"])
    local = tmp_path / "pack"
    with store.fs.open_input_stream(path) as f:
        data = bytearray(f.read())
    data[victim["pack_offset"] + 5] ^= 0xFF
    local.write_bytes(bytes(data))
    with store.fs.open_output_stream(path) as out:
        out.write(local.read_bytes())
    ds = store.dataset("street", on_error="skip",
                       cache=BlobCache(memory_budget=64 << 20))
    with pytest.warns(UserWarning, match="skipped 1 item"):
        got = [it["id"] for it in ds]
    assert len(got) == 59 and victim["item_id"] not in got and dict(ds.skips.by_reason) == {"corrupt": 1}
    with pytest.raises(ItemError, match="corrupt") as err:
        ds[ds.item_ids().index(victim["item_id"])]
    assert err.value.reason == "corrupt" and victim["item_id"] in str(err.value)
    store.fs.delete_file(path)  # the whole pack gone: each of its items is missing
    lost = {r["item_id"] for r in rows if r["pack"] == victim["pack"]}
    fresh = store.dataset("street", on_error="skip", cache=BlobCache(memory_budget=1))
    with pytest.warns(UserWarning):
        left = {it["id"] for it in fresh}
    assert left == {r["item_id"] for r in rows} - lost and fresh.skips.by_reason["missing"] == len(lost)


def test_verify_checks_packed_bytes_and_reingest_restores_a_lost_pack(store_uri, demo_small):
    store = orchestrator.connect(store_uri)
    _ingest(store, "street", demo_small)
    assert store.verify("street", progress=False).ok
    rows = sorted(_rows(store, "street"), key=lambda r: (r["pack"], r["pack_offset"]))
    packstore = store.handle.packs("street")
    first, last = rows[0]["pack"], rows[-1]["pack"]
    assert first != last
    path = packstore.path(last)
    with store.fs.open_input_stream(path) as f:
        data = bytearray(f.read())
    victim = next(r for r in rows if r["pack"] == last)
    data[victim["pack_offset"]] ^= 0xFF
    with store.fs.open_output_stream(path) as out:
        out.write(bytes(data))
    store.fs.delete_file(packstore.path(first))
    report = store.verify("street", progress=False)
    lost = {r["item_id"] for r in rows if r["pack"] == first}
    problems = {item: (b.problem, b.pack) for b in report.bad for item in b.items}
    assert problems[victim["item_id"]] == ("wrong content", last)
    assert {i for i, (problem, pack) in problems.items() if problem == "missing"} == lost
    assert set(report.reingest) == lost | {victim["item_id"]} and not report.ok
    _ingest(store, "street", demo_small)  # the lost pack's media are packed again
    again = store.verify("street", progress=False)
    assert {i for b in again.bad for i in b.items} == {victim["item_id"]}


_SAME = ("item_id", "blob", "size_bytes", "media_type", "width", "height", "source_name", "instances",
         "labels", "attributes", "tags", "ingested_at")


def _items(ds) -> dict[str, tuple]:
    return {it["id"]: (it["image"].tobytes(), it["boxes"].tobytes(), tuple(it["label_names"])) for it in ds}


def test_optimize_packs_an_old_datasets_loose_blobs_into_identical_items(store_uri, demo_small):
    store = orchestrator.connect(store_uri)
    _ingest(store, "old", demo_small, pack=False)  # a dataset from before packs
    before_rows = {r["item_id"]: r for r in _rows(store, "old")}
    before = _items(store.dataset("old"))
    report = store.optimize("old", pack_mb=1)
    assert report.version == 1 and report.items_moved == 60 and report.loose_blobs_packed == 60
    after_rows = {r["item_id"]: r for r in _rows(store, "old")}
    assert after_rows.keys() == before_rows.keys()
    for item_id, row in after_rows.items():
        assert {k: row[k] for k in _SAME} == {k: before_rows[item_id][k] for k in _SAME}
        assert row["pack"] is not None
    assert _items(store.dataset("old")) == before  # same ids, same pixels and boxes
    assert _items(store.dataset("old", version=0)) == before  # the old version still reads
    assert store.optimize("old").version is None  # nothing left to do
    assert store.verify("old", progress=False).ok


def test_optimize_rewrites_packs_the_latest_version_mostly_no_longer_reads(store_uri, demo_small):
    store = orchestrator.connect(store_uri)
    _ingest(store, "thin", demo_small, pack_mb=64)  # one pack
    ids = store.dataset("thin").item_ids()
    store.delete("thin", ids[:45])  # three quarters of the pack's bytes are dead
    (old_pack,) = {r["pack"] for r in _rows(store, "thin")}
    before = _items(store.dataset("thin"))
    report = store.optimize("thin")
    assert report.packs_rewritten == 1 and report.items_moved == 15
    rows = _rows(store, "thin")
    (new_pack,) = {r["pack"] for r in rows}
    assert new_pack != old_pack
    assert store.handle.packs("thin").size(new_pack) == sum(r["size_bytes"] for r in
                                                           {r["blob"]: r for r in rows}.values())
    assert _items(store.dataset("thin")) == before


def test_vacuum_deletes_only_what_no_retained_version_reads(store_uri, demo_small, tmp_path):
    from datetime import timedelta

    store = orchestrator.connect(store_uri)
    _ingest(store, "v", demo_small, pack=False)  # v0: loose blobs
    store.optimize("v", pack_mb=1)  # v1: the same items, packed
    ids = store.dataset("v").item_ids()
    store.delete("v", ids[:10])  # v2: fewer items, same packs
    loose = _objects(store, "v", "blobs")
    packs = _objects(store, "v", "packs")
    assert len(loose) == 60 and packs

    young = store.vacuum("v", keep_versions=1, dry_run=True)  # default minimum age: one hour
    assert young.deleted == [] and young.kept_young == 60

    now = timedelta(0)
    listed = store.vacuum("v", keep_versions=1, dry_run=True, min_age=now)
    assert sorted(p for p, _ in listed.deleted) == sorted(loose) and listed.retained_versions == [2]
    assert _objects(store, "v", "blobs") == loose  # a dry run deletes nothing
    assert store.vacuum("v", keep_versions=3, min_age=now).deleted == []  # v0 still retained

    # A running training run pins version 0: its media stay.
    run = store.location.join("runs", "someone", "run-1", "lineage.json")
    if store.location.scheme == "file":
        store.fs.create_dir(run.rsplit("/", 1)[0], recursive=True)
    with store.fs.open_output_stream(run) as out:
        out.write(json.dumps({"run_id": "run-1", "status": "running", "dataset": "v", "version": 0}).encode())
    pinned = store.vacuum("v", keep_versions=1, min_age=now)
    assert pinned.deleted == [] and pinned.pinned_by_runs == [0] and pinned.retained_versions == [0, 2]
    store.fs.delete_file(run)

    done = store.vacuum("v", keep_versions=1, min_age=now)
    assert sorted(p for p, _ in done.deleted) == sorted(loose) and _objects(store, "v", "blobs") == {}
    assert _objects(store, "v", "packs") == packs
    assert len(list(store.dataset("v", on_error="raise"))) == 50  # the retained version reads whole
    old = store.dataset("v", version=0, on_error="raise", cache=BlobCache(memory_budget=1))
    with pytest.raises(ItemError) as gone:
        old[0]
    assert gone.value.reason == "missing"
    with pytest.raises(orchestrator.errors.ConfigError):
        store.vacuum("v")
    with pytest.raises(orchestrator.errors.ConfigError, match="duration"):
        store.vacuum("v", older_than="soon")
