"""Training end to end on a local Ray cluster: both shipped configs with 2 workers on the
SeaweedFS store, lineage, re-runs on the identical items, early errors, worker failure, and
`ray job submit`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import orchestrator
from orchestrator.errors import ConfigError, DatasetNotFound, VersionNotFound
from orchestrator.train.config import load_config
from orchestrator.train.lineage import list_runs, runs_dir
from orchestrator.train.position import multiset_digest
from orchestrator.train.runner import plan_run, run, run_data
from tests.conftest import REPO, run_cli

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]


@pytest.fixture(scope="module")
def s3_street(seaweed, demo_small) -> str:
    uri = f"s3://orchestrator-test/train-{time.time_ns()}"
    store = orchestrator.connect(uri)
    store.ingest("street", coco=demo_small / "annotations.json", images=demo_small / "images")
    return uri


def _settings(config: str, store: str, *extra: str):
    return load_config(REPO / "configs" / config,
                       [f"store={store}", "train.epochs=2", "train.batch_size=8", *extra])


@pytest.mark.parametrize("config", ["street_torch.yaml", "street_tf.yaml"])
def test_shipped_config_trains_with_two_workers_and_records_lineage(config, s3_street):
    settings = _settings(config, s3_street)
    plan = plan_run(settings, config_name=Path(config).stem)
    lineage = run(plan)
    assert lineage.status == "finished" and lineage.version == 0
    assert lineage.items["train"] + lineage.items["validation"] == 60
    assert lineage.config["version"] == 0 and lineage.config["framework"] == settings.framework
    losses = [m["train_loss"] for m in lineage.metrics]
    assert [m["epoch"] for m in lineage.metrics] == [0, 1]
    assert losses[-1] < losses[0], losses
    assert all("val_map50" in m for m in lineage.metrics)
    # An uninterrupted run trains each train item once an epoch: the count and the multiset
    # digest a resumed run must match (test_train_mid_epoch.py).
    every_item_once = (len(plan.train_ids), multiset_digest(plan.train_ids))
    assert all((m["train_items"], m["train_digest"]) == every_item_once for m in lineage.metrics), lineage.metrics
    assert lineage.checkpoint and lineage.principal and lineage.code_revision

    store = orchestrator.connect(s3_street)
    recorded = {r.run_id: r for r in list_runs(store.runs)}[plan.run_id]
    assert recorded.status == "finished" and recorded.items == lineage.items
    r = run_cli("runs", "--store", s3_street)
    assert r.returncode == 0 and plan.run_id in r.stdout


def test_data_settings_reach_the_fetch_stage(s3_street):
    import pickle

    from orchestrator.train.runner import run_data

    plan = plan_run(_settings("street_torch.yaml", s3_street, "data.memory_cache_mb=64",
                              "data.disk_cache_mb=32", "data.decode_concurrency=3"))
    opts = run_data(plan).plan.options
    cache = pickle.loads(pickle.dumps(opts.cache))  # what a fetch worker rebuilds
    assert cache.memory_budget == 64 << 20 and cache.disk is not None and cache.disk_budget == 32 << 20
    assert opts.ray_fetch_actors == 3
    plan = plan_run(_settings("street_torch.yaml", s3_street, "data.disk_cache_mb=0"))
    assert run_data(plan).plan.options.cache.disk is None


def test_rerun_of_a_recorded_run_uses_the_identical_items(s3_street, demo_small, tmp_path):
    store = orchestrator.connect(s3_street)
    first = plan_run(_settings("street_torch.yaml", s3_street, "version=latest"))
    # New data arrives after the run was recorded ...
    doc = json.loads((demo_small / "annotations.json").read_text())
    doc["images"] = [dict(i, file_name=i["file_name"], item_id=f"new/{i['file_name']}") for i in doc["images"][:10]]
    keep = {i["id"] for i in doc["images"]}
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] in keep]
    extra = tmp_path / "more.json"
    extra.write_text(json.dumps(doc))
    store.ingest("street", coco=extra, images=demo_small / "images")
    # ... the recorded (resolved) config still plans the same item sets.
    again = plan_run(load_config(doc=first.lineage.config))
    assert again.lineage.version == first.lineage.version
    assert again.lineage.items_digest == first.lineage.items_digest
    latest = plan_run(_settings("street_torch.yaml", s3_street))
    assert latest.lineage.items_digest != first.lineage.items_digest


@pytest.mark.parametrize(
    "overrides, error, needle",
    [
        (["dataset=nope"], DatasetNotFound, "dataset 'nope' does not exist"),
        (["version=42"], VersionNotFound, "no version 42"),
        (["query=labels.cars > 1"], orchestrator.errors.QueryError, "did you mean 'car'"),
        (["query=labels.car > 100"], ConfigError, "has no items matching"),
    ],
)
def test_bad_dataset_version_or_query_fail_before_ray_work(s3_street, overrides, error, needle):
    with pytest.raises(error, match=needle):
        plan_run(_settings("street_torch.yaml", s3_street, *overrides))


def test_cli_reports_malformed_config_before_starting_ray(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("store: file:///tmp/x\ndataset: street\ntrain:\n  epochs: 0\n  batchsize: 4\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.monotonic()
    r = subprocess.run([str(Path(sys.executable).parent / "orchestrator"), "train", str(bad)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2
    assert "train.epochs" in r.stderr and "train.batchsize: unknown key" in r.stderr
    assert "Started a local Ray instance" not in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - started < 30


def _train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train workers (from Ray's state API, not a process-name match that
    could hit an idle worker left from an earlier run)."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in actors if a.pid]


def _checkpoint_registered(run_dir: Path) -> bool:
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return bool(json.loads(snapshot.read_text()).get("checkpoint_results"))
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def test_a_killed_worker_is_replaced_and_the_run_finishes_from_its_checkpoint(tmp_path, demo_small):
    uri = f"file://{tmp_path / 'store'}"
    orchestrator.connect(uri).ingest("street", coco=demo_small / "annotations.json",
                                     images=demo_small / "images")
    settings = _settings("street_torch.yaml", uri, "train.epochs=4", "checkpoint.max_failures=2")
    plan = plan_run(settings, config_name="killtest")
    ckpt_root = Path(runs_dir(plan.store.runs)) / plan.run_id
    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            if _checkpoint_registered(ckpt_root):
                pids = _train_worker_pids()
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(pids[-1])
                    return
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    lineage = run(plan)
    thread.join(5)
    assert killed, "no worker was killed: the test proved nothing"
    assert lineage.status == "finished"
    # Every epoch is recorded once: the restarted group resumed from the checkpoint instead of
    # starting again at epoch 0 (which would repeat epochs).
    assert [m["epoch"] for m in lineage.metrics] == [0, 1, 2, 3]
    assert lineage.metrics[0]["attempt_start_epoch"] == 0
    assert lineage.metrics[-1]["attempt_start_epoch"] >= 1, "the restart began again from scratch"


def test_ray_job_submit_runs_jobs_train_py(ray_cluster, tmp_path, demo_small):
    uri = f"file://{tmp_path / 'store'}"
    orchestrator.connect(uri).ingest("street", coco=demo_small / "annotations.json",
                                     images=demo_small / "images")
    env = {**os.environ}
    dashboard = ray_cluster.dashboard
    for _attempt in range(6):  # the dashboard's job agent may still be starting
        r = subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", dashboard,
             "--working-dir", str(REPO), "--", sys.executable, "jobs/train.py", "--config",
             "configs/street_torch.yaml", "--set", f"store={uri}", "--set", "train.epochs=1",
             "--set", "train.batch_size=8"],
            capture_output=True, text=True, env=env, timeout=600, cwd=REPO,
        )
        if "No available agent to submit job" not in r.stderr + r.stdout:
            break
        time.sleep(5)
    assert r.returncode == 0, (r.stdout[-6000:], r.stderr[-3000:])
    assert "succeeded" in (r.stdout + r.stderr).lower()
    runs = list_runs(orchestrator.connect(uri).runs)
    assert len(runs) == 1 and runs[0].status == "finished" and runs[0].run_id.startswith("street_torch-")


@pytest.mark.parametrize("config", ["street_torch.yaml", "street_tf.yaml"])
def test_a_skipped_item_is_counted_in_lineage_and_workers_stay_in_step(config, demo_small, tmp_path):
    """A corrupt item in one worker's shard (a byte flipped in its bytes in the pack, the
    default layout): the run finishes (no DDP worker left waiting in an all-reduce for a step
    the other never takes; no TF worker short of its fixed step count) and its lineage counts
    the skip by reason, in total and in the epoch's metrics."""
    uri = f"file://{tmp_path / 'store'}"
    store = orchestrator.connect(uri)
    store.ingest("street", coco=demo_small / "annotations.json", images=demo_small / "images")
    first = plan_run(_settings(config, uri))
    shard = len(first.train_ids) // 2
    # One batch short of two per worker: the full shard takes 2 steps, the one missing an item 1.
    # No disk cache: the session's node cache may hold the demo item's good bytes from an earlier test.
    plan = plan_run(_settings(config, uri, "train.epochs=1", f"train.batch_size={shard - 1}",
                              "data.disk_cache_mb=0"))
    victim = plan.train_ids[0]
    row = {r["item_id"]: r for r in
           store.dataset("street").manifest_rows(["item_id", "pack", "pack_offset"]).to_pylist()}[victim]
    path = store.handle.packs("street").path(row["pack"])
    with store.fs.open_input_stream(path) as f:
        data = bytearray(f.read())
    data[row["pack_offset"] + 5] ^= 0xFF
    with store.fs.open_output_stream(path) as out:
        out.write(bytes(data))

    lineage = run(plan)
    assert lineage.status == "finished"
    assert lineage.skipped_items == 1 and lineage.skipped["by_reason"] == {"corrupt": 1}
    assert victim in lineage.skipped["examples"][0]
    assert lineage.metrics[0]["skipped_items"] == 1, json.dumps(lineage.metrics)
    # Every worker took the longest shard's step count (torch: a worker that stopped early would
    # leave its peer waiting in DDP's all-reduce; TensorFlow: Keras's fixed count), the short
    # shard padding with zero-weight rows: every other item was trained, once.
    assert lineage.metrics[0]["train_items"] == len(plan.train_ids) - 1, json.dumps(lineage.metrics)
    assert lineage.metrics[0]["train_digest"] == multiset_digest(set(plan.train_ids) - {victim})
    recorded = {r.run_id: r for r in list_runs(store.runs)}[plan.run_id]
    assert recorded.skipped_items == 1


def test_the_workers_shards_together_yield_every_train_item_exactly_once(s3_street):
    """The training read path: the shards of 3 workers (47 train items: uneven) cover the train
    split, each item once (balanced_shards no longer leaves the remainder out of every epoch)."""
    plan = plan_run(_settings("street_torch.yaml", s3_street))
    data = run_data(plan)
    per_rank = [[i for b in data.pipeline("train", rank, 3, None).iter_batches(batch_format="numpy")
                 for i in b["id"]] for rank in range(3)]
    assert sorted(i for ids in per_rank for i in ids) == sorted(plan.train_ids)
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1
