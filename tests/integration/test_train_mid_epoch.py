"""Mid-epoch, deterministic, elastic resume (``checkpoint.every_steps``, ``train.position``).

A run is killed in the middle of an epoch, after a mid-epoch checkpoint, and resumed with
another worker count (2 -> 1, 1 -> 2), Torch and TensorFlow. Every epoch of the resumed run must
have trained each train item exactly once: its ``train_items`` is the train split's size and its
``train_digest`` (a digest of the multiset of item ids the ranks trained, summed over ranks and
attempts) is the digest of the train split's ids, the digest an uninterrupted run records
(``test_train.py`` checks that one). A repeat or a gap changes the digest.

The kill is deterministic: the run's model is the built-in detector wrapped by a module outside
the package whose ``inputs`` counts its calls (one per training step) in the last rank and
SIGKILLs that worker at the given call, once (a marker file keeps the resumed run alive)."""

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
    """The built-in detector, with an ``inputs`` that kills the last rank at its Nth call, once."""
    import dataclasses
    import os
    import signal

    import ray.train

    from orchestrator.train.models import ModelContext, ModelSpec
    from orchestrator.train.models.registry import build_model

    CALLS = [0]


    def build(ctx: ModelContext) -> ModelSpec:
        kill_at, marker = int(ctx.params["kill_at_call"]), ctx.params["marker"]
        spec = build_model("detector", dataclasses.replace(ctx, params={}))

        def inputs(batch):
            train = ray.train.get_context()
            if train.get_world_rank() == train.get_world_size() - 1:
                CALLS[0] += 1
                if CALLS[0] == kill_at and not os.path.exists(marker):
                    open(marker, "w").close()
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
# The kill lands in the last rank's training step `kill_at` (counted from the run's start), after
# the checkpoints every step wrote before it: epoch 1 for 2 workers, epoch 0 for 1.
CASES = [  # (config, workers before, workers after, epochs, kill at call, epoch killed in)
    ("street_torch.yaml", 2, 1, 2, 6, 1),
    ("street_torch.yaml", 1, 2, 1, 4, 0),
    ("street_tf.yaml", 2, 1, 2, 6, 1),
    ("street_tf.yaml", 1, 2, 1, 4, 0),
]


@pytest.mark.parametrize(("config", "before", "after", "epochs", "kill_at", "killed_in"), CASES,
                         ids=[f"{c.split('_')[1][:-5]}-{b}to{a}" for c, b, a, *_ in CASES])
def test_a_run_killed_mid_epoch_resumes_on_other_workers_training_each_item_once(
        config, before, after, epochs, kill_at, killed_in, street, tmp_path, monkeypatch):
    module = f"killer_{uuid.uuid4().hex[:8]}"  # a fresh name: Ray workers outlive a test
    (tmp_path / f"{module}.py").write_text(KILLER)
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = tmp_path / "killed"

    def settings(workers: int):
        return load_config(REPO / "configs" / config, [
            f"store={street}", f"train.epochs={epochs}", "train.batch_size=8", f"scaling.num_workers={workers}",
            "checkpoint.every_steps=1", "checkpoint.max_failures=0", f"model.name={module}:build",
            f"model.params.kill_at_call={kill_at}", f"model.params.marker={marker}"])

    plan = plan_run(settings(before), config_name="midepoch")
    with pytest.raises(OrchestratorError):
        run(plan)
    assert marker.exists(), "the worker was not killed: the test proved nothing"
    killed = read_lineage(orchestrator.connect(street).runs, plan.run_id)  # as the store holds it
    assert killed.status == "failed" and [m["epoch"] for m in killed.metrics] == list(range(killed_in))
    assert killed.position and killed.position["epoch"] == killed_in, killed.position

    resumed = run(plan_run(settings(after), resume=plan.run_id))
    assert resumed.status == "finished" and resumed.position is None
    expected = multiset_digest(plan.train_ids)
    assert [m["epoch"] for m in resumed.metrics] == list(range(epochs))
    for m in resumed.metrics:  # every epoch: each train item once, none twice, none left out
        assert (m["train_items"], m["train_digest"]) == (len(plan.train_ids), expected), m
    cut = resumed.metrics[killed_in]
    assert cut["attempt_start_epoch"] == killed_in and 0 < cut["resumed_items"] < len(plan.train_ids), cut
    assert all("resumed_items" not in m for m in resumed.metrics if m is not cut)
