"""Reused memory for a Ray read worker's decoded images: no fresh pages per image.

A Ray read worker pins glibc's mmap threshold (``stream.memory.fix_mmap_threshold``: without it the
freed images grew the heap arenas every epoch), so every image-sized allocation is a new mapping,
and every page of it a page fault when first written: the decoder's output (one per image) and the
block's image column (one per block, the images concatenated). ``BufferPool`` hands the decoder
buffers that are used again once nothing refers to them, and ``BlockArena`` keeps the contiguous
bytes a block's image column is copied into as its items arrive (``ArenaColumn``), so Ray Data
builds the column as a view of them (``ArrowVariableShapedTensorArray.from_numpy`` takes
contiguous views of one base without a copy) and Ray copies the block into its object store once.
Their pages are touched once per process, so the worker's memory is bounded and flat: at most
``BufferPool.max_buffers`` decode buffers and ``BlockArena.keep`` arenas.

Measured (3,000 demo items, 2 cores): ``adapters.ray.read_items`` run in one process as Ray runs it
(512-item tasks, each block held until the next is made), 4 passes: CPU 1.17-1.21 ms an item on
warm passes before, 0.83-0.95 after (1,309-1,355 items/s before, 1,771-2,066 after); the cold pass
1.55 -> 1.29 ms. The decode pool reused 2,903 of 2,919 buffers in the first pass (16 allocated,
16 MB); 2 arenas per process. The price is resident memory: the process's RssAnon 296-299 MB
before, 506-507 MB after (the two arenas' touched pages), flat over the passes. Through Ray
(``benchmarks/peers.py``, 3 rounds): ``to_ray().iter_batches`` warm 973 -> 1,229 items/s; cold
600 -> 668, where the read workers' system time is mostly first-touch faults of the object store's
fresh pages (cold epoch: 2.5-3.1 s of system time in the two workers, warm: 0.4-0.8 s).

When a buffer is free: a pool owns each buffer once; anything that uses it holds a reference to it
(numpy views and Arrow buffers made from them keep their base alive), so a buffer whose only
reference is the pool's is not in use. No caller has to hand a buffer back, and a consumer that
keeps an image (or a block) keeps its buffer out of the pool for as long as it does; when every
buffer is in use the pool allocates a fresh one (the old behaviour), never waits.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

__all__ = ["ARENA_MAX", "ARENA_SLACK", "ArenaColumn", "BlockArena", "BufferPool", "arena_capacity", "block_arenas",
           "prefault_block_arenas", "stacked_view"]

#: A block's images beyond Ray Data's target block size that its arena still holds
#: (``adapters.ray.read_items`` cuts a block after the image that passes the target), and the
#: largest arena.
ARENA_SLACK = 32 << 20
ARENA_MAX = 512 << 20

#: sys.getrefcount of an object referred to only by one list slot (the slot, and the call's argument).
_ONLY_THE_POOL = 2


def _free(buffers: list[np.ndarray], i: int) -> bool:
    return sys.getrefcount(buffers[i]) <= _ONLY_THE_POOL


class BufferPool:
    """Byte buffers (uint8 numpy arrays) for decoded images, reused once unreferenced.

    ``take(n)`` returns a buffer of at least ``n`` bytes (its first ``n`` are the caller's): the
    smallest free one that fits, else a new one (capacity rounded up to ``granule``) while the pool
    holds fewer than ``max_buffers``, else a fresh unpooled one. Thread-safe (decode threads share
    one pool). A pickled pool arrives empty."""

    def __init__(self, max_buffers: int = 48, granule: int = 1 << 20) -> None:
        self.max_buffers = max_buffers
        self.granule = granule
        self._buffers: list[np.ndarray] = []
        self._lock = threading.Lock()
        self.reused = 0
        self.allocated = 0

    def __reduce__(self) -> tuple[type[BufferPool], tuple[int, int]]:
        return type(self), (self.max_buffers, self.granule)

    def take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            best, best_size = -1, 0
            for i in range(len(self._buffers)):  # by index: a loop variable would hold a reference
                size = self._buffers[i].nbytes
                if size >= nbytes and (best < 0 or size < best_size) and _free(self._buffers, i):
                    best, best_size = i, size
            if best >= 0:
                self.reused += 1
                return self._buffers[best]
            self.allocated += 1
            capacity = -(-nbytes // self.granule) * self.granule
            if len(self._buffers) < self.max_buffers:
                self._buffers.append(np.empty(capacity, dtype=np.uint8))
                return self._buffers[-1]
            return np.empty(nbytes, dtype=np.uint8)

    @property
    def nbytes(self) -> int:
        """Bytes the pool holds (in use or free)."""
        with self._lock:
            return sum(b.nbytes for b in self._buffers)


class BlockArena:
    """Contiguous byte arenas for blocks' image columns, reused once unreferenced.

    ``column()`` starts a block's column in a free arena (else a new one while fewer than ``keep``
    exist, else an unpooled one): two, because Ray Data holds a task's last yielded block while the
    task builds its next one. ``capacity``: an arena's bytes (virtual until written)."""

    def __init__(self, capacity: int, keep: int = 2) -> None:
        self.capacity = capacity
        self.keep = keep
        self._arenas: list[np.ndarray] = []
        self.reused = 0
        self.allocated = 0

    def prefault(self) -> int:
        """Allocate the ``keep`` arenas now and write every page of each (zeros); returns the
        bytes touched. Arenas that exist already are left as they are (one may hold a block).

        Why: a fresh arena's pages are cleared by the kernel the first time they are written,
        in the middle of a pipeline's first epoch. ``perf`` over a cold ``to_ray`` epoch (3,000
        full-size images, 2 cores, a VM): ``clear_page_erms`` under the arena copy was 17.5% of
        the machine's samples, 30% of the read tasks'; the read workers' system time 2.3 s of
        5.5 s cold against 0.3 of 3.0 warm (here a fresh 2 MiB huge page costs ~6 ms to
        clear: ~1 s for a worker's two arenas). Done while the worker warms up
        (``ray_runtime.warm_up``), that epoch writes into pages that exist, as a warm one does:
        ``benchmarks/peers.py`` (SeaweedFS, 5 interleaved rounds) cold 763 [729-889] items/s
        against 653 [531-825] without (``ours-ray-lazy``), read workers' CPU 3.8-4.5 s against
        4.6-7.5 s. The warm-up does that work instead (~1 s a worker here, in parallel; the
        benchmark's Ray start-up took 13.9-15.4 s with or without it)."""
        touched = 0
        while len(self._arenas) < self.keep:
            arena = np.empty(self.capacity, dtype=np.uint8)
            arena.fill(0)
            self._arenas.append(arena)
            touched += arena.nbytes
        return touched

    def column(self) -> ArenaColumn:
        for i in range(len(self._arenas)):
            if _free(self._arenas, i):
                self.reused += 1
                return ArenaColumn(self._arenas[i])
        self.allocated += 1
        arena = np.empty(self.capacity, dtype=np.uint8)
        if len(self._arenas) < self.keep:
            self._arenas.append(arena)
        return ArenaColumn(arena)


