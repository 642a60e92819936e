"""stream.buffers: a Ray read worker's reused decode buffers and block arenas.

A buffer is reused only when nothing refers to it any more (an image, a view of it, an Arrow
block made from it); images decoded into the pool equal those decoded without it; a block's
images copied into an arena become Ray Data's image column without another copy. No store, no Ray
cluster (Ray Data's block builder is called directly).
"""

from __future__ import annotations

import io
import pickle
import resource

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from orchestrator.stream.buffers import BlockArena, BufferPool, arena_capacity, block_arenas, stacked_view
from orchestrator.stream.decode import decode_image


def _jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    with io.BytesIO() as out:
        Image.fromarray(pixels, "RGB").save(out, "JPEG", quality=85)
        return out.getvalue()


def test_a_pool_buffer_is_reused_only_once_nothing_refers_to_it():
    pool = BufferPool(max_buffers=2, granule=1 << 10)
    a = pool.take(1000)
    view = a[:10]
    del a
    b = pool.take(1000)  # the first is still referred to (by a view): a second buffer
    assert b.base is None and view.base is not b
    first = view.base.ctypes.data
    del view, b
    assert pool.take(1000).ctypes.data == first  # both free again: the first that fits
    c, d = pool.take(1000), pool.take(1000)
    e = pool.take(1000)  # the pool is full and every buffer is in use: a fresh, unpooled one
    assert len({id(c), id(d), id(e)}) == 3 and pool.nbytes == 2 * 1024
    assert pool.take(5000).nbytes == 5000  # none fits and the pool is full: unpooled
    assert pickle.loads(pickle.dumps(pool)).nbytes == 0


def test_an_arrow_array_keeps_its_buffer_out_of_the_pool():
    pool = BufferPool(max_buffers=4, granule=1 << 10)
    buf = pool.take(100)
    arrow = pa.py_buffer(buf[:100])
    del buf
    other = pool.take(100)
    assert arrow.address != other.ctypes.data  # in use by the Arrow buffer
    del other, arrow
    assert pool.take(100).ctypes.data in {b.ctypes.data for b in pool._buffers}


def test_images_decoded_into_the_pool_equal_plain_decodes():
    pool = BufferPool(max_buffers=3)
    blobs = [_jpeg(w, h, s) for s, (w, h) in enumerate([(333, 219), (97, 61), (640, 480), (333, 219)])]
    kept = []
    for data in blobs * 2:
        image = decode_image(data, buffers=pool)
        assert np.array_equal(image, decode_image(data))
        assert image.base is not None  # a view of a pool buffer
        kept.append(image)  # all still referred to: none reused underneath another
    for data, image in zip(blobs * 2, kept, strict=True):
        assert np.array_equal(image, decode_image(data))
    assert pool.allocated == 8 and pool.reused == 0
    del kept, image
    decode_image(blobs[2], buffers=pool)
    assert pool.reused == 1


@pytest.mark.parametrize("shapes", [[(48, 64, 3), (30, 20, 3), (48, 64, 3)], [(8, 8, 3)] * 5])
def test_a_blocks_images_in_an_arena_become_the_image_column_without_a_copy(shapes, monkeypatch):
    """``adapters.ray._block`` of items whose images were added to an arena column: the image
    column's bytes are the arena's (ragged: Ray's variable-shaped tensors; one shape: a stacked
    view), they read back equal, and the arena is reused only once the block is gone."""
    from ray.data.block import BlockAccessor

    import orchestrator.adapters.ray as ray_adapter

    monkeypatch.setattr(ray_adapter, "to_ray_row", lambda item, node: {"id": item["id"], "image": item["image"]})
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in shapes]
    arena = BlockArena(1 << 20)
    column = arena.column()
    items = [{"id": str(k), "image": column.add(image)} for k, image in enumerate(images)]
    table = ray_adapter._block(items, "node", None)
    busy = column.arena.ctypes.data  # (an address: a reference would keep the arena busy)
    addresses = [b.address for b in table.column("image").chunk(0).storage.flatten()[0].flatten().buffers()
                 if b is not None] if len(set(shapes)) > 1 else [
        b.address for b in table.column("image").chunk(0).storage.buffers() if b is not None]
    assert busy in addresses  # the arena's bytes, not a copy
    back = BlockAccessor.for_block(table).to_batch_format("numpy")["image"]
    for got, want in zip(back, images, strict=True):
        assert np.array_equal(got, want)
    del column, items, back, got
    assert arena.column().arena.ctypes.data != busy  # the block still uses the first arena
    del table
    assert arena.column().arena.ctypes.data == busy


def test_stacked_view_only_for_back_to_back_views_of_one_base():
    arena = np.arange(60, dtype=np.uint8)
    parts = [arena[i * 12:(i + 1) * 12].reshape(2, 2, 3) for i in range(5)]
    stacked = stacked_view(parts)
    assert stacked is not None and stacked.shape == (5, 2, 2, 3) and np.shares_memory(stacked, arena)
    assert np.array_equal(stacked, np.stack(parts))
    assert stacked_view([parts[0], parts[2]]) is None  # a gap
    assert stacked_view([parts[1], parts[0]]) is None  # out of order
    assert stacked_view([p.copy() for p in parts]) is None  # separate buffers


def _faults_writing(column_of: BlockArena, nbytes: int) -> int:
    image = np.ones(nbytes, dtype=np.uint8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    column_of.column().add(image)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_a_prefaulted_arena_takes_its_first_block_without_page_faults():
    """``prefault`` allocates the arenas and writes their pages, so the first block's copy (in
    a pipeline's first epoch) does not wait for the kernel to clear fresh pages; arenas already
    there (one may hold a block) are left alone. A fresh arena faults as it is first written."""
    size = 16 << 20
    fresh = BlockArena(size)
    fresh_faults = _faults_writing(fresh, size)
    warmed = BlockArena(size)
    assert warmed.prefault() == 2 * size and warmed.prefault() == 0
    warmed_faults = _faults_writing(warmed, size)
    assert warmed.reused == 1 and warmed.allocated == 0
    assert fresh_faults >= 4  # at least two 2 MiB huge pages, else thousands of 4 KiB ones
    assert warmed_faults < fresh_faults / 4


def test_a_process_keeps_block_arenas_of_one_capacity_at_a_time():
    """A read worker's arenas are shared by its tasks (and prefaulted by its warm-up); a task
    asking for another block size replaces them rather than keeping both."""
    one = block_arenas(arena_capacity(1 << 20))
    assert block_arenas(arena_capacity(1 << 20)) is one and one.capacity == (1 << 20) + (32 << 20)
    other = block_arenas(arena_capacity(2 << 20))
    assert other is not one and block_arenas(arena_capacity(2 << 20)) is other
    assert arena_capacity(10 << 30) == 512 << 20  # at most ARENA_MAX
