"""Watching a run: the quickstart and `orchestrator train` print each epoch's line as it ends,
hide Ray's chatter, print where the record and checkpoints are (a path that opens) and the
command that continues the run; the shipped config runs as-is right after the quickstart."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]

RAY_CHATTER = ("INFO streaming_executor", "Token authentication is enabled", "Started a local Ray instance",
               "logging_progress", "absl::InitializeLog", "oneDNN custom operations")


def _opens(uri: str) -> dict:
    assert uri.startswith("file://"), uri
    return json.loads(Path(uri[len("file://"):]).read_text())


def test_quickstart_prints_epochs_as_they_end_and_the_shipped_config_runs_after_it(tmp_path):
    # The shipped config, verbatim, beside a quickstart folder laid out as in the repository.
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "street_torch.yaml"
    shutil.copy(REPO / "configs" / "street_torch.yaml", config)
    env = {k: v for k, v in os.environ.items() if k != "ORCHESTRATOR_STORE"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "quickstart.py"), "--dir", str(tmp_path / ".demo"), "--n", "40",
         "--epochs", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    seen: list[tuple[float, str]] = []
    alive_after_first_epoch = None
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append((time.monotonic(), line.rstrip("\n")))
        if line.startswith("epoch 1/2"):
            alive_after_first_epoch = proc.poll() is None
    assert proc.wait(timeout=600) == 0, "\n".join(text for _, text in seen)
    text = "\n".join(t for _, t in seen)
    epochs = [(t, line) for t, line in seen if line.startswith("epoch ")]
    assert [line.split()[1] for _, line in epochs] == ["1/2", "2/2"], text
    # Epoch 1's line came while the run still trained epoch 2, not all at once at the end.
    assert alive_after_first_epoch and epochs[1][0] - epochs[0][0] > 0.1, text
    assert "train_loss" in epochs[0][1] and "samples/s" in epochs[0][1] and "skipped" in epochs[0][1]
    assert not [c for c in RAY_CHATTER if c in text], text
    lineage_line = next(line for _, line in seen if line.startswith("lineage:"))
    record = _opens(lineage_line.split(None, 1)[1])
    assert record["status"] == "finished" and len(record["metrics"]) == 2
    assert "/runs/" in lineage_line and record["principal"] in lineage_line
    assert all("epoch_s" in m and "samples_per_s" in m and m["skipped_items"] == 0 for m in record["metrics"])
    further = next(line for _, line in seen if line.startswith("to train it further:"))
    assert f"--resume {record['run_id']}" in further and "--set train.epochs=3" in further

    # Right after the quickstart, the shipped config as-is (no --store, no ORCHESTRATOR_STORE).
    r = run_cli("train", str(config), "--set", "train.epochs=1", "--set", "train.batch_size=8",
                env={"ORCHESTRATOR_STORE": ""}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "epoch 1/1" in r.stdout and not [c for c in RAY_CHATTER if c in r.stdout + r.stderr], r.stdout + r.stderr
    record = _opens(next(line for line in r.stdout.splitlines() if line.startswith("lineage:")).split(None, 1)[1])
    assert record["status"] == "finished" and record["config"]["store"] == f"file://{tmp_path / '.demo' / 'store'}"
    # `runs` finds it through ORCHESTRATOR_STORE.
    listed = run_cli("runs", "--json", env={"ORCHESTRATOR_STORE": record["config"]["store"]})
    assert listed.returncode == 0 and record["run_id"] in listed.stdout


def test_json_output_stays_one_document_with_the_epoch_lines_on_stderr(tmp_path, demo_small):
    uri = f"file://{tmp_path / 'store'}"
    assert run_cli("ingest", "--store", uri, "--dataset", "street", "--coco", str(demo_small / "annotations.json"),
                   "--images", str(demo_small / "images")).returncode == 0
    r = run_cli("train", str(REPO / "configs" / "street_tf.yaml"), "--store", uri, "--set", "train.epochs=1",
                "--set", "train.batch_size=8", "--json", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads(r.stdout)
    assert record["status"] == "finished" and record["metrics"][0]["skipped_items"] == 0
    assert "epoch 1/1" in r.stderr and not [c for c in RAY_CHATTER if c in r.stderr], r.stderr
