"""Autoscaling on one machine (issue 6, acceptance (a)): a training run that needs more CPUs than
the head node has makes Ray's autoscaler add worker nodes, and they go away after the idle
timeout.

The cluster is Ray's fake multi-node provider (tests/support/simulated_cluster.py): a head of
HEAD_CPUS CPUs whose autoscaler "launches" a worker node by starting another raylet on this
machine. The run is the real ``orchestrator train`` CLI in a subprocess with RAY_ADDRESS set to
that cluster (this test process may hold the session's own Ray cluster, so it never calls
ray.init); a watcher subprocess records the alive nodes every half second from the GCS.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.simulated_cluster import autoscaling_cluster
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "orchestrator")

HEAD_CPUS = 1
WORKER_TYPES = {"cpu_worker": {"resources": {"CPU": 4}, "min_workers": 0, "max_workers": 2}}
IDLE_TIMEOUT_MINUTES = 0.1  # 6 s: fractions are accepted ("number" in Ray's schema)
SCALE_DOWN_MARGIN_S = 60  # autoscaler loop (1 s), idle reports, raylet shutdown
# 2 train workers x 3 CPUs: more than the head's 1 CPU, and more than one 4-CPU worker node
# (one train worker per node, with 1 CPU left there for its node-local data stages).
TRAIN_OVERRIDES = ["scaling.num_workers=2", "scaling.cpus_per_worker=3",
                   "train.epochs=1", "train.batch_size=8", "model.image_size=64"]


def _read_watch(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return [r for r in rows if "workers" in r]


def _ingest(store: str, demo: Path, tmp_dir: Path) -> None:
    """Ingest on a private head of its own (4 CPUs, no worker types), not on the autoscaling
    cluster, whose node counts must show the training run only. Not on a local Ray started by
    the CLI either: without RAY_ADDRESS, ray.init("auto") attaches to any Ray cluster it finds
    running on the machine (it scans the processes for a GCS), someone else's included."""
    with autoscaling_cluster(4, {}, IDLE_TIMEOUT_MINUTES, tmp_dir) as private:
        r = subprocess.run([CLI, "ingest", "--store", store, "--dataset", "street",
                            "--coco", str(demo / "annotations.json"), "--images", str(demo / "images"),
                            "--json"],
                           check=False, capture_output=True, text=True, timeout=300, cwd=REPO,
                           env=private.env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["version"] == 0, r.stdout


def test_a_run_needing_more_cpus_than_the_head_adds_worker_nodes_that_leave_when_idle(tmp_path):
    from orchestrator.dev.demo import make_demo_data

    demo = tmp_path / "demo"
    make_demo_data(demo, 40, seed=3)
    store = f"file://{tmp_path / 'store'}"
    _ingest(store, demo, tmp_path / "ingest-cluster")

    watch_file = tmp_path / "nodes.jsonl"
    with autoscaling_cluster(HEAD_CPUS, WORKER_TYPES, IDLE_TIMEOUT_MINUTES, tmp_path / "cluster") as cluster:
        watcher = cluster.watch(watch_file)
        try:
            # Negative control: with the autoscaler running (it has printed a status, i.e. it
            # has the head's load) and nothing to do, min_workers=0 means no worker node.
            assert wait_for(lambda: "Autoscaler status" in cluster.monitor_log(), 90), \
                cluster.monitor_log()[-3000:]
            control_from = time.time()
            time.sleep(6)
            control = [r for r in _read_watch(watch_file) if r["t"] >= control_from]
            assert len(control) >= 5, control
            assert all(r["workers"] == 0 for r in control), control
            assert all(n["cpus"] == HEAD_CPUS for r in control for n in r["nodes"]), control

            # The run: 2 x 3 CPUs on a cluster that has 1.
            started = time.time()
            r = subprocess.run(
                [CLI, "train", str(REPO / "configs" / "street_torch.yaml"), "--json",
                 "--set", f"store={store}", *[a for o in TRAIN_OVERRIDES for a in ("--set", o)]],
                check=False, capture_output=True, text=True, timeout=600, cwd=REPO,
                env=cluster.env)
            finished = time.time()
            assert r.returncode == 0, (r.stderr[-4000:], cluster.monitor_log()[-4000:])
            lineage = json.loads(r.stdout)
            assert lineage["status"] == "finished", lineage
            assert lineage["items"]["train"] + lineage["items"]["validation"] == 40
            assert [m["epoch"] for m in lineage["metrics"]] == [0]
            assert lineage["checkpoint"]

            during = [r for r in _read_watch(watch_file) if started <= r["t"] <= finished]
            peak = max(r["workers"] for r in during)
            assert peak >= 1, f"no worker node was added while the run ran: {during[-5:]}"
            assert peak <= WORKER_TYPES["cpu_worker"]["max_workers"], during
            added = {n["node_id"] for r in during for n in r["nodes"] if not n["is_head"]}
            # Worker nodes have the worker type's resources.
            assert all(n["cpus"] == 4 for r in during for n in r["nodes"] if not n["is_head"])

            # Scale-down: back to 0 worker nodes within the idle timeout + margin. A node with a
            # live actor is not idle, whatever its CPU use: Ray Data's cluster singletons
            # (_StatsActor, ActorLocationTracker) are detached actors pinned to the node of the
            # process that first runs Ray Data in the cluster, so if that is a train worker on an
            # added node, the node stays; the failure message lists such actors.
            limit = IDLE_TIMEOUT_MINUTES * 60 + SCALE_DOWN_MARGIN_S

            def gone() -> float | None:
                after = [r for r in _read_watch(watch_file) if r["t"] > finished]
                zero = [r["t"] for r in after if r["workers"] == 0]
                return (zero[0] - finished) if zero else None

            took = wait_for(gone, limit + 10)
            if took is None or took > limit:
                left = {n["node_id"] for n in cluster.nodes() if not n["is_head"]}
                holders = [a for a in cluster.actors() if a["node_id"] in left]
                pytest.fail(f"{len(left)} worker node(s) still up {limit:.0f} s after the run "
                            f"ended: {sorted(left)}; alive actors on them (a node with a live "
                            f"actor is not idle): {holders}\n"
                            f"autoscaler log tail:\n{cluster.monitor_log()[-3000:]}")
            time.sleep(3)  # and they stay gone
            assert cluster.worker_count() == 0
            log = cluster.monitor_log()
            assert "(idle)" in log and "Terminating" in log  # removed by the idle timeout
        finally:
            watcher.terminate()
            watcher.wait(10)
    print(f"\nautoscaling: peak {peak} worker node(s) ({len(added)} added: {sorted(added)}) during "
          f"a {finished - started:.0f} s run; all removed {took:.1f} s after it ended")
