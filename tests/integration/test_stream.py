"""Streaming on both backends: pixels, exactly-once iteration, DataLoader workers and ranks,
Keras on tf.data, Ray Data stages, the cache across epochs, and missing or corrupt blobs."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

import orchestrator
from orchestrator.errors import ItemError
from orchestrator.stream.cache import BlobCache
from tests.support.items import assert_same_item, reference_item

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _pillow(demo: Path, item_id: str) -> np.ndarray:
    with Image.open(demo / "images" / item_id) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


def _exif_rotated(demo: Path) -> list[str]:
    out = []
    for f in sorted((demo / "images").iterdir()):
        with Image.open(f) as img:
            if img.getexif().get(0x0112, 1) != 1:
                out.append(f.name)
    return out


def test_random_access_equals_pillow_pixel_for_pixel(street, demo_small):
    ds = street.dataset("street", cache=BlobCache(memory_budget=1 << 30))
    assert len(ds) == 60
    by_id = {ds[i]["id"]: i for i in range(len(ds))}
    rotated = _exif_rotated(demo_small)
    doc = json.loads((demo_small / "annotations.json").read_text())
    for name in [*rotated, "street_000000.jpg", "street_000059.jpg"]:
        item = ds[by_id[name]]
        expected = _pillow(demo_small, name)
        assert item["image"].dtype == np.uint8 and item["image"].shape == expected.shape
        assert np.array_equal(item["image"], expected)
        meta = next(i for i in doc["images"] if i["file_name"] == name)
        assert (item["width"], item["height"]) == (meta["width"], meta["height"])
    assert ds[-1]["id"] == ds[59]["id"]
    with pytest.raises(IndexError):
        ds[60]
    item = ds[0]
    assert item["boxes"].shape == (len(item["labels"]), 4) and item["version"] == 0
    assert [ds.label_map.names[i] for i in item["labels"]] == item["label_names"]


def test_iteration_yields_every_item_once_in_stable_order(street):
    ds = street.dataset("street")
    first = [it["id"] for it in ds]
    assert len(first) == len(set(first)) == 60
    assert [it["id"] for it in ds] == first  # stable
    shuffled = [it["id"] for it in ds.iter_items(shuffle=True, seed=3, epoch=0)]
    assert sorted(shuffled) == sorted(first) and shuffled != first
    assert [it["id"] for it in ds.iter_items(shuffle=True, seed=3, epoch=0)] == shuffled
    assert [it["id"] for it in ds.iter_items(shuffle=True, seed=3, epoch=1)] != shuffled
    sl = ds.slice("labels.car > 3 and labels.pedestrian >= 1")
    assert sorted(it["id"] for it in sl) == sl.item_ids()


def test_dataloader_workers_and_ranks_see_each_item_exactly_once(street):
    from torch.utils.data import DataLoader

    from orchestrator.adapters.torch import collate_items

    ds = street.dataset("street")
    for epoch in (0, 1):
        torch_ds = ds.to_pytorch(shuffle=True, seed=7)
        torch_ds.set_epoch(epoch)
        loader = DataLoader(torch_ds, batch_size=4, num_workers=2, collate_fn=collate_items)
        ids = [i for batch in loader for i in batch["id"]]
        assert sorted(ids) == sorted(ds.item_ids()) and len(ids) == 60
        assert all(b["boxes"].shape[-1] == 4 for b in loader)

    ranks = []
    for rank in (0, 1):
        part = ds.to_pytorch(shuffle=True, seed=7, rank=rank, world_size=2)
        loader = DataLoader(part, batch_size=None, num_workers=2)
        ranks.append([item["id"] for item in loader])
        assert len(part) == 30 and len(ranks[-1]) == 30
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(ds.item_ids())


def test_batching_loader_reshuffles_per_epoch_in_persistent_workers(street):
    """``ds.dataloader``: persistent workers ship collated batches; every item once per epoch;
    ``set_epoch`` reaches the workers started in epoch 0 (the order of epoch 1 is the one a
    fresh loader makes for epoch 1), and their caches survive the epoch (no fetch in epoch 2)."""
    ds = street.dataset("street", cache=BlobCache(memory_budget=64 << 20))
    loader = ds.dataloader(batch_size=8, num_workers=2, shuffle=True, seed=7)
    assert loader.persistent_workers and loader.batch_size is None
    orders = []
    for epoch in (0, 1):
        loader.dataset.set_epoch(epoch)
        batches = list(loader)
        assert len(loader) == len(batches) == 8  # 30 items a worker: 8 + 8 + 8 + 6, twice
        assert all(len(b["id"]) <= 8 and b["instance_offsets"][-1] == len(b["boxes"]) for b in batches)
        orders.append([i for b in batches for i in b["id"]])
        assert sorted(orders[-1]) == sorted(ds.item_ids()) and len(orders[-1]) == 60
    assert orders[0] != orders[1]
    stats = loader.dataset.fetch_stats()
    assert stats["misses"] == 60 and stats["memory_hits"] == 60, stats
    fresh = street.dataset("street").dataloader(batch_size=8, num_workers=2, shuffle=True, seed=7)
    fresh.dataset.set_epoch(1)
    assert [i for b in fresh for i in b["id"]] == orders[1]


def test_a_loader_worker_ships_tensors_that_convert_without_warnings(street, monkeypatch):
    """What a DataLoader worker hands to DataLoader's ``default_convert`` is tensors already:
    converting the decoded images (read-only arrays over Pillow's bytes) there printed torch's
    "not writable" warning from every worker of the recommended loader."""
    import torch.utils.data._utils.collate as torch_collate

    import orchestrator.adapters.torch as torch_adapter

    class OneWorker:
        id, num_workers = 0, 1

    monkeypatch.setattr(torch_adapter, "get_worker_info", lambda: OneWorker())
    items = street.dataset("street").to_pytorch(batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for shipped in items:
            assert isinstance(shipped, torch_adapter.SharedBatch)
            assert not any(isinstance(v, np.ndarray) for v in shipped.values())
            assert all(isinstance(im, torch_adapter.torch.Tensor) for im in shipped["image"])
            torch_collate.default_convert(shipped)


def test_loader_batches_reuse_worker_segments_and_a_finished_loader_leaves_none_mapped(street):
    """The recommended loader ships batches in its workers' pooled segments (``adapters.segments``):
    a few per worker, mapped once, over two epochs; once the loader is gone (its workers exit),
    the main process unmaps them."""
    import gc

    from orchestrator.adapters import segments

    segments.sweep()
    before = segments.mapped_segments()
    ds = street.dataset("street")
    loader = ds.dataloader(batch_size=4, num_workers=2)
    for _ in range(2):
        assert sorted(i for b in loader for i in b["id"]) == sorted(ds.item_ids())
    ours = segments.mapped_segments() - before
    assert 2 <= len(ours) <= 2 * segments.POOL_SEGMENTS and len({pid for pid, _ in ours}) == 2  # 15 batches a worker
    del loader
    gc.collect()
    deadline = time.monotonic() + 30
    while segments.mapped_segments() & ours and time.monotonic() < deadline:
        time.sleep(0.2)
        segments.sweep()
    assert not segments.mapped_segments() & ours


def test_keras_trains_one_epoch_on_tf_data(street):
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import tensorflow as tf
    import tf_keras as keras

    ds = street.dataset("street").slice("labels.car >= 0")
    tfds = ds.to_tensorflow()
    spec = tfds.element_spec
    assert spec["image"].shape.as_list() == [None, None, 3] and spec["image"].dtype == tf.uint8
    ragged = next(iter(tfds.ragged_batch(8)))
    assert isinstance(ragged["boxes"], tf.RaggedTensor) and ragged["boxes"].shape[0] == 8
    padded = next(iter(tfds.map(lambda x: {"boxes": x["boxes"], "labels": x["labels"]})
                       .padded_batch(8, padding_values={"boxes": -1.0, "labels": np.int64(-1)})))
    assert padded["boxes"].shape[0] == 8 and padded["boxes"].shape[2] == 4

    n_labels = len(ds.label_map)

    def to_xy(x):
        image = tf.image.resize(tf.cast(x["image"], tf.float32) / 255.0, (32, 32))
        counts = tf.math.bincount(tf.cast(x["labels"], tf.int32), minlength=n_labels,
                                  maxlength=n_labels, dtype=tf.float32)
        return image, counts

    train = tfds.map(to_xy).batch(8).prefetch(2)
    model = keras.Sequential([
        keras.layers.Input((32, 32, 3)), keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(n_labels),
    ])
    model.compile(optimizer="adam", loss="mse")
    history = model.fit(train, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_to_ray_runs_scan_fetch_decode_stages(street, demo_small):
    ds = street.dataset("street").slice("labels.car > 3")
    rows = ds.to_ray().take_all()
    assert sorted(r["id"] for r in rows) == ds.item_ids()
    row = next(r for r in rows if r["id"] == "street_000000.jpg") if any(
        r["id"] == "street_000000.jpg" for r in rows) else rows[0]
    assert np.array_equal(row["image"], _pillow(demo_small, row["id"]))
    assert row["boxes"].shape == (len(row["labels"]), 4)


def test_second_epoch_fetches_nothing_and_a_small_cache_stays_in_budget(street):
    big = BlobCache(memory_budget=1 << 30)
    ds = street.dataset("street", cache=big)
    list(ds)
    first = big.stats.bytes_fetched
    assert first > 0 and big.stats.misses == 60
    list(ds)
    assert big.stats.bytes_fetched == first and big.stats.memory_hits >= 60

    budget = 200_000  # well under the ~1.4 MB of the 60 images
    small = BlobCache(memory_budget=budget)
    ds_small = street.dataset("street", cache=small)
    for _ in ds_small:
        assert small.memory.size <= budget
    assert small.stats.evictions > 0 and small.stats.bytes_fetched > budget


def _damage_loose(store: orchestrator.Store, demo: Path, tmp_path: Path) -> tuple[str, str]:
    """Loose: the first item's blob deleted, the second's overwritten. (missing id, corrupt id)."""
    store.ingest("street", coco=demo / "annotations.json", images=demo / "images", pack=False)
    rows = store.dataset("street").manifest_rows(["item_id", "blob"]).to_pylist()[:2]
    store.fs.delete_file(store.blobs("street").path(rows[0]["blob"]))
    with store.fs.open_output_stream(store.blobs("street").path(rows[1]["blob"])) as out:
        out.write(b"\xff\xd8 not really a jpeg")
    return rows[0]["item_id"], rows[1]["item_id"]


def _damage_packed(store: orchestrator.Store, demo: Path, tmp_path: Path) -> tuple[str, str]:
    """Packed (the default): the first item ingested after the others, so that its pack holds
    it alone, and that pack deleted; one byte flipped in the second item's bytes in the pack of
    the others. (missing id, corrupt id)."""
    doc = json.loads((demo / "annotations.json").read_text())
    alone = doc["images"][0]
    rest = dict(doc, images=doc["images"][1:],
                annotations=[a for a in doc["annotations"] if a["image_id"] != alone["id"]])
    (tmp_path / "rest.json").write_text(json.dumps(rest))
    store.ingest("street", coco=tmp_path / "rest.json", images=demo / "images")
    store.ingest("street", coco=demo / "annotations.json", images=demo / "images")  # adds the first
    # The second ingest commits only the new item (the others are unchanged): by id, not by row
    # order, which follows the manifest files' (random) names.
    by_id = {r["item_id"]: r for r in store.dataset("street").manifest_rows(["item_id", "pack", "pack_offset"])
             .to_pylist()}
    rows = [by_id.pop(alone["file_name"]), by_id[sorted(by_id)[0]]]
    assert rows[0]["pack"] != rows[1]["pack"]
    packs = store.handle.packs("street")
    store.fs.delete_file(packs.path(rows[0]["pack"]))
    path = packs.path(rows[1]["pack"])
    with store.fs.open_input_stream(path) as f:
        data = bytearray(f.read())
    data[rows[1]["pack_offset"] + 5] ^= 0xFF
    with store.fs.open_output_stream(path) as out:
        out.write(bytes(data))
    return rows[0]["item_id"], rows[1]["item_id"]


@pytest.mark.parametrize("damage, corrupt_message", [
    (_damage_loose, "is corrupt: its .* bytes do not hash to its name"),
    (_damage_packed, "are corrupt: the .* bytes at offset .* do not hash to blob"),
], ids=["loose", "packed"])
def test_missing_and_corrupt_blobs_skip_with_warning_or_raise(store_uri, demo_small, ray_cluster, tmp_path,
                                                             damage, corrupt_message):
    store = orchestrator.connect(store_uri)
    missing_id, corrupt_id = damage(store, demo_small, tmp_path)
    ds = store.dataset("street", cache=BlobCache(memory_budget=1))

    with pytest.warns(UserWarning, match="skipped") as caught:
        ids = [it["id"] for it in ds]
    assert len(ids) == 58 and missing_id not in ids and corrupt_id not in ids
    assert ds.skipped == 2
    # One summary per pass, not one warning per item: counts by reason and the first example.
    summaries = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(summaries) == 1, summaries
    assert "skipped 2 item(s)" in summaries[0] and "1 corrupt" in summaries[0] and "1 missing" in summaries[0]
    assert ds.skips.by_reason == {"missing": 1, "corrupt": 1}

    # The same skips, counted the same way, through DataLoader workers and through Ray stages.
    from torch.utils.data import DataLoader

    torch_ds = store.dataset("street", cache=BlobCache(memory_budget=1)).to_pytorch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # each worker warns with its own summary
        loaded = [it["id"] for it in DataLoader(torch_ds, batch_size=None, num_workers=2)]
    assert len(loaded) == 58 and torch_ds.skipped == 2
    ray_ds = store.dataset("street", cache=BlobCache(memory_budget=1))
    rows = [row["id"] for row in ray_ds.to_ray().iter_rows()]
    assert sorted(rows) == sorted(ids)
    assert ray_ds.skipped == 2 and ray_ds.skips.by_reason == {"missing": 1, "corrupt": 1}

    strict = store.dataset("street", cache=BlobCache(memory_budget=1), on_error="raise")
    order = strict.item_ids()
    first = min(missing_id, corrupt_id, key=order.index)  # iteration stops at the first damaged one
    with pytest.raises(ItemError, match=first.replace(".", r"\.")):
        list(strict)
    with pytest.raises(ItemError, match="is missing|pack .* is missing"):
        strict[order.index(missing_id)]
    position = order.index(corrupt_id)
    # The bytes are caught by the hash check before anyone tries to decode them.
    with pytest.raises(ItemError, match=corrupt_message) as bad:
        strict[position]
    assert bad.value.reason == "corrupt"


def test_reader_holds_row_groups_within_a_budget_not_the_manifest(store_uri, demo_small, monkeypatch):
    import pyarrow.parquet as pq

    import orchestrator.manifest as manifest_mod

    monkeypatch.setattr(manifest_mod, "ROW_GROUP_ROWS", 4)
    store = orchestrator.connect(store_uri)
    store.ingest("street", coco=demo_small / "annotations.json", images=demo_small / "images")
    ds = store.dataset("street")
    (path,) = ds.plan.snapshot.files
    groups = pq.ParquetFile(store.fs.open_input_file(path)).metadata.num_row_groups
    assert groups == 15  # 60 rows in groups of 4
    reader = ds.stream.rows
    reader.keep_bytes = 0  # past its byte budget, a reader keeps only a shuffle window's groups
    held = 0
    for _ in ds.iter_items(shuffle=True, seed=1):
        held = max(held, reader.stats()["row_groups_kept"])
    assert 1 <= held <= reader.keep_groups < groups
    # Within the budget (the default), a second pass reads no manifest row group again.
    reader.keep_bytes = 1 << 20
    kept = reader.stats()["row_groups_kept"]
    reads = []
    real_read = reader._read_group
    monkeypatch.setattr(reader, "_read_group", lambda f, g: (reads.append((f, g)), real_read(f, g))[1])
    first = [item["id"] for item in ds.iter_items(shuffle=True, seed=2)]
    assert len(reads) == groups - kept and reader.stats()["row_groups_kept"] == groups
    assert [item["id"] for item in ds.iter_items(shuffle=True, seed=2)] == first and len(reads) == groups - kept
    # Rows read a row group at a time (one columnar block each, in scattered order) are the
    # manifest's rows, and their items are the items built row by row from those rows.
    import numpy as np

    from orchestrator.stream.item import ITEM_COLUMNS

    manifest = {r["item_id"]: r for r in ds.plan.rows(ITEM_COLUMNS).table.to_pylist()}
    positions = np.random.default_rng(0).permutation(len(ds))
    blocked = reader.rows(positions)
    assert len({id(r.block) for r in blocked}) == groups  # one block per row group
    for got in [*blocked, *(reader.row(int(p)) for p in positions[:10])]:
        want = manifest[got.item_id]
        assert (got.blob, got.pack, got.pack_offset, got.size_bytes) == \
            (want["blob"], want["pack"], want["pack_offset"], want["size_bytes"])
        assert_same_item(got.item(None, ds.version), reference_item(want, None, ds.label_map, ds.version))
