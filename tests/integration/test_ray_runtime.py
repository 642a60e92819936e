"""ray_runtime on a running cluster: the warm-up starts distinct worker processes, and how many
read tasks a pipeline runs at once by default."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_warm_up_starts_that_many_distinct_workers():
    from orchestrator import ray_runtime

    assert ray_runtime.warm_up(3, timeout_s=120) == 3


def test_read_concurrency_is_the_cores_on_a_cluster_of_our_own_else_eight(monkeypatch):
    from orchestrator import ray_runtime
    from orchestrator.machine import usable_cores

    assert ray_runtime.read_concurrency() == ray_runtime.ATTACHED_READ_CONCURRENCY == 8  # the session's cluster
    monkeypatch.setattr(ray_runtime, "_STARTED_LOCAL", type(ray_runtime._STARTED_LOCAL)())
    ray_runtime._STARTED_LOCAL.set()
    assert ray_runtime.read_concurrency() == max(2, usable_cores())
