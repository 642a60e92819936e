"""Ray Data re-reads the cluster's resources every 0.1 s (not every second) in a process that
executes a pipeline over our items (``ray_runtime.prompt_resource_limits``): an execution takes
zero resources until it reads them, and under zero it runs one read task at a time."""

from __future__ import annotations

import logging

import pytest
from ray.data._internal.execution.resource_manager import ResourceManager

from orchestrator import ray_runtime


@pytest.fixture
def ray_default(monkeypatch):
    """Ray's own refresh interval, and ``prompt_resource_limits`` not yet run in this process."""
    monkeypatch.setattr(ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S", 1)
    ray_runtime.prompt_resource_limits.cache_clear()
    yield
    ray_runtime.prompt_resource_limits.cache_clear()


def test_it_lowers_ray_s_interval_and_never_raises_it(ray_default, monkeypatch):
    assert ray_runtime.prompt_resource_limits() is True
    assert ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S == ray_runtime.RESOURCE_LIMITS_REFRESH_S == 0.1
    monkeypatch.setattr(ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S", 0.02)
    ray_runtime.prompt_resource_limits.cache_clear()
    assert ray_runtime.prompt_resource_limits() is True
    assert ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S == 0.02


def test_a_ray_without_the_setting_is_left_alone_with_a_warning(ray_default, monkeypatch, caplog):
    monkeypatch.delattr(ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S")
    with caplog.at_level(logging.WARNING, logger=ray_runtime.log.name):
        assert ray_runtime.prompt_resource_limits() is False
    assert "one read task at a time" in caplog.text
    assert not hasattr(ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S")


@pytest.mark.parametrize("store_uri", ["file"], indirect=True)
def test_running_a_pipeline_over_our_items_sets_it_where_the_pipeline_executes(ray_cluster, street, ray_default):
    assert ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S == 1
    rows = street.dataset("street").to_ray().take_all()
    assert len(rows) == 60
    assert ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S == ray_runtime.RESOURCE_LIMITS_REFRESH_S
