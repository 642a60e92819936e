"""Mid-epoch, deterministic, elastic resume (``checkpoint.every_steps``, ``train.position``).

A run is killed in the middle of an epoch, after a mid-epoch checkpoint, resumed on another
worker count and killed again in the middle of the next epoch, then resumed on the first count:
2 -> 1 -> 2 workers, Torch and TensorFlow. Every epoch of the finished run must have trained each
train item exactly once: its ``train_items`` is the train split's size and its ``train_digest``
(a digest of the multiset of item ids the ranks trained, summed over ranks and attempts) is the
digest of the train split's ids, the digest an uninterrupted run records (``test_train.py``
checks that one). A repeat or a gap changes the digest.

The kills are deterministic: the run's model is the built-in detector wrapped by a module outside
the package whose ``inputs`` counts its calls (one per training step) in the last rank's process
and SIGKILLs that process at the call the current attempt is given (a marker file counts the
kills done, so attempt n uses the n-th entry of ``kill_at_calls`` and the last attempt none).
"""

from __future__ import annotations

import textwrap
import uuid

import pytest

import orchestrator
from orchestrator.errors import OrchestratorError
from orchestrator.train.config import load_config
from orchestrator.train.lineage import read_lineage
from orchestrator.train.position import multiset_digest
from orchestrator.train.runner import plan_run, run
from tests.conftest import REPO

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]

KILLER = textwrap.dedent('''
    """The built-in detector, with an ``inputs`` that kills the last rank at its Nth call."""
    import dataclasses
    import os
    import signal
    from pathlib import Path

    import ray.train

    from orchestrator.train.models import ModelContext, ModelSpec
    from orchestrator.train.models.registry import build_model

    CALLS = [0]  # this process's training steps (a new attempt runs in new processes)


    def build(ctx: ModelContext) -> ModelSpec:
        kills = [int(k) for k in str(ctx.params["kill_at_calls"]).split(",")]
        marker = Path(ctx.params["marker"])
        spec = build_model("detector", dataclasses.replace(ctx, params={}))

        def inputs(batch):
            train = ray.train.get_context()
            if train.get_world_rank() == train.get_world_size() - 1:
                CALLS[0] += 1
                done = int(marker.read_text()) if marker.exists() else 0
                if done < len(kills) and CALLS[0] == kills[done]:
                    marker.write_text(str(done + 1))
                    os.kill(os.getpid(), signal.SIGKILL)
            return spec.inputs(batch)

        return dataclasses.replace(spec, inputs=inputs)
''')


@pytest.fixture(scope="module")
def street(tmp_path_factory, demo_small) -> str:
    uri = f"file://{tmp_path_factory.mktemp('mid-epoch') / 'store'}"
    orchestrator.connect(uri).ingest("street", coco=demo_small / "annotations.json", images=demo_small / "images")
    return uri


# 47 train items, batches of 8: 2 workers take 3 steps an epoch (shards of 24 and 23), 1 worker 6.
# Attempt 0 (2 workers) is killed at its last rank's 6th step: epoch 1's last, after the
# checkpoints of the steps before it (the last report before a kill can be lost with the process:
# the run resumes from the one before). Attempt 1 (1 worker) trains the rest of epoch 1 (at most
# 6 steps) and is killed at its 9th step, inside epoch 2 whatever that rest was. Attempt 2 (2
# workers) finishes epoch 2.
WORKERS, KILLS, EPOCHS = (2, 1, 2), (6, 9), 3


@pytest.mark.parametrize("config", ["street_torch.yaml", "street_tf.yaml"], ids=["torch", "tf"])
def test_a_run_killed_mid_epoch_twice_resumes_on_other_workers_training_each_item_once(
        config, street, tmp_path, monkeypatch):
    module = f"killer_{uuid.uuid4().hex[:8]}"  # a fresh name: Ray workers outlive a test
    (tmp_path / f"{module}.py").write_text(KILLER)
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = tmp_path / "kills"

    def settings(workers: int):
        return load_config(REPO / "configs" / config, [
            f"store={street}", f"train.epochs={EPOCHS}", "train.batch_size=8", f"scaling.num_workers={workers}",
            "checkpoint.every_steps=1", "checkpoint.max_failures=0", f"model.name={module}:build",
            f"model.params.kill_at_calls={','.join(map(str, KILLS))}", f"model.params.marker={marker}"])

    plan = plan_run(settings(WORKERS[0]), config_name="midepoch")
    for attempt, killed_in in enumerate((1, 2)):
        with pytest.raises(OrchestratorError):
            run(plan if attempt == 0 else plan_run(settings(WORKERS[attempt]), resume=plan.run_id))
        assert marker.exists() and int(marker.read_text()) == attempt + 1, "not killed: the test proved nothing"
        killed = read_lineage(orchestrator.connect(street).runs, plan.run_id)  # as the store holds it
        assert killed.status == "failed" and [m["epoch"] for m in killed.metrics] == list(range(killed_in))
        assert killed.position and killed.position["epoch"] == killed_in, killed.position

    resumed = run(plan_run(settings(WORKERS[2]), resume=plan.run_id))
    assert resumed.status == "finished" and resumed.position is None
    expected = multiset_digest(plan.train_ids)
    assert [m["epoch"] for m in resumed.metrics] == list(range(EPOCHS))
    for m in resumed.metrics:  # every epoch: each train item once, none twice, none left out
        assert (m["train_items"], m["train_digest"]) == (len(plan.train_ids), expected), m
    for cut in resumed.metrics[1:]:  # both epochs were cut by a kill and finished by the next attempt
        assert cut["attempt_start_epoch"] == cut["epoch"] and 0 < cut["resumed_items"] < len(plan.train_ids), cut
    assert "resumed_items" not in resumed.metrics[0]
