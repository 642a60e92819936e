"""stream: ordering and sharding, the blob cache, decoding and item building (no Ray, no store)."""

from __future__ import annotations

import hashlib
import io
import sys
import time

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from orchestrator.access.policy import ReadView
from orchestrator.access.redact import redact
from orchestrator.errors import ItemError
from orchestrator.manifest import LabelMap, base_field
from orchestrator.stream.cache import BlobCache, DiskLRU, MemoryLRU
from orchestrator.stream.decode import decode_image, rgb_pixels
from orchestrator.stream.item import ITEM_COLUMNS, ItemBlock
from orchestrator.stream.order import epoch_order, epoch_runs, shard_bounds, shard_runs
from tests.support.items import assert_same_item, reference_item


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


def _shards(groups, k, **kw):
    return [epoch_order(groups, shard_id=i, num_shards=k, **kw) for i in range(k)]


@settings(max_examples=200)
@given(st.lists(st.integers(1, 90), min_size=0, max_size=12), st.integers(1, 12), st.booleans(),
       st.integers(0, 3))
def test_shards_are_disjoint_balanced_and_cover_everything(group_sizes, k, shuffle, seed):
    groups = np.repeat(np.arange(len(group_sizes)), group_sizes)
    n = len(groups)
    parts = _shards(groups, k, shuffle=shuffle, seed=seed, epoch=1, run=8, buffer=32)
    flat = np.concatenate(parts)
    assert sorted(flat.tolist()) == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    # Deterministic in (seed, epoch, shard_id, num_shards).
    again = _shards(groups, k, shuffle=shuffle, seed=seed, epoch=1, run=8, buffer=32)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    if not shuffle:  # contiguous ranges
        assert all(np.array_equal(p, np.arange(*shard_bounds(n, i, k))) for i, p in enumerate(parts))
    with pytest.raises(ValueError):
        epoch_order(groups, shuffle=shuffle, seed=seed, epoch=0, shard_id=k, num_shards=k)


