"""The object store a local Ray cluster gets (``ray_runtime.local_object_store_bytes``): sized to
the read tasks a pipeline runs at once, never more than Ray's own default, overridable."""

from __future__ import annotations

import pytest

from orchestrator import ray_runtime
from orchestrator.errors import OrchestratorError

GIB = 2**30


@pytest.fixture
def machine(monkeypatch):
    """A machine with ``cores`` usable cores and ``memory`` bytes of RAM."""
    import ray._common.utils

    import orchestrator.machine

    def set_machine(cores: int, memory: int) -> None:
        monkeypatch.setattr(orchestrator.machine, "usable_cores", lambda: cores)
        monkeypatch.setattr(ray._common.utils, "get_system_memory", lambda: memory)

    monkeypatch.delenv("ORCHESTRATOR_RAY_OBJECT_STORE_MB", raising=False)
    return set_machine


@pytest.mark.parametrize(("cores", "memory", "expected"), [
    (2, 23 * GIB, 1 * GIB),  # this laptop: 512 MiB per read slot, two slots
    (1, 23 * GIB, 1 * GIB),  # at least two read slots
    (16, 64 * GIB, 8 * GIB),
    (16, 8 * GIB, int(0.3 * 8 * GIB)),  # never above Ray's default, 30% of the memory
])
def test_a_local_store_holds_each_read_task_s_blocks_and_no_more_than_ray_s_default(machine, cores, memory, expected):
    machine(cores, memory)
    assert ray_runtime.local_object_store_bytes() == expected


def test_the_environment_overrides_it(machine, monkeypatch):
    machine(2, 23 * GIB)
    monkeypatch.setenv("ORCHESTRATOR_RAY_OBJECT_STORE_MB", "3072")
    assert ray_runtime.local_object_store_bytes() == 3 * GIB


@pytest.mark.parametrize("bad", ["lots", "1.5", "10", "-1"])
def test_a_bad_override_names_the_variable_and_the_fix(machine, monkeypatch, bad):
    machine(2, 23 * GIB)
    monkeypatch.setenv("ORCHESTRATOR_RAY_OBJECT_STORE_MB", bad)
    with pytest.raises(OrchestratorError, match="ORCHESTRATOR_RAY_OBJECT_STORE_MB") as caught:
        ray_runtime.local_object_store_bytes()
    assert "whole number of MB" in caught.value.hint
