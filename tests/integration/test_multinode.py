"""Data across nodes, shown on a simulated multi-node cluster (ray.cluster_utils.Cluster).

Each scenario runs in its own process with its own Ray cluster (see tests/support/node_scenarios.py):
the test process keeps its session cluster.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multinode, pytest.mark.slow]

SCENARIOS = Path(__file__).resolve().parent.parent / "support" / "node_scenarios.py"


def run_scenario(name: str, tmp_path: Path, timeout: float = 420) -> dict:
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(SCENARIOS), name, str(tmp_path / "store")],
                          capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SCENARIO-RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"scenario {name} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1].split(" ", 1)[1])


@pytest.mark.timeout(480)
def test_each_node_fetches_exactly_what_its_worker_consumes(tmp_path: Path) -> None:
    r = run_scenario("locality", tmp_path)
    ranks = {k["rank"]: k for k in r["ranks"]}
    assert sorted(ranks) == [0, 1]
    nodes = {k["node"] for k in ranks.values()}
    assert len(nodes) == 2, "the two train workers must sit on two different nodes"
    all_ids = set(r["item_ids"])
    per = len(all_ids) // 2
    for epoch in range(2):
        consumed = {rank: k["epochs"][epoch]["ids"] for rank, k in ranks.items()}
        for rank, k in ranks.items():
            ids, fetched_on = k["epochs"][epoch]["ids"], k["epochs"][epoch]["fetched_on"]
            assert len(ids) == len(set(ids)) == per, f"rank {rank} epoch {epoch}: duplicates or short"
            # every blob this worker trained on was fetched by its own node, none elsewhere
            assert set(fetched_on) == {k["node"]}, f"rank {rank} got items fetched on {set(fetched_on)}"
        # per node: items fetched there == items its worker consumed; together: every item once
        fetched_by_node = {n: sorted(i for k in ranks.values() for i, f in
                                     zip(k["epochs"][epoch]["ids"], k["epochs"][epoch]["fetched_on"]) if f == n)
                           for n in nodes}
        for rank, k in ranks.items():
            assert fetched_by_node[k["node"]] == sorted(consumed[rank])
        union = set(consumed[0]) | set(consumed[1])
        assert not set(consumed[0]) & set(consumed[1])
        assert union <= all_ids and len(all_ids - union) == len(all_ids) % 2
    # the same shard each epoch: a node's cache serves its worker's items again
    for k in ranks.values():
        assert sorted(k["epochs"][0]["ids"]) == sorted(k["epochs"][1]["ids"])


@pytest.mark.timeout(480)
def test_run_survives_losing_a_node(tmp_path: Path) -> None:
    r = run_scenario("node_loss", tmp_path)
    removed = r["removed"]
    assert removed.get("node") in removed.get("workers_before", []), f"no train worker node was removed: {removed}"
    assert removed["registered_checkpoints"] >= 1, "removed before the first checkpoint"
    assert removed["node"] not in r["alive_nodes"]
    assert len(set(removed["workers_after"])) == 2 and removed["node"] not in removed["workers_after"]
    assert r["status"] == "finished"
    epochs = [m["epoch"] for m in r["metrics"]]
    assert epochs == [0, 1, 2, 3], f"each epoch once, in order: {epochs}"
    last = r["metrics"][-1]
    assert last["attempt_start_epoch"] >= 1, "the replacement workers restarted from scratch"
    assert {m["train_items"] for m in r["metrics"]} == {r["metrics"][0]["train_items"]}