_PROCESS_ARENAS: BlockArena | None = None
_PROCESS_ARENAS_LOCK = threading.Lock()


def arena_capacity(target_block_bytes: int) -> int:
    """An arena's bytes for blocks of ``target_block_bytes`` (Ray Data's target block size):
    the target plus ``ARENA_SLACK``, at most ``ARENA_MAX``."""
    return min(target_block_bytes + ARENA_SLACK, ARENA_MAX)


def block_arenas(capacity: int) -> BlockArena:
    """This process's block arenas (a Ray read worker's, shared by its tasks and prefaulted by
    its warm-up), of ``capacity`` bytes each: one capacity at a time, so arenas of a block size
    no task asks for any more are not kept (they are freed once no block refers to them)."""
    global _PROCESS_ARENAS
    with _PROCESS_ARENAS_LOCK:
        if _PROCESS_ARENAS is None or _PROCESS_ARENAS.capacity != capacity:
            _PROCESS_ARENAS = BlockArena(capacity)
        return _PROCESS_ARENAS


def prefault_block_arenas(capacity: int) -> int:
    """``block_arenas(capacity).prefault()``: run by each read worker of a local cluster as it
    warms up for a ``to_ray`` pipeline (``adapters.ray.arena_warm_up``)."""
    return block_arenas(capacity).prefault()


class ArenaColumn:
    """One block's images laid out back to back in an arena, in the order added."""

    def __init__(self, arena: np.ndarray) -> None:
        self.arena = arena
        self.used = 0

    def add(self, image: np.ndarray) -> np.ndarray:
        """A copy of ``image`` in the arena (a view of it), or ``image`` itself when it does not
        fit or is not a C-contiguous uint8 array (the block then concatenates: a copy, as before)."""
        n = image.nbytes
        if image.dtype != np.uint8 or not image.flags.c_contiguous or self.used + n > self.arena.nbytes:
            return image
        out = self.arena[self.used:self.used + n].reshape(image.shape)
        np.copyto(out, image)
        self.used += n
        return out


def stacked_view(arrays: list[np.ndarray]) -> np.ndarray | None:
    """``np.stack(arrays)`` without the copy when the arrays (of one shape and dtype, C-contiguous)
    lie back to back in one base buffer, in order (an ``ArenaColumn``'s images); else None."""
    first = arrays[0]
    base = first.base
    if not isinstance(base, np.ndarray) or not base.flags.c_contiguous or not first.flags.c_contiguous:
        return None
    start = first.__array_interface__["data"][0]
    for k, a in enumerate(arrays):
        if (a.base is not base or a.shape != first.shape or a.dtype != first.dtype or not a.flags.c_contiguous
                or a.__array_interface__["data"][0] != start + k * first.nbytes):
            return None
    flat = base.reshape(-1).view(np.uint8)
    offset = start - base.__array_interface__["data"][0]
    if offset < 0 or offset + len(arrays) * first.nbytes > flat.nbytes:
        return None
    return flat[offset:offset + len(arrays) * first.nbytes].view(first.dtype).reshape((len(arrays), *first.shape))
