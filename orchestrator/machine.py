"""What this machine offers the process: its usable cores.

One answer for every place that sizes work by cores (decode threads, heap arenas, Ray read
tasks on a local cluster): the CPUs this process may run on (a container's or ``taskset``'s
affinity), else the machine's count where affinity is not available (macOS).
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """CPUs this process may run on (at least 1)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
