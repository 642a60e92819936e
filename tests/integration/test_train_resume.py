"""Resuming a run: the recorded config is what a resume trains, checked before Ray starts."""

from __future__ import annotations

import pytest

import orchestrator
from orchestrator.errors import ConfigError
from orchestrator.train.config import load_config
from orchestrator.train.lineage import write_lineage
from orchestrator.train.runner import plan_run, resume_conflicts
from tests.conftest import REPO, run_cli


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, demo_small):
    """A store with an interrupted 2-epoch run that finished epoch 0 (a record, no Ray)."""
    uri = f"file://{tmp_path_factory.mktemp('resume') / 'store'}"
    orchestrator.connect(uri).ingest("street", coco=demo_small / "annotations.json", images=demo_small / "images")
    plan = plan_run(_settings(uri), config_name="street_torch")
    plan.lineage.status, plan.lineage.metrics = "interrupted", [{"epoch": 0, "train_loss": 1.0}]
    write_lineage(plan.store.runs, plan.lineage)
    return uri, plan.run_id


def _settings(uri: str, *extra: str):
    return load_config(REPO / "configs" / "street_torch.yaml", [f"store={uri}", "train.epochs=2", *extra])


def test_a_resume_with_the_recorded_config_is_planned_on_the_recorded_version(interrupted):
    uri, run_id = interrupted
    orchestrator.connect(uri).delete("street", ["street_000001.jpg"])  # a newer version exists now
    plan = plan_run(_settings(uri, "scaling.num_workers=1", "data.decode_concurrency=1"), resume=run_id)
    assert plan.run_id == run_id and plan.lineage.version == 0 and len(plan.lineage.metrics) == 1


def test_a_resume_with_a_changed_query_split_or_learning_rate_is_refused_naming_the_keys(interrupted):
    uri, run_id = interrupted
    with pytest.raises(ConfigError) as err:
        plan_run(_settings(uri, "query=labels.car >= 1", "split.seed=7", "train.learning_rate=0.5"),
                 resume=run_id)
    message = str(err.value)
    for key in ("query: None -> 'labels.car >= 1'", "split.seed: 0 -> 7", "train.learning_rate: 0.002 -> 0.5"):
        assert key in message, message
    with pytest.raises(ConfigError, match="train.epochs: 2 -> 3"):
        plan_run(_settings(uri, "train.epochs=3"), resume=run_id)
    assert plan_run(_settings(uri, "train.epochs=3"), resume=run_id, extend_epochs=True).settings.train.epochs == 3


def test_a_finished_run_is_extended_only_on_request(interrupted, tmp_path):
    uri, _ = interrupted
    plan = plan_run(_settings(uri), config_name="street_torch")
    plan.lineage.status = "finished"
    plan.lineage.metrics = [{"epoch": 0}, {"epoch": 1}]
    write_lineage(plan.store.runs, plan.lineage)
    with pytest.raises(ConfigError, match="finished all 2 of its epochs") as err:
        plan_run(_settings(uri), resume=plan.run_id)
    assert f"--resume {plan.run_id} --set train.epochs=3" in err.value.hint
    # The CLI: --resume with the config's own epochs (3) is a difference; --set extends.
    r = run_cli("train", str(REPO / "configs" / "street_torch.yaml"), "--store", uri, "--resume", plan.run_id)
    assert r.returncode == 2 and "train.epochs: 2 -> 3" in r.stderr, r.stderr


def test_resume_conflicts_ignore_placement_and_the_version_spelling():
    recorded = {"store": "file:///a", "version": 0, "train": {"epochs": 2, "batch_size": 8},
                "scaling": {"num_workers": 2}, "data": {"prefetch_batches": 2}}
    now = {"store": "file:///a/", "version": 0, "train": {"epochs": 2, "batch_size": 16},
           "scaling": {"num_workers": 1}, "data": {"prefetch_batches": 4}}
    assert resume_conflicts(recorded, now, extend=False) == ["train.batch_size: 8 -> 16"]
