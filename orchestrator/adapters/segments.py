"""Shared-memory segments a DataLoader worker reuses for the batches it ships to the main process.

Why: a fresh shared-memory segment per batch (what torch does for a tensor crossing processes)
costs, per 32-image batch of ~28 MB, a create, an ``fallocate`` that zeroes every page, a
mapping and its page faults on both sides, an unmap, and a socket connection to pass the
descriptor: profiled on 2 cores (DataLoader with 2 workers, 3,000 JPEGs), ~15% of the workers'
CPU and most of the main process's beyond the consumer's own work. A worker here keeps a few
segments (``POOL_SEGMENTS``) mapped for its lifetime; the main process maps each once, the first
time it arrives (its descriptor travels with that batch only), and hands out views of it.

The protocol lives in each segment's header, which both processes map:

* ``state`` (byte 0): ``FREE``, ``LENT`` (the worker wrote a batch into it and shipped it) or
  ``RETIRED`` (the worker dropped it). The worker lends only a ``FREE`` segment; the main process
  sets ``FREE`` again when the last view of the batch is gone (a finalizer on the array every
  view keeps alive), so a batch a user keeps is never overwritten: the worker lends another
  segment, and with all of them lent it falls back to a fresh segment per batch.
* ``mapped`` (byte 1): set by the main process when it maps the segment; while it is clear the
  worker sends the descriptor along.

The main process drops its mapping of a segment its worker retired, or whose worker has exited
(checked when a segment is first mapped and every ``SWEEP_S`` seconds), so a finished
DataLoader leaves no shared memory behind.
"""

from __future__ import annotations

import mmap
import os
import threading
import uuid
import weakref
from dataclasses import dataclass
from multiprocessing.reduction import DupFd
from typing import Any

import numpy as np

from orchestrator.errors import OrchestratorError

HEADER = 64
FREE, LENT, RETIRED = 0, 1, 2
#: Segments a worker keeps: the batches DataLoader holds ahead (``prefetch_factor``, 2 by default),
#: the one the consumer is working on, and slack for a consumer that keeps one a little longer.
POOL_SEGMENTS = 6
MIN_SEGMENT = 8 << 20  # smallest segment; sizes round up to ``SEGMENT_STEP``
SEGMENT_STEP = 4 << 20
SWEEP_S = 10.0


@dataclass
class _Segment:
    """A segment in the producing (worker) process."""

    id: int
    size: int  # data bytes, after the header
    fd: int
    mm: mmap.mmap
    header: np.ndarray


@dataclass(frozen=True)
class SegmentRef:
    """What crosses with a batch: which segment of which producer, and its descriptor when the
    consumer has not mapped it yet."""

    token: str
    pid: int
    id: int
    size: int
    fd: Any = None  # a multiprocessing DupFd


