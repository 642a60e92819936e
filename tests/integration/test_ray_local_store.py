"""A local cluster this library starts (``start_local_ray``): its object store has the size
``local_object_store_bytes`` gives, and the driver and the warmed read workers map all of it at
start (``map_object_store``), so no read worker takes a page fault per store page in the first
epoch and no process's share of the store grows epoch after epoch; the read workers' imports are
frozen out of the garbage collector's walks (``freeze_startup_objects``); started for a ``to_ray``
pipeline (``prepare=adapters.ray.arena_warm_up()``), its read workers' block arenas are allocated and written at start
(``BlockArena.prefault``).

Runs in a subprocess: the test process keeps the session's cluster (``ray_cluster``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = r'''
import json, os
import ray
from orchestrator import ray_runtime

def shmem_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssShmem:"):
            return int(line.split()[1]) / 1024
    return 0.0

def worker():
    import gc
    from ray.data import DataContext
    from orchestrator.stream import buffers
    arenas = buffers._PROCESS_ARENAS
    want = buffers.arena_capacity(DataContext.get_current().target_max_block_size)
    return os.getpid(), (shmem_mb(), gc.get_freeze_count(),
                         0 if arenas is None or arenas.capacity != want else len(arenas._arenas))

from orchestrator.adapters.ray import arena_warm_up
ray_runtime.start_local_ray(wait_warm=True, prepare=arena_warm_up())
task = ray.remote(num_cpus=0)(worker).options(runtime_env=ray_runtime.task_env())
print("RESULT " + json.dumps({
    "store_mb": ray.cluster_resources()["object_store_memory"] / 2**20,
    "driver_mb": shmem_mb(),
    "workers": dict(ray.get([task.remote() for _ in range(ray_runtime.read_concurrency())])),
}))
'''


def test_a_local_cluster_gets_its_sized_store_mapped_whole_in_the_driver_and_read_workers():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["ORCHESTRATOR_RAY_OBJECT_STORE_MB"] = "96"
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=180)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-4000:]
    got = json.loads(lines[-1].split(" ", 1)[1])
    assert got["store_mb"] == 96
    # Each process's resident share of the store: all of it (Ray keeps a little of the segment
    # for itself), not the few pages one small object touches.
    assert got["driver_mb"] >= 0.9 * 96, got
    assert got["workers"] and all(mb >= 0.9 * 96 for mb, _, _ in got["workers"].values()), got
    # and their imports are out of the garbage collector's way (``freeze_startup_objects``)
    assert all(frozen > 100_000 for _, frozen, _ in got["workers"].values()), got
    # and their two block arenas, for the driver's block size, exist (``BlockArena.prefault``)
    assert all(arenas == 2 for _, _, arenas in got["workers"].values()), got
