"""Give freed heap memory back to the OS during a long pass.

A pass reads media in range requests of up to ``packs.DEFAULT_MAX_REQUEST`` bytes from several
threads, and cuts items (tens of KB) and images (about a MB) out of them. Under glibc, once the
first such buffer is freed, the dynamic mmap threshold rises and later buffers come from the
threads' heap arenas, interleaved with the small objects; the freed space stays resident, so a
pass's RSS grew with the bytes it read (a 50k-item pass peaked 16-27% above a 10k one with the
same cache; ``benchmarks/stream.py``). ``malloc_trim`` returns free pages (also inside the heap)
to the OS; the reader calls it once per read-ahead chunk (every ~16 MB of media), which costs
well under a millisecond. Elsewhere than glibc it does nothing.

``limit_arenas`` caps glibc's heap arenas at the usable cores (at least 2) before a reader
starts its threads. glibc gives threads up to 8 arenas per core; the reader's ~12 threads
(fetch, decode, cache writer) each freed image buffers into their own arena, and a warm
single-process pass over 3,000 items grew from 300 to 345 MB RSS over five epochs that read
nothing new (``malloc_trim`` cannot return a fragmented arena's pages). With 2 arenas it stayed
at 289-295 MB, at the same items/s (``benchmarks/warm_iter.py``). A ``MALLOC_ARENA_MAX`` the
user set is left alone.

``fix_mmap_threshold`` pins glibc's mmap threshold at its default (128 KiB), which also turns its
dynamic raising off, in a Ray read worker (``adapters.ray.read_items``): a long-lived process whose
every task holds a block of decoded images (up to Ray Data's 128 MiB block size) and then frees
it. Once the threshold had risen, the images came from the heap arenas, whose free space grew
epoch after epoch while the live heap did not (``mallinfo2`` at each task's end in one read
worker, 3,000 items, 5 epochs: in use 42-139 MB throughout, free 18 -> 714 MB; the worker's peak
RssAnon per epoch 618, 712, 783, 894, 997 MB; ``malloc_trim`` per chunk did not stop it).
Pinned, an image above 128 KiB is its own mapping, unmapped when freed: free heap stayed at
2-5 MB and the read workers' peak RssAnon at 410-540 MB with no trend over 8 epochs. The price is
the page faults of each new mapping: ~0.2 ms of system time per 0.5 MB image (an isolated
decode loop: ~1,400 against ~1,850 images/s), and as much again for the block's concatenated
image column; so a read worker no longer allocates either: it decodes into a pool of reused
buffers and builds each block's column in a reused arena (``stream.buffers``). A
``MALLOC_MMAP_THRESHOLD_`` (or ``GLIBC_TUNABLES``) the user set is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable

from orchestrator.machine import usable_cores

__all__ = ["fix_mmap_threshold", "limit_arenas", "trim_heap"]

_M_ARENA_MAX = -8  # glibc's mallopt parameters
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 << 10  # glibc's default (and its dynamic threshold's floor)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def _malloc_trim() -> Callable[[int], int] | None:
    libc = _libc()
    return None if libc is None else libc.malloc_trim


@functools.cache
def limit_arenas() -> bool:
    """Cap glibc's heap arenas at this process's usable cores (at least 2), once per process
    (see the module docstring); False where it cannot or the user set ``MALLOC_ARENA_MAX``."""
    libc = _libc()
    if libc is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, max(2, usable_cores())))


@functools.cache
def fix_mmap_threshold() -> bool:
    """Pin glibc's mmap threshold at ``MMAP_THRESHOLD`` (no dynamic raising), once per process
    (see the module docstring); False where it cannot or the user set the threshold."""
    libc = _libc()
    if (libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ
            or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", "")):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def trim_heap() -> bool:
    """Return free heap pages to the OS (glibc's ``malloc_trim(0)``); False if unavailable."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
