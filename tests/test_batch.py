"""stream.batch: the one batch layout (flat values + offsets) and its exact inverse; the torch
conversion of it (no Ray, no store)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.stream.batch import BATCH_FIELDS, collate, uncollate
from tests.support.items import assert_same_item

LABELS = ("car", "person", "truck")


def _item(rng: np.random.Generator, n: int, *, image: tuple[int, int] | None = (4, 5), k: int = 0) -> dict:
    """An item as ``ItemBlock.item`` builds it, with ``n`` instances: some with a polygon, some
    with none (a box only), every one with a box."""
    polygons = [rng.random(2 * int(rng.integers(3, 6))).astype(np.float32) if rng.random() < 0.5
                else np.zeros(0, np.float32) for _ in range(n)]
    labels = rng.integers(0, len(LABELS), n)
    return {
        "id": f"item-{k}",
        "image": None if image is None else rng.integers(0, 256, (*image, 3), dtype=np.uint8),
        "boxes": rng.random((n, 4)).astype(np.float32),
        "labels": labels.astype(np.int64),
        "label_names": [LABELS[i] for i in labels],
        "polygons": polygons,
        "instance_attributes": [{"occluded": str(rng.random() < 0.5)} if rng.random() < 0.5 else {}
                                for _ in range(n)],
        "instance_tags": ["blurry"] if rng.random() < 0.3 else [],
        "tags": ["day"] if rng.random() < 0.5 else [],
        "attributes": {"camera": str(k)},
        "width": image[1] if image else 7,
        "height": image[0] if image else 9,
        "version": 3,
    }


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=12), st.integers(0, 2**32 - 1), st.booleans())
def test_round_trip_is_exact_for_ragged_items(counts, seed, same_size):
    """Zero-instance items, instances with and without polygons, any mix: uncollate(collate(x))
    gives back x field by field."""
    rng = np.random.default_rng(seed)
    items = [_item(rng, n, image=(4, 5) if same_size else (4 + k % 3, 5), k=k) for k, n in enumerate(counts)]
    batch = collate(items)
    assert tuple(batch) == BATCH_FIELDS
    back = uncollate(batch)
    assert len(back) == len(items)
    for got, want in zip(back, items, strict=True):
        assert_same_item(got, want)


def test_offsets_dtypes_and_shapes():
    rng = np.random.default_rng(0)
    items = [_item(rng, 2, k=0), _item(rng, 0, k=1), _item(rng, 3, k=2)]
    items[0]["polygons"] = [np.arange(6, dtype=np.float32), np.zeros(0, np.float32)]  # polygon, box only
    items[2]["polygons"] = [np.zeros(0, np.float32), np.arange(8, dtype=np.float32), np.arange(4, dtype=np.float32)]
    b = collate(items)
    assert b["instance_offsets"].tolist() == [0, 2, 2, 5] and b["instance_offsets"].dtype == np.int64
    assert b["polygon_offsets"].tolist() == [0, 6, 6, 6, 14, 18] and b["polygon_offsets"].dtype == np.int64
    assert b["boxes"].shape == (5, 4) and b["boxes"].dtype == np.float32
    assert b["labels"].shape == (5,) and b["labels"].dtype == np.int64
    assert b["polygon_coords"].shape == (18,) and b["polygon_coords"].dtype == np.float32
    assert np.array_equal(b["boxes"][2:5], items[2]["boxes"])
    assert b["label_names"] == items[0]["label_names"] + items[2]["label_names"]
    assert len(b["instance_attributes"]) == 5
    for key in ("width", "height", "version"):
        assert b[key].dtype == np.int64 and b[key].shape == (3,)
    assert b["id"] == ["item-0", "item-1", "item-2"]
    assert [len(t) for t in b["tags"]] == [len(i["tags"]) for i in items]
    assert b["attributes"] == [i["attributes"] for i in items]


def test_images_of_one_shape_stack_others_stay_a_list():
    rng = np.random.default_rng(1)
    same = collate([_item(rng, 1, k=0), _item(rng, 1, k=1)])
    assert isinstance(same["image"], np.ndarray) and same["image"].shape == (2, 4, 5, 3)
    assert same["image"].dtype == np.uint8
    mixed = collate([_item(rng, 1, image=(4, 5), k=0), _item(rng, 1, image=(6, 5), k=1)])
    assert isinstance(mixed["image"], list) and [im.shape for im in mixed["image"]] == [(4, 5, 3), (6, 5, 3)]
    undecoded = collate([_item(rng, 1, image=None, k=0), _item(rng, 0, image=None, k=1)])
    assert undecoded["image"] == [None, None]
    assert [it["image"] for it in uncollate(undecoded)] == [None, None]


def test_only_zero_instance_items():
    rng = np.random.default_rng(2)
    items = [_item(rng, 0, k=k) for k in range(3)]
    b = collate(items)
    assert b["boxes"].shape == (0, 4) and b["labels"].shape == (0,) and b["polygon_coords"].shape == (0,)
    assert b["instance_offsets"].tolist() == [0, 0, 0, 0] and b["polygon_offsets"].tolist() == [0]
    for got, want in zip(uncollate(b), items, strict=True):
        assert_same_item(got, want)


def test_empty_batch_is_well_formed():
    b = collate([])
    assert b["id"] == [] and b["image"] == [] and b["boxes"].shape == (0, 4)
    assert b["instance_offsets"].tolist() == [0] and b["polygon_offsets"].tolist() == [0]
    assert b["width"].shape == (0,) and b["width"].dtype == np.int64
    assert uncollate(b) == []


def test_collate_names_an_item_it_cannot_batch():
    rng = np.random.default_rng(3)
    good = _item(rng, 2, k=0)
    with pytest.raises(ValueError, match="'item-1'.*no polygons"):
        collate([good, {k: v for k, v in _item(rng, 1, k=1).items() if k != "polygons"}])
    with pytest.raises(ValueError, match="'item-2'.*2 boxes but 1 labels"):
        collate([good, {**_item(rng, 2, k=2), "labels": np.zeros(1, np.int64)}])


def test_uncollate_refuses_offsets_that_do_not_fit():
    b = collate([_item(np.random.default_rng(4), 2, k=0)])
    with pytest.raises(ValueError, match="not a well-formed batch"):
        uncollate({**b, "instance_offsets": np.array([0, 3], np.int64)})
    with pytest.raises(ValueError, match="not a well-formed batch"):
        uncollate({**b, "polygon_offsets": b["polygon_offsets"][:-1]})


def test_torch_batch_shares_memory_and_round_trips():
    torch = pytest.importorskip("torch")
    from orchestrator.adapters.torch import batch_to_numpy, batch_to_torch, collate_items, to_tensors

    rng = np.random.default_rng(5)
    items = [_item(rng, n, k=k) for k, n in enumerate((3, 0, 1))]
    b = collate(items)
    t = batch_to_torch(b)
    tensors = [k for k, v in t.items() if isinstance(v, torch.Tensor)]
    assert sorted(tensors) == sorted(["width", "height", "version", "image", "instance_offsets", "boxes",
                                      "labels", "polygon_offsets", "polygon_coords"])
    assert t["boxes"].data_ptr() == b["boxes"].__array_interface__["data"][0]  # no copy
    assert t["image"].shape == (3, 4, 5, 3) and t["image"].dtype == torch.uint8
    for got, want in zip(uncollate(batch_to_numpy(t)), items, strict=True):
        assert_same_item(got, want)
    # collate_items (the per-item path's collate_fn) gives the same layout from tensor items.
    c = collate_items([to_tensors(it) for it in items])
    assert set(c) == set(BATCH_FIELDS)
    assert torch.equal(c["instance_offsets"], t["instance_offsets"]) and torch.equal(c["boxes"], t["boxes"])
    assert torch.equal(c["polygon_coords"], t["polygon_coords"])
    mixed = batch_to_torch(collate([_item(rng, 1, image=(4, 5), k=0), _item(rng, 1, image=(6, 5), k=1)]))
    assert isinstance(mixed["image"], list) and all(isinstance(im, torch.Tensor) for im in mixed["image"])


@pytest.mark.parametrize("images", ["stacked", "list", "list with None", "tensors"])
def test_a_worker_batch_crosses_processes_in_one_shared_buffer(images):
    """``SharedBatch``: what a DataLoader worker puts on its queue (ForkingPickler) arrives as
    the same batch, every array a writable tensor viewing one shared storage."""
    torch = pytest.importorskip("torch")
    import pickle
    from multiprocessing.reduction import ForkingPickler

    pytest.importorskip("torch.multiprocessing")  # registers its tensor reductions with ForkingPickler
    from orchestrator.adapters.torch import SharedBatch, batch_to_numpy, batch_to_torch

    rng = np.random.default_rng(11)
    shapes = {"stacked": [(4, 5)] * 3}.get(images, [(4, 5), (6, 3), (2, 7)])
    items = [_item(rng, n, image=shape, k=k) for k, (n, shape) in enumerate(zip((3, 0, 2), shapes, strict=True))]
    if images == "list with None":
        items[1]["image"] = None
    batch = collate(items)
    if images == "tensors":  # a transform's output: tensors (any dtype), not numpy arrays
        batch = batch_to_torch(batch)
        batch["boxes"] = batch["boxes"].to(torch.bfloat16).to(torch.float32)  # exact in bf16 after this
        batch["features"] = batch["boxes"].to(torch.bfloat16)
    got = pickle.loads(ForkingPickler.dumps(SharedBatch(batch)))
    assert type(got) is dict and list(got) == list(batch)
    arrays = [v for v in got.values() if isinstance(v, torch.Tensor)]
    arrays += [im for im in got["image"] if isinstance(im, torch.Tensor)] if isinstance(got["image"], list) else []
    assert len({a.untyped_storage().data_ptr() for a in arrays}) == 1 and all(a.is_shared() for a in arrays)
    if images == "list with None":
        assert got["image"][1] is None
    if images == "tensors":
        assert got["features"].dtype == torch.bfloat16 and torch.equal(got["features"], batch["features"])
        del got["features"]
        for item in items:
            item["boxes"] = torch.from_numpy(item["boxes"]).to(torch.bfloat16).to(torch.float32).numpy()
    got["boxes"][:] = 0  # writable
    for back, want in zip(uncollate(batch_to_numpy(got)), items, strict=True):
        assert_same_item(back, {**want, "boxes": np.zeros_like(want["boxes"])})


@pytest.mark.parametrize("n", [0, 7, 61, 200])
def test_torch_len_counts_this_ranks_items_or_batches_exactly(n):
    """``len`` is what the rank's workers yield: the sum of their shards' sizes (items), or of
    their shards' batch counts, computed from the same shard bounds the readers use."""
    pytest.importorskip("torch")
    from orchestrator.adapters.torch import TorchItems
    from orchestrator.errors import ConfigError
    from orchestrator.stream.order import epoch_order

    groups = np.zeros(n, np.int64)
    for world, workers, batch in ((1, 1, 8), (2, 3, 8), (3, 2, 5)):
        for rank in range(world):
            shards = [epoch_order(groups, shuffle=True, seed=0, epoch=0, shard_id=rank * workers + w,
                                  num_shards=world * workers) for w in range(workers)]
            items = TorchItems(None, size=n, rank=rank, world_size=world)  # type: ignore[arg-type]
            assert len(items) == sum(len(s) for s in shards)
            batched = TorchItems(None, size=n, rank=rank, world_size=world, batch_size=batch)  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="num_workers"):
                len(batched)
            batched.loader_workers = workers
            assert len(batched) == sum(-(-len(s) // batch) for s in shards)
    with pytest.raises(ConfigError, match="batch_size"):
        TorchItems(None, batch_size=0)  # type: ignore[arg-type]


def test_a_worker_reuses_its_shared_segments_and_never_overwrites_a_batch_still_held(monkeypatch):
    """``adapters.segments``: in a DataLoader worker a batch is written into a pooled segment; the
    main process maps it once (the descriptor travels with the first batch only) and the worker
    lends it again only once every view of the batch in it is gone. With every segment held,
    batches still arrive intact (a fresh segment each)."""
    pytest.importorskip("torch")
    import gc
    import pickle
    from multiprocessing.reduction import ForkingPickler

    import orchestrator.adapters.torch as torch_adapter
    from orchestrator.adapters import segments

    class InWorker:
        id, num_workers = 0, 1

    monkeypatch.setattr(torch_adapter, "get_worker_info", lambda: InWorker())
    monkeypatch.setattr(segments, "_pool", None)  # this test's own pool
    rng = np.random.default_rng(5)

    def batch(k: int) -> dict:
        return collate([_item(rng, n, image=(40 + k, 30), k=k) for n in (2, 0, 3)])

    def ship(b: dict) -> tuple[segments.SegmentRef | None, dict]:
        reduced = torch_adapter.SharedBatch(b).__reduce__()
        if reduced[0] is torch_adapter._unpack_lent:  # unpickled here as the main process would
            return reduced[1][0], reduced[0](*reduced[1])
        return None, pickle.loads(ForkingPickler.dumps(torch_adapter.SharedBatch(b)))

    def same(got: dict, want: dict) -> bool:
        return all(np.array_equal(np.asarray(g), w) for g, w in zip(got["image"], want["image"], strict=True)) and \
            np.array_equal(got["boxes"].numpy(), want["boxes"])

    first, second = batch(0), batch(1)
    ref1, got1 = ship(first)
    ref2, got2 = ship(second)
    assert ref1.id != ref2.id and ref1.fd is not None and ref2.fd is not None  # got1 still held: another segment
    assert same(got1, first) and same(got2, second)
    view = got1["image"][0]
    del got1
    gc.collect()
    third = batch(2)
    ref3, got3 = ship(third)
    assert ref3.id not in (ref1.id,)  # a view of batch 1 is still alive: its segment stays lent
    assert same(got2, second) and same(got3, third)
    del view, got2, got3
    gc.collect()
    fourth = batch(3)
    ref4, got4 = ship(fourth)
    assert ref4.id in (ref1.id, ref2.id, ref3.id) and ref4.fd is None  # reused, mapped already: no descriptor
    assert same(got4, fourth)
    more = [batch(k) for k in range(4, 4 + segments.POOL_SEGMENTS)]
    shipped = [ship(b) for b in more]  # the consumer keeps every batch
    refs = [ref for ref, _ in shipped]
    assert sum(ref is not None for ref in refs) == segments.POOL_SEGMENTS - 1  # the pool fills up ...
    assert refs[-1] is None and all(t.is_shared() for t in shipped[-1][1]["image"])  # ... then fresh segments
    assert same(got4, fourth) and all(same(got, want) for (_, got), want in zip(shipped, more, strict=True))