class _Pool:
    """This process's segments (a DataLoader worker's)."""

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex
        self.segments: list[_Segment] = []
        self.next_id = 0
        self.lock = threading.Lock()

    def lend(self, nbytes: int) -> tuple[SegmentRef, np.ndarray] | None:
        """A free segment of at least ``nbytes``, marked lent, and a writable view of its first
        ``nbytes``; None when every segment is lent and the pool is full (the caller ships the
        batch another way)."""
        with self.lock:
            free = [s for s in self.segments if s.header[0] != LENT]
            fits = [s for s in free if s.size >= nbytes]
            if fits:
                seg = min(fits, key=lambda s: s.size)
            else:
                if len(self.segments) >= POOL_SEGMENTS:
                    if not free:
                        return None
                    self._retire(min(free, key=lambda s: s.size))
                seg = self._create(max(MIN_SEGMENT, -(-nbytes // SEGMENT_STEP) * SEGMENT_STEP))
            seg.header[0] = LENT
            fd = DupFd(seg.fd) if not seg.header[1] else None
            ref = SegmentRef(self.token, os.getpid(), seg.id, seg.size, fd)
            return ref, np.frombuffer(seg.mm, np.uint8, count=nbytes, offset=HEADER)

    def _create(self, size: int) -> _Segment:
        fd = os.memfd_create("orchestrator-batch", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, HEADER + size)
            mm = mmap.mmap(fd, HEADER + size)
        except OSError:
            os.close(fd)
            raise
        seg = _Segment(self.next_id, size, fd, mm, np.frombuffer(mm, np.uint8, count=HEADER))
        self.next_id += 1
        self.segments.append(seg)
        return seg

    def _retire(self, seg: _Segment) -> None:
        seg.header[0] = RETIRED
        self.segments.remove(seg)
        seg.header = np.empty(0, np.uint8)  # the mapping's own export, so that close() may unmap
        try:
            seg.mm.close()
        except BufferError:  # a view is still alive somewhere here: unmapped when it goes
            pass
        os.close(seg.fd)


_pool: _Pool | None = None
_pool_lock = threading.Lock()


def lend(nbytes: int) -> tuple[SegmentRef, np.ndarray] | None:
    """``_Pool.lend`` on this process's pool (created on first use, new in a forked child)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = _Pool()
        pool = _pool
    return pool.lend(nbytes)


def _forget_pool_in_child() -> None:
    global _pool, _pool_lock, _mapped_lock
    _pool, _pool_lock = None, threading.Lock()
    _mapped.clear()
    _mapped_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_in_child)


@dataclass
class _Mapped:
    """A producer's segment as the consuming (main) process maps it."""

    mm: mmap.mmap
    header: np.ndarray
    pid: int
    size: int


_mapped: dict[tuple[str, int], _Mapped] = {}
_mapped_lock = threading.Lock()
_sweeper: threading.Thread | None = None


def receive(ref: SegmentRef) -> np.ndarray:
    """The segment's first bytes as an array (``ref.size`` bytes) that every view of the batch
    keeps alive; when it is collected the segment is free for its worker again."""
    key = (ref.token, ref.id)
    with _mapped_lock:
        seg = _mapped.get(key)
        if seg is None or seg.size != ref.size:
            if ref.fd is None:
                raise OrchestratorError(
                    f"a DataLoader batch arrived in shared-memory segment {ref.id} of worker pid {ref.pid}, "
                    "which this process has not mapped", hint="report this: the worker should have sent it")
            fd = ref.fd.detach()
            try:
                mm = mmap.mmap(fd, HEADER + ref.size)
            finally:
                os.close(fd)
            seg = _Mapped(mm, np.frombuffer(mm, np.uint8, count=HEADER), ref.pid, ref.size)
            _mapped[key] = seg
            seg.header[1] = 1
            _sweep_locked()
            _start_sweeper()
    holder = np.frombuffer(seg.mm, np.uint8, count=ref.size, offset=HEADER)
    weakref.finalize(holder, _release, seg.header)
    return holder


def _release(header: np.ndarray) -> None:
    if header[0] == LENT:
        header[0] = FREE


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_locked() -> None:
    """Drop mappings of retired segments and of exited workers (their memory is freed once the
    last view of their batches is gone)."""
    for key, seg in list(_mapped.items()):
        if seg.header[0] == RETIRED or not _alive(seg.pid):
            seg.header[1] = 0
            del _mapped[key]


def sweep() -> None:
    """Drop now what the sweeper thread would drop within ``SWEEP_S``."""
    with _mapped_lock:
        _sweep_locked()


def _sweep_forever() -> None:
    while True:
        threading.Event().wait(SWEEP_S)
        sweep()


def _start_sweeper() -> None:
    global _sweeper
    if _sweeper is None or not _sweeper.is_alive():
        _sweeper = threading.Thread(target=_sweep_forever, name="orchestrator-segment-sweeper", daemon=True)
        _sweeper.start()


def mapped_segments() -> set[tuple[int, int]]:
    """(producer pid, segment id) of every segment this process maps now (for tests and tools)."""
    with _mapped_lock:
        return {(seg.pid, key[1]) for key, seg in _mapped.items()}
