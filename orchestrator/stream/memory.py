"""Give freed heap memory back to the OS during a long pass.

A pass reads media in range requests of up to ``packs.DEFAULT_MAX_REQUEST`` bytes from several
threads, and cuts items (tens of KB) and images (about a MB) out of them. Under glibc, once the
first such buffer is freed, the dynamic mmap threshold rises and later buffers come from the
threads' heap arenas, interleaved with the small objects; the freed space stays resident, so a
pass's RSS grew with the bytes it read (a 50k-item pass peaked 16-27% above a 10k one with the
same cache; ``benchmarks/stream.py``). ``malloc_trim`` returns free pages (also inside the heap)
to the OS; the reader calls it once per read-ahead chunk (every ~16 MB of media), which costs
well under a millisecond. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

__all__ = ["trim_heap"]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def trim_heap() -> bool:
    """Return free heap pages to the OS (glibc's ``malloc_trim(0)``); False if unavailable."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
