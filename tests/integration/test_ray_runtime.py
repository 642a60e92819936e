"""ray_runtime on a running cluster: the warm-up starts distinct worker processes, read tasks
get the same worker environment wherever they are submitted (the driver, a Ray Train actor),
and how many read tasks a pipeline runs at once by default."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_warm_up_starts_that_many_distinct_workers():
    from orchestrator import ray_runtime

    assert ray_runtime.warm_up(3, timeout_s=120) == 3


def _arenas_here() -> tuple[int, int, int]:
    import os
    import time

    from orchestrator.stream import buffers

    time.sleep(0.3)  # overlapping probes land on distinct workers
    arenas = buffers._PROCESS_ARENAS
    return os.getpid(), 0 if arenas is None else arenas.capacity, 0 if arenas is None else len(arenas._arenas)


@pytest.mark.parametrize(("block_mib", "opt_out"), [(1, False), (2, True)])
def test_warm_up_with_arenas_writes_each_workers_block_arenas_for_the_drivers_block_size(
        monkeypatch, block_mib: int, opt_out: bool):
    """The warm-up of a local cluster started for a ``to_ray`` pipeline also allocates and writes
    each read worker's block arenas (``adapters.ray.arena_warm_up`` as its ``prepare``), sized
    for the driver's target block size, so the first epoch does not clear fresh pages;
    ``ORCHESTRATOR_RAY_PREFAULT_ARENAS=0`` leaves them to the first epoch."""
    import ray
    from ray.data import DataContext

    from orchestrator import ray_runtime
    from orchestrator.adapters.ray import arena_warm_up
    from orchestrator.stream.buffers import arena_capacity

    if opt_out:
        monkeypatch.setenv("ORCHESTRATOR_RAY_PREFAULT_ARENAS", "0")
    ctx = DataContext.get_current()
    saved = ctx.target_max_block_size
    ctx.target_max_block_size = block_mib << 20  # a capacity no pipeline of the session asks for
    try:
        prepare = arena_warm_up()
        assert (prepare is None) == opt_out
        assert ray_runtime.warm_up(2, timeout_s=120, prepare=prepare) == 2
        probe = ray.remote(num_cpus=0)(_arenas_here).options(runtime_env=ray_runtime.task_env())
        seen = ray.get([probe.remote() for _ in range(2)])
    finally:
        ctx.target_max_block_size = saved
    capacities = {capacity for _, capacity, _ in seen}
    if opt_out:
        assert arena_capacity(block_mib << 20) not in capacities, seen
    else:
        assert (arena_capacity(block_mib << 20), 2) in {(capacity, count) for _, capacity, count in seen}, seen


def test_read_concurrency_is_the_cores_on_a_cluster_of_our_own_else_eight(monkeypatch):
    from orchestrator import ray_runtime
    from orchestrator.machine import usable_cores

    assert ray_runtime.read_concurrency() == ray_runtime.ATTACHED_READ_CONCURRENCY == 8  # the session's cluster
    monkeypatch.setattr(ray_runtime, "_STARTED_LOCAL", type(ray_runtime._STARTED_LOCAL)())
    ray_runtime._STARTED_LOCAL.set()
    assert ray_runtime.read_concurrency() == max(2, usable_cores())


def _env_and_pid() -> tuple[str, int]:
    import os

    import ray

    return ray.get_runtime_context().get_runtime_env_string(), os.getpid()


class _LikeTrainWorker:
    """An actor started as Ray Train starts its controller (whose environment its workers,
    and every task they submit, inherit): the job's environment plus Train's variables."""

    def submit(self, explicit: bool) -> tuple[str, int]:
        import ray

        from orchestrator.ray_runtime import task_env

        task = ray.remote(num_cpus=0.5)(_env_and_pid)
        return ray.get((task.options(runtime_env=task_env()) if explicit else task).remote())


def test_read_tasks_get_one_worker_environment_wherever_submitted():
    """A task runs only in a worker started for exactly its runtime environment's text, and a
    train worker's differs from the driver's (Train adds RAY_WARN_BLOCKING_GET_INSIDE_ASYNC):
    read tasks it submitted waited for new worker processes although the warm-up had started
    some. With ``task_env`` asked for explicitly, the driver's and the train worker's tasks (and
    the warm-up's) share one environment, so one pool of workers."""
    import os

    import ray

    from orchestrator import ray_runtime

    # as TrainController gets it: the propagated variables set here, and Train's default
    train_env = {"env_vars": {**{name: os.environ[name] for name in ray_runtime.TRAIN_PROPAGATED_ENV
                                 if name in os.environ},
                              "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0"}}
    actor = ray.remote(num_cpus=0)(_LikeTrainWorker).options(runtime_env=train_env).remote()
    task = ray.remote(num_cpus=0.5)(_env_and_pid)
    from_driver, _ = ray.get(task.options(runtime_env=ray_runtime.task_env()).remote())
    inherited, _ = ray.get(actor.submit.remote(False))
    explicit, _ = ray.get(actor.submit.remote(True))
    plain, _ = ray.get(task.remote())
    assert explicit == from_driver == inherited
    assert plain != inherited  # the job's own environment: the reason for task_env


def test_task_env_names_what_ray_train_propagates(monkeypatch):
    """``TRAIN_PROPAGATED_ENV`` mirrors Ray Train's list (a Ray upgrade that changes it fails
    here), and a variable set in the driver's environment is carried as Train carries it."""
    constants = pytest.importorskip("ray.train.v2._internal.constants")
    from orchestrator import ray_runtime

    assert set(ray_runtime.TRAIN_PROPAGATED_ENV) == set(constants.ENV_VARS_TO_PROPAGATE)
    assert (ray_runtime.TRAIN_ENV_DEFAULTS["RAY_WARN_BLOCKING_GET_INSIDE_ASYNC"]
            == constants.DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
    monkeypatch.delenv("RAY_WARN_BLOCKING_GET_INSIDE_ASYNC", raising=False)
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)  # the suite's (conftest)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "7")
    monkeypatch.setenv("RAY_TRAIN_METRICS_ENABLED", "1")  # driver only: not propagated
    assert ray_runtime.task_env() == {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "7",
                                                   "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0"}}
