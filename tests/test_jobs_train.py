"""jobs/train.py's command line: ``--config FILE`` (or a leading config path) plus the arguments
of ``orchestrator train``, mapped onto that command without starting anything."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

JOB = Path(__file__).resolve().parent.parent / "jobs" / "train.py"


@pytest.fixture(scope="module")
def train_argv():
    spec = importlib.util.spec_from_file_location("jobs_train", JOB)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.train_argv


@pytest.mark.parametrize(("argv", "expected"), [
    (["--config", "c.yaml", "--set", "store=s3://b/p", "--set", "train.epochs=1"],
     ["train", "c.yaml", "--set", "store=s3://b/p", "--set", "train.epochs=1"]),
    (["--set", "a=1", "--config", "c.yaml", "--resume", "--json"],
     ["train", "c.yaml", "--set", "a=1", "--resume", "--json"]),
    (["--resume", "RUN", "--config=c.yaml"], ["train", "c.yaml", "--resume", "RUN"]),
    (["c.yaml", "--set", "a=1"], ["train", "c.yaml", "--set", "a=1"]),  # the config path first, as before
])
def test_job_arguments_become_orchestrator_train_arguments(train_argv, argv, expected):
    assert train_argv(argv) == expected


def test_config_without_a_value_is_a_usage_error(train_argv, capsys):
    with pytest.raises(SystemExit) as exc:
        train_argv(["--config"])
    assert exc.value.code == 2 and "--config" in capsys.readouterr().err
