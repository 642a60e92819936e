"""Multi-node scenarios on one machine, each run in its own process (python -m ...).

``ray.cluster_utils.Cluster`` starts a head and worker nodes (separate raylets with their own
node ids and resources) inside this process; Cluster.shutdown stops only those. The test process
keeps its own session cluster, so every scenario runs here, in a subprocess, and prints one JSON
line for the test to check.

    python tests/support/node_scenarios.py locality STORE_DIR
    python tests/support/node_scenarios.py node_loss STORE_DIR
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

NODE_CPUS = 4      # per simulated worker node
WORKER_CPUS = 3    # per train worker: one train worker per node, 1 CPU left for its data stages


def start_cluster(worker_nodes: int):
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.store_location import S3_COMPAT_ENV

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=NODE_CPUS) for _ in range(worker_nodes)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={"env_vars": dict(S3_COMPAT_ENV)})
    return cluster, nodes


def make_store(store_dir: Path, items: int):
    import orchestrator
    from orchestrator.dev.demo import make_demo_data

    data = store_dir.parent / "demo"
    make_demo_data(data, items, seed=3)
    store = orchestrator.connect(f"file://{store_dir}")
    store.ingest("street", coco=data / "annotations.json", images=data / "images")
    return store


def locality(store_dir: Path) -> dict:
    """2 train workers on 2 nodes read one epoch twice; every item records the node that
    fetched it. Returns per rank: its node, the ids it consumed, the nodes that fetched them."""
    import ray
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.stream.split import HashSplit
    from orchestrator.train.data import NodeLocalDataConfig, RunData

    cluster, _ = start_cluster(2)
    try:
        store = make_store(store_dir, 48)
        ds = store.dataset("street").with_options(ray_fetch_actors=2)
        ids = ds.item_ids()
        data = RunData(plan=ds.plan, train_ids=ids, split=HashSplit(0.0, 0, validation=True),
                       shard_seed=0, image_size=64, max_boxes=16)
        out_dir = tempfile.mkdtemp(dir=store_dir.parent)
        trainer = TorchTrainer(
            _probe_loop, train_loop_config={"out": out_dir, "epochs": 2},
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": WORKER_CPUS}),
            run_config=RunConfig(name="locality", storage_path=str(store_dir.parent / "ray_results")),
            datasets={"train": data.pipeline("train", 0, 1, None, [[]])},
            dataset_config=NodeLocalDataConfig(data),
        )
        trainer.fit()
        ranks = [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("rank-*.json"))]
        return {"item_ids": ids, "ranks": ranks,
                "nodes": [n["NodeID"] for n in ray.nodes() if n["Alive"]]}
    finally:
        ray.shutdown()
        _stop(cluster)


def _stop(cluster) -> None:
    """Remove every node at once (SIGKILL): the scenario's result is in hand, and a graceful
    stop waits up to a second per process per node."""
    import ray

    for node in [*cluster.worker_nodes, cluster.head_node]:
        if node is not None:
            cluster.remove_node(node, allow_graceful=False)
    # What Cluster.shutdown does after removing its nodes: forget the dead GCS and delete the
    # cluster's address file (/tmp/ray/ray_current_cluster), else a later ray.init() on this
    # machine takes that address for a running cluster.
    ray.experimental.internal_kv._internal_kv_reset()
    ray._common.utils.reset_ray_address()
    ray._private.services.find_gcs_addresses.cache_clear()


def _probe_loop(config: dict) -> None:
    import ray
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    shard = ray.train.get_dataset_shard("train")
    epochs = []
    for _ in range(config["epochs"]):
        ids, fetched_on = [], []
        for batch in shard.iter_batches(batch_size=8, batch_format="numpy"):
            ids += [str(i) for i in batch["id"]]
            fetched_on += [str(n) for n in batch["fetch_node"]]
        epochs.append({"ids": ids, "fetched_on": fetched_on})
    record = {"rank": rank, "node": ray.get_runtime_context().get_node_id(), "epochs": epochs}
    Path(config["out"], f"rank-{rank}.json").write_text(json.dumps(record))


def node_loss(store_dir: Path) -> dict:
    """A real training run (orchestrator runner) with 2 workers on 3 worker nodes; after the
    first checkpoint, the node of one train worker is removed. Returns the lineage."""
    import ray
    from ray._private.state import actors  # GCS actor table: no dashboard needed

    from orchestrator.train.config import load_config
    from orchestrator.train.runner import plan_run, run

    cluster, nodes = start_cluster(3)
    try:
        make_store(store_dir, 60)
        settings = load_config(Path(__file__).resolve().parents[2] / "configs/street_torch.yaml", [
            f"store=file://{store_dir}", "train.epochs=4", "model.image_size=64",
            "scaling.num_workers=2", f"scaling.cpus_per_worker={WORKER_CPUS}",
            "checkpoint.max_failures=3", "data.decode_concurrency=1",
        ])
        plan = plan_run(settings, config_name="nodeloss")
        removed: dict = {}
        from orchestrator.train.lineage import runs_dir

        ckpt_root = Path(runs_dir(plan.store.runs)) / plan.run_id

        def remove_a_worker_node() -> None:
            deadline = time.time() + 300
            while time.time() < deadline and not _checkpoint_registered(ckpt_root):
                time.sleep(0.5)
            workers = [a["Address"]["NodeID"] for a in actors(actor_state_name="ALIVE").values()
                       if "RayTrainWorker" in a["ActorClassName"]]
            by_id = {n.node_id: n for n in nodes}
            victims = [by_id[w] for w in workers if w in by_id]
            if victims:
                removed["node"] = victims[0].node_id
                removed["workers_before"] = sorted(workers)
                removed["registered_checkpoints"] = _checkpoint_registered(ckpt_root)
                cluster.remove_node(victims[0], allow_graceful=False)
                while time.time() < deadline:  # the replacement worker group
                    after = [a["Address"]["NodeID"] for a in actors(actor_state_name="ALIVE").values()
                             if "RayTrainWorker" in a["ActorClassName"]]
                    if len(after) == len(workers) and removed["node"] not in after:
                        removed["workers_after"] = sorted(after)
                        break
                    time.sleep(0.5)

        killer = threading.Thread(target=remove_a_worker_node, daemon=True)
        killer.start()
        lineage = run(plan)
        killer.join(timeout=5)
        return {"removed": removed, "status": lineage.status, "metrics": lineage.metrics,
                "alive_nodes": [n["NodeID"] for n in ray.nodes() if n["Alive"]]}
    finally:
        ray.shutdown()
        _stop(cluster)


def _checkpoint_registered(run_dir: Path) -> int:
    """Checkpoints Ray Train has registered (a directory alone may still be uploading)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return len(snapshot.get("checkpoint_results") or [])


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.pop("RAY_ADDRESS", None)
    scenario, store = sys.argv[1], Path(sys.argv[2])
    result = {"locality": locality, "node_loss": node_loss}[scenario](store)
    sys.stdout.flush()
    print("SCENARIO-RESULT " + json.dumps(result), flush=True)
    os._exit(0)
