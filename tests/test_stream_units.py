"""stream: ordering and sharding, the blob cache, decoding and item building (no Ray, no store)."""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from orchestrator.errors import ItemError
from orchestrator.manifest import LabelMap
from orchestrator.stream.cache import BlobCache, DiskLRU, MemoryLRU
from orchestrator.stream.decode import decode_image
from orchestrator.stream.item import make_item
from orchestrator.stream.order import epoch_order, shard


@given(st.lists(st.integers(1, 9), min_size=0, max_size=30), st.integers(0, 5), st.integers(0, 3),
       st.integers(1, 5))
def test_epoch_order_is_a_deterministic_permutation(group_sizes, seed, epoch, window):
    groups = np.repeat(np.arange(len(group_sizes)), group_sizes)
    order = epoch_order(groups, shuffle=True, seed=seed, epoch=epoch, window=window)
    assert sorted(order.tolist()) == list(range(len(groups)))
    again = epoch_order(groups, shuffle=True, seed=seed, epoch=epoch, window=window)
    assert np.array_equal(order, again)
    assert np.array_equal(epoch_order(groups, shuffle=False, seed=seed, epoch=epoch),
                          np.arange(len(groups)))


def test_shuffle_changes_with_epoch_and_seed():
    groups = np.repeat(np.arange(20), 10)
    a = epoch_order(groups, shuffle=True, seed=0, epoch=0)
    assert not np.array_equal(a, epoch_order(groups, shuffle=True, seed=0, epoch=1))
    assert not np.array_equal(a, epoch_order(groups, shuffle=True, seed=1, epoch=0))


def test_shuffle_reads_whole_runs_so_a_buffer_costs_one_request_per_run():
    """Each buffer of the shuffled order is a handful of whole runs of adjacent items (adjacent
    in a pack), mixed: packed, a buffer is fetched with one range request per run."""
    from orchestrator.packs import plan_reads

    groups = np.repeat(np.arange(8), 256)  # 8 row groups of 256 items
    order = epoch_order(groups, shuffle=True, seed=5, epoch=2, window=4, run=64, buffer=256)
    assert sorted(order.tolist()) == list(range(len(groups)))
    for k in range(0, len(order), 256):
        buf = order[k:k + 256]
        runs = sorted({int(p) // 64 for p in buf})
        assert len(runs) == 4 and all(set(buf) >= set(range(r * 64, r * 64 + 64)) for r in runs)
        assert not np.array_equal(buf, np.sort(buf))  # items are mixed within the buffer
        reads = plan_reads([("p" * 64, int(p) * 1000, 1000) for p in buf], merge_gap=0)
        assert len(reads) <= 4
    # runs come from across the 4-group window, not one group at a time
    first = order[:256]
    assert len({int(p) // 256 for p in first}) >= 2


@settings(max_examples=200)
@given(st.integers(0, 200), st.integers(1, 12))
def test_shards_are_disjoint_balanced_and_cover_everything(n, k):
    order = np.random.default_rng(n).permutation(n)
    parts = [shard(order, i, k) for i in range(k)]
    flat = np.concatenate(parts) if parts else np.zeros(0)
    assert sorted(flat.tolist()) == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError):
        shard(order, k, k)


def test_memory_lru_keeps_its_byte_budget_and_evicts_oldest():
    lru = MemoryLRU(100)
    for i in range(10):
        lru.put(f"k{i}", bytes(30))
        assert lru.size <= 100
    assert lru.get("k9") is not None and lru.get("k0") is None
    lru.get("k7")  # refresh: k7 survives the next insert, k8 does not
    lru.put("new", bytes(30))
    assert lru.get("k7") is not None and lru.get("k8") is None
    assert lru.put("huge", bytes(101)) == 0 and lru.get("huge") is None


def test_cache_counts_hits_misses_and_bytes_and_second_pass_fetches_nothing(tmp_path):
    cache = BlobCache(memory_budget=1 << 20, disk_dir=tmp_path / "disk", disk_budget=1 << 20)
    fetched = []
    blobs = {hashlib.sha256(data).hexdigest(): data for data in (b"a" * 640, b"b" * 640)}

    def fetch(key):
        fetched.append(key)
        return blobs[key]

    for key in blobs:
        cache.get_or_fetch(key, lambda key=key: fetch(key))
    before = dict(cache.stats.as_dict())
    for key in blobs:
        cache.get_or_fetch(key, lambda key=key: fetch(key))
    assert before["misses"] == 2 and before["bytes_fetched"] == 1280
    assert cache.stats.bytes_fetched == before["bytes_fetched"] and len(fetched) == 2
    assert cache.stats.memory_hits == 2

    # A fresh process-level cache over the same directory hits on disk.
    other = BlobCache(memory_budget=1 << 20, disk_dir=tmp_path / "disk", disk_budget=1 << 20)
    key = next(iter(blobs))
    assert other.get_or_fetch(key, lambda: b"never") == blobs[key]
    assert other.stats.disk_hits == 1 and other.stats.bytes_fetched == 0


def _blob(i: int, size: int = 100) -> tuple[str, bytes]:
    data = i.to_bytes(4, "big") * (size // 4)
    return hashlib.sha256(data).hexdigest(), data


def test_disk_lru_evicts_least_recently_used_within_budget(tmp_path):
    disk = DiskLRU(tmp_path, budget=250)
    for i in range(3):
        disk.put(*_blob(i))
        time.sleep(0.01)
    disk.flush()
    assert disk.size() <= 250
    assert disk.get(_blob(0)[0]) is None  # oldest went first
    assert disk.get(_blob(2)[0]) is not None


def _hammer(directory: str, worker: int, budget: int) -> None:
    disk = DiskLRU(Path(directory), budget)
    rng = np.random.default_rng(worker)
    for _ in range(300):
        key, blob = _blob(int(rng.integers(0, 40)), 400)
        data = disk.get(key)
        if data is not None:
            assert data == blob, "read a torn or foreign entry"
        else:
            disk.put(key, blob)


def test_disk_cache_is_safe_across_processes(tmp_path):
    budget = 400 * 10
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), w, budget)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    leftovers = [f for f in tmp_path.rglob("*.tmp")]
    assert not leftovers
    assert DiskLRU(tmp_path, budget).trim() >= 0 and DiskLRU(tmp_path, budget).size() <= budget


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "1", "RGB"])
def test_decode_always_gives_hxwx3_uint8(mode):
    img = Image.new(mode, (7, 5))
    out = decode_image(_encode(img))
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8