@settings(max_examples=100)
@given(st.integers(1, 40), st.integers(2, 6), st.integers(0, 9))
def test_each_shard_is_whole_runs_except_at_most_two_cut_ones(groups_of_64, k, seed):
    """Runs are 16 adjacent items (row groups of 64 start at multiples of 16): each shard holds
    every item of its runs except for at most two runs (its first and last) it shares with a
    neighbour; across all shards at most k - 1 runs are cut."""
    groups = np.repeat(np.arange(groups_of_64), 64)
    parts = _shards(groups, k, shuffle=True, seed=seed, epoch=2, window=2, run=16, buffer=64)
    cut_total = 0
    for part in parts:
        runs, counts = np.unique(part // 16, return_counts=True)
        cut = int(np.sum(counts < 16))
        assert cut <= 2, (runs[counts < 16], counts[counts < 16])
        cut_total += cut
    assert cut_total <= 2 * (k - 1)
    cut_runs = {r for part in parts for r, c in zip(*np.unique(part // 16, return_counts=True)) if c < 16}
    assert len(cut_runs) <= k - 1


def test_sharding_keeps_the_single_reader_buffers():
    """A shard's items are the first (or second) half of the epoch's run sequence, permuted
    within their buffers."""
    groups = np.repeat(np.arange(8), 256)
    runs = epoch_runs(groups, shuffle=True, seed=5, epoch=2, window=4, run=64, buffer=256)
    assert runs.lengths.sum() == len(groups) and np.all(np.diff(runs.buffers) >= 0)
    half = shard_runs(runs, 0, 2)
    first = epoch_order(groups, shuffle=True, seed=5, epoch=2, window=4, run=64, buffer=256,
                        shard_id=0, num_shards=2)
    assert sorted(first.tolist()) == sorted(p for s, e in zip(half.starts, half.ends) for p in range(s, e))
    assert len(first) == 1024 and not np.array_equal(first, np.sort(first))


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

    # A fresh process-level cache over the same directory hits on disk, once this one's writer
    # thread has written the entries (``drain`` waits for it; a process does so at exit).
    assert cache.disk is not None
    cache.disk.drain()
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
    assert disk.size() <= 250
    assert disk.get(_blob(0)[0]) is None  # oldest went first
    assert disk.get(_blob(2)[0]) is not None


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


@pytest.mark.parametrize("size", [(1, 1), (343, 240), (20000, 3), (3, 20000)])
def test_rgb_pixels_equal_numpys_view_of_the_image(size):
    """One-piece packing gives the bytes ``np.asarray`` gives (wide rows: one piece > 64 KB)."""
    rng = np.random.default_rng(size[0])
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    want = np.asarray(img)
    got = rgb_pixels(img)
    assert got.shape == want.shape == (size[1], size[0], 3) and got.dtype == np.uint8
    assert np.array_equal(got, want) and got.flags.c_contiguous
    assert np.array_equal(rgb_pixels(img.convert("L")), np.asarray(img.convert("L")))  # not RGB: as numpy


def test_decode_of_garbage_is_an_item_error_naming_the_item():
    with pytest.raises(ItemError, match="'img7'"):
        decode_image(b"not an image", "img7")


_SCHEMA = pa.schema([base_field(c) for c in ITEM_COLUMNS])
_LABELS = LabelMap(("person", "car", "rainy"))


def _block(rows: list[dict], label_map: LabelMap = _LABELS, view: ReadView | None = None) -> ItemBlock:
    """A block of manifest rows (missing columns null), redacted for ``view`` as the reader does."""
    full = [{"blob": "0" * 64, "width": 10, "height": 8, **r} for r in rows]
    return ItemBlock(redact(pa.Table.from_pylist(full, schema=_SCHEMA), view), label_map)


def test_item_block_aligns_boxes_labels_and_polygons():
    row = {"item_id": "x", "tags": ["night"], "attributes": [("a", "1")],
           "instances": [
               {"label": "car", "kind": "box", "bbox": [0, 0, 2, 2], "polygon": []},
               {"label": "rainy", "kind": "tag", "bbox": [], "polygon": []},
               {"label": "person", "kind": "polygon", "bbox": [1, 1, 3, 3], "polygon": [1, 1, 3, 1, 3, 3]},
           ]}
    item = _block([row]).item(0, None, 4)
    assert item["boxes"].shape == (2, 4) and item["boxes"].dtype == np.float32
    assert item["labels"].tolist() == [1, 0] and item["labels"].dtype == np.int64
    assert item["label_names"] == ["car", "person"] and item["instance_tags"] == ["rainy"]
    assert [p.tolist() for p in item["polygons"]] == [[], [1, 1, 3, 1, 3, 3]]
    assert item["attributes"] == {"a": "1"} and item["version"] == 4
    assert_same_item(item, reference_item({"width": 10, "height": 8, **row}, None, _LABELS, 4))


def test_item_block_edge_cases_equal_the_row_by_row_items():
    box = {"label": "car", "kind": "box", "bbox": [0, 0, 2, 2], "polygon": None,
           "attributes": [("occluded", "yes"), ("owner", "x")]}
    tag = {"label": "rainy", "kind": "tag", "bbox": None, "polygon": None, "attributes": None}
    poly = {"label": "person", "kind": "polygon", "bbox": [1, 1, 3, 3], "polygon": [1, 1, 3, 1, 3, 3],
            "attributes": []}
    rows = [
        {"item_id": "none", "instances": None, "tags": None, "attributes": None},
        {"item_id": "empty", "instances": [], "tags": [], "attributes": []},
        {"item_id": "tags-only", "instances": [tag, {**tag, "label": "car"}], "tags": ["a", "b"]},
        {"item_id": "polygon-only", "instances": [poly], "attributes": [("camera", "c1"), ("site", "s")]},
        {"item_id": "mixed", "instances": [tag, box, poly, box], "tags": ["z"]},
        {"item_id": "last", "instances": [box], "width": None, "height": None},
    ]
    block = _block(rows)
    assert len(block) == len(rows) == len(block.rows())
    image = np.zeros((8, 10, 3), np.uint8)
    items = [r.item(image, 7) for r in block.rows()]
    for item, row in zip(items, rows, strict=True):
        want = reference_item({"width": 10, "height": 8, **row}, image, _LABELS, 7)
        assert_same_item(item, want)
    assert items[2]["instance_tags"] == ["rainy", "car"] and items[2]["boxes"].shape == (0, 4)
    assert [p.tolist() for p in items[4]["polygons"]] == [[], [1, 1, 3, 1, 3, 3], []]
    # Items own their boxes, labels and attribute dicts: changing one changes no other item.
    items[4]["boxes"] += 1
    items[4]["instance_attributes"][0]["occluded"] = "no"
    again = block.item(4, None, 7)
    assert again["boxes"][0].tolist() == [0, 0, 2, 2] and again["instance_attributes"][0]["occluded"] == "yes"
    assert [(r.item_id, r.blob, r.pack, r.pack_offset) for r in block.rows()][0] == ("none", "0" * 64, None, None)
    assert ItemBlock(pa.Table.from_pylist([], schema=_SCHEMA), _LABELS).rows() == []


def test_item_block_redacted_attributes_are_absent():
    view = ReadView(row_filter=None, hidden_fields=frozenset({"attributes.site", "instances.attributes.owner"}))
    inst = {"label": "car", "kind": "box", "bbox": [0, 0, 2, 2], "attributes": [("occluded", "y"), ("owner", "x")]}
    block = _block([{"item_id": "a", "instances": [inst, inst], "attributes": [("site", "s"), ("camera", "c")]}],
                   view=view)
    item = block.item(0, None, 0)
    assert item["attributes"] == {"camera": "c"}
    assert item["instance_attributes"] == [{"occluded": "y"}, {"occluded": "y"}]


def test_item_block_refuses_an_instance_without_a_box_for_that_item_only():
    good = {"label": "car", "kind": "box", "bbox": [0, 0, 2, 2]}
    rows = [{"item_id": "ok", "instances": [good]},
            {"item_id": "no-box", "instances": [good, {"label": "person", "kind": "polygon", "bbox": None,
                                                       "polygon": [1, 1, 3, 1, 3, 3]}]},
            {"item_id": "short-box", "instances": [{**good, "bbox": [1, 2]}]},
            {"item_id": "unknown", "instances": [{**good, "label": "bus"}]},
            {"item_id": "after", "instances": [good]}]
    block = _block(rows)
    assert block.item(0, None, 0)["boxes"].tolist() == [[0, 0, 2, 2]]
    for k, what in ((1, "bbox of 0 numbers"), (2, "bbox of 2 numbers"), (3, "'bus' is not in the version's label map")):
        with pytest.raises(ItemError, match=what) as caught:
            block.item(k, None, 0)
        assert rows[k]["item_id"] in str(caught.value) and caught.value.reason == "unreadable"
    assert block.item(4, None, 0)["labels"].tolist() == [1]


def test_item_block_reads_string_view_columns():
    """delta-rs may write ``string_view``: the block casts to the schema's types first."""
    rows = [{"item_id": "v", "tags": ["t"], "instances": [
        {"label": "car", "kind": "box", "bbox": [0, 0, 2, 2], "attributes": [("k", "v")]},
        {"label": "rainy", "kind": "tag"}]}]
    table = pa.Table.from_pylist([{"blob": "0" * 64, "width": 1, "height": 1, **r} for r in rows], schema=_SCHEMA)
    view_inst = pa.list_(pa.struct([pa.field("label", pa.string_view()), pa.field("kind", pa.string_view()),
                                    pa.field("bbox", pa.list_(pa.float64())),
                                    pa.field("polygon", pa.list_(pa.float64())),
                                    pa.field("attributes", pa.map_(pa.string_view(), pa.string_view()))]))
    for name, kind in (("item_id", pa.string_view()), ("instances", view_inst), ("tags", pa.list_(pa.string_view()))):
        i = table.column_names.index(name)
        table = table.set_column(i, pa.field(name, kind), table.column(i).cast(kind))
    item = ItemBlock(table, _LABELS).item(0, None, 0)
    assert item["id"] == "v" and item["labels"].tolist() == [1] and item["instance_tags"] == ["rainy"]
    assert item["instance_attributes"] == [{"k": "v"}] and item["tags"] == ["t"]


_instance = st.fixed_dictionaries({
    "label": st.sampled_from(["person", "car", "rainy"]),
    "kind": st.sampled_from(["box", "polygon", "tag"]),
    "bbox": st.lists(st.integers(0, 50).map(float), min_size=4, max_size=4),
    "polygon": st.one_of(st.none(), st.lists(st.floats(0, 50, width=32), max_size=8)),
    "attributes": st.one_of(st.none(), st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from(["1", "2"])),
                                                max_size=2, unique_by=lambda kv: kv[0])),
})


@settings(max_examples=60, deadline=None)
@given(st.lists(st.fixed_dictionaries({
    "instances": st.one_of(st.none(), st.lists(_instance, max_size=5)),
    "tags": st.one_of(st.none(), st.lists(st.sampled_from(["day", "night"]), max_size=2)),
    "attributes": st.lists(st.tuples(st.sampled_from("xy"), st.just("v")), max_size=2, unique_by=lambda kv: kv[0]),
}), min_size=1, max_size=6), st.integers(0, 5), st.integers(0, 5))
def test_item_block_equals_row_by_row_items_on_any_slice(rows, start, length):
    rows = [{"item_id": f"i{k}", **r} for k, r in enumerate(rows)]
    table = pa.Table.from_pylist([{"blob": "0" * 64, "width": 10, "height": 8, **r} for r in rows], schema=_SCHEMA)
    start = min(start, len(rows))
    part = table.slice(start, length)  # a run inside a row group: Arrow offsets not at 0
    block = ItemBlock(part, _LABELS)
    for k, row in enumerate(part.to_pylist()):
        assert_same_item(block.item(k, None, 2), reference_item(row, None, _LABELS, 2))


def test_collate_items_uses_the_batch_layout():
    import torch

    from orchestrator.adapters.torch import collate_items, to_tensors

    row = {"item_id": "a", "width": 5, "height": 4, "tags": [], "attributes": [],
           "instances": [{"label": "car", "kind": "box", "bbox": [0, 0, 2, 2], "polygon": None},
                         {"label": "car", "kind": "polygon", "bbox": [0, 0, 3, 3], "polygon": [0, 0, 3, 0, 3, 3]}]}
    block = _block([row, {**row, "item_id": "b", "instances": []}], LabelMap(("car",)))
    a, b = (to_tensors(block.item(k, np.zeros((4, 5, 3), np.uint8), 0)) for k in range(2))
    batch = collate_items([a, b])
    assert batch["image"].shape == (2, 4, 5, 3)
    assert batch["boxes"].shape == (2, 4) and batch["instance_offsets"].tolist() == [0, 2, 2]
    assert batch["polygon_offsets"].tolist() == [0, 0, 6] and batch["id"] == ["a", "b"]
    c = dict(a, image=torch.zeros((6, 5, 3), dtype=torch.uint8))
    assert isinstance(collate_items([a, c])["image"], list)
    assert isinstance(batch["boxes"], torch.Tensor)


@pytest.mark.parametrize("env", [None, "4"])
def test_importing_the_package_caps_malloc_arenas_unless_the_user_did(env):
    """``stream.memory.limit_arenas`` runs at ``import orchestrator`` (glibc here), once; a
    ``MALLOC_ARENA_MAX`` in the environment is the user's choice and is left alone."""
    import os
    import subprocess
    import sys

    code = ("import orchestrator, orchestrator.stream.memory as m; "
            "print(m.limit_arenas.cache_info().hits, m.limit_arenas.cache_info().misses, m.limit_arenas())")
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    if env is not None:
        environ["MALLOC_ARENA_MAX"] = env
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, check=True)
    assert out.stdout.split() == ["0", "1", "True" if env is None else "False"]


_MMAP_PROBE = """
import ctypes, sys
import orchestrator.stream.memory as m
libc = ctypes.CDLL("libc.so.6")
class MI(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                              "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = MI
pinned = m.fix_mmap_threshold() if sys.argv[1] == "pin" else False
big = bytearray(8 << 20)  # freed: glibc raises its dynamic threshold past 8 MiB unless pinned
del big
before = libc.mallinfo2().hblkhd
image = bytearray(512 << 10)
print(pinned, libc.mallinfo2().hblkhd - before >= 512 << 10)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
@pytest.mark.parametrize("mode", ["pin", "user", "off"])
def test_a_read_worker_keeps_images_out_of_the_heap_arenas(mode):
    """``stream.memory.fix_mmap_threshold`` (each Ray read task): after a large buffer is freed, an
    image-sized one is still its own mapping (glibc's dynamic threshold would put it in a heap
    arena, whose free space then grew every epoch); a threshold the user set is left alone."""
    import os
    import subprocess

    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    if mode == "user":
        environ["MALLOC_MMAP_THRESHOLD_"] = str(64 << 20)
    out = subprocess.run([sys.executable, "-c", _MMAP_PROBE, "pin" if mode != "off" else "off"],
                         capture_output=True, text=True, env=environ, check=True)
    assert out.stdout.split() == {"pin": ["True", "True"], "user": ["False", "False"],
                                  "off": ["False", "False"]}[mode]


@pytest.mark.parametrize("items", [0, 1, 31, 32, 100, 1000, 3000, 10_001])
def test_ray_read_tasks_cover_the_slice_once_in_order_small_ones_first(items):
    """``read_spans``: every position once, in order; a block-sized task per concurrent slot first
    (the first batch need not wait for a whole task), then larger ones, and an even last round
    (no slot works alone at the end)."""
    from orchestrator.adapters.ray import FIRST_TASK_ITEMS, TASK_ITEMS, read_spans

    concurrency = 2
    spans = read_spans(items, concurrency)
    assert np.array_equal(np.concatenate(spans) if spans else np.arange(0), np.arange(items))
    assert (items == 0) == (spans == [])
    sizes = [len(s) for s in spans]
    assert all(n > 0 for n in sizes)
    planned = [FIRST_TASK_ITEMS] * 2 + [2 * FIRST_TASK_ITEMS] * 2 + [TASK_ITEMS] * items
    last = len(sizes) - min(concurrency, len(sizes))
    assert sizes[:last] == planned[:last]
    tail = sizes[last:]
    assert max(tail, default=0) - min(tail, default=0) <= 1 and max(tail, default=0) <= max(planned[last], 1)
    assert len(tail) == concurrency or sum(tail) <= FIRST_TASK_ITEMS


def test_ray_read_tasks_of_the_demo_dataset():
    from orchestrator.adapters.ray import read_spans

    assert [len(s) for s in read_spans(3000, 2)] == [32, 32, 64, 64, 512, 512, 512, 512, 380, 380]
    assert [len(s) for s in read_spans(100, 2)] == [32, 32, 18, 18]