def test_decode_applies_exif_orientation():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(_encode(img, "JPEG", exif=exif))
    assert out.shape == (40, 20, 3)


def test_decode_of_garbage_is_an_item_error_naming_the_item():
    with pytest.raises(ItemError, match="'img7'"):
        decode_image(b"not an image", "img7")


def test_make_item_aligns_boxes_labels_and_polygons():
    row = {"item_id": "x", "width": 10, "height": 8, "tags": ["night"], "attributes": [("a", "1")],
           "instances": [
               {"label": "car", "kind": "box", "bbox": [0, 0, 2, 2], "polygon": []},
               {"label": "rainy", "kind": "tag", "bbox": [], "polygon": []},
               {"label": "person", "kind": "polygon", "bbox": [1, 1, 3, 3], "polygon": [1, 1, 3, 1, 3, 3]},
           ]}
    item = make_item(row, None, LabelMap(("person", "car", "rainy")), 4)
    assert item["boxes"].shape == (2, 4) and item["boxes"].dtype == np.float32
    assert item["labels"].tolist() == [1, 0] and item["labels"].dtype == np.int64
    assert item["label_names"] == ["car", "person"] and item["instance_tags"] == ["rainy"]
    assert [p.tolist() for p in item["polygons"]] == [[], [1, 1, 3, 1, 3, 3]]
    assert item["attributes"] == {"a": "1"} and item["version"] == 4
    empty = make_item({**row, "instances": []}, None, LabelMap(()), 0)
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def test_collate_pads_varying_box_counts():
    import torch

    from orchestrator.adapters.torch import collate_items

    a = {"id": "a", "image": np.zeros((4, 5, 3), np.uint8), "boxes": np.ones((2, 4), np.float32),
         "labels": np.array([3, 1]), "tags": []}
    b = {"id": "b", "image": np.zeros((4, 5, 3), np.uint8), "boxes": np.zeros((0, 4), np.float32),
         "labels": np.zeros(0, np.int64), "tags": ["x"]}
    batch = collate_items([a, b])
    assert batch["image"].shape == (2, 4, 5, 3)
    assert batch["boxes"].shape == (2, 2, 4) and batch["num_boxes"].tolist() == [2, 0]
    assert batch["labels"].tolist() == [[3, 1], [-1, -1]] and batch["id"] == ["a", "b"]
    c = dict(a, image=np.zeros((6, 5, 3), np.uint8))
    assert isinstance(collate_items([a, c])["image"], list)
    assert isinstance(batch["boxes"], torch.Tensor)
