"""train.placement pure parts: does a run's request (workers' bundles plus their node-local data
stages) fit the cluster's nodes, under each placement strategy, and which autoscaler node types
could provide it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator.train.config import ScalingSettings
from orchestrator.train.placement import (
    DATA_CPUS_PER_WORKER,
    NodeType,
    ResourceRequest,
    node_types_from_cluster_yaml,
    node_types_that_fit,
    placeable,
    unschedulable_message,
    workers_that_fit,
)

REPO = Path(__file__).resolve().parent.parent


def _req(n: int, cpus: float = 1.0, *, gpu: bool = False, strategy: str = "PACK") -> ResourceRequest:
    return ResourceRequest.from_settings(ScalingSettings(
        num_workers=n, cpus_per_worker=cpus, use_gpu=gpu, placement_strategy=strategy))


def test_request_is_the_bundles_plus_the_data_stages_on_each_workers_node():
    r = _req(2, 3, gpu=True)
    assert r.bundle == {"CPU": 3.0, "GPU": 1.0}
    assert r.per_worker_on_node == {"CPU": 3.0 + DATA_CPUS_PER_WORKER, "GPU": 1.0}
    assert r.total == {"CPU": 2 * (3.0 + DATA_CPUS_PER_WORKER), "GPU": 2.0}


@pytest.mark.parametrize(
    "request_, nodes, fit",
    [
        (_req(2), [{"CPU": 8}], 2),
        (_req(40), [{"CPU": 8}], 4),  # 8 CPUs hold 4 workers with their data stages
        (_req(2, 3), [{"CPU": 1}, {"CPU": 4}], 1),  # one worker per 4-CPU node
        (_req(2, 3), [{"CPU": 1}, {"CPU": 4}, {"CPU": 4}], 2),
        (_req(2, 3, strategy="STRICT_PACK"), [{"CPU": 4}, {"CPU": 4}], 1),  # not both on one
        (_req(2, 3, strategy="STRICT_PACK"), [{"CPU": 8}], 2),
        (_req(3, 1, strategy="STRICT_SPREAD"), [{"CPU": 8}], 1),
        (_req(3, 1, strategy="STRICT_SPREAD"), [{"CPU": 2}, {"CPU": 2}, {"CPU": 2}], 3),
        (_req(1, gpu=True), [{"CPU": 16}], 0),
        (_req(2, gpu=True), [{"CPU": 16, "GPU": 1}, {"CPU": 4, "GPU": 1}], 2),
        (_req(3, 0.1), [{"CPU": 3.3}], 3),  # no float rounding loses a worker
        (_req(1), [{"CPU": 0}], 0),  # a CPU-0 head holds nothing
    ],
)
def test_workers_that_fit_each_placement_strategy(request_, nodes, fit):
    assert workers_that_fit(request_, nodes) == fit


def test_node_types_that_could_provide_a_request():
    types = [NodeType("head", {"CPU": 0}, 0), NodeType("cpu_worker", {"CPU": 16}, 4),
             NodeType("small", {"CPU": 2}, 2), NodeType("gpu_worker", {"CPU": 4, "GPU": 1}, 4),
             NodeType("unbounded", {"CPU": 4}, -1)]
    assert [t.name for t in node_types_that_fit(_req(4), types)] == ["cpu_worker", "gpu_worker", "unbounded"]
    assert [t.name for t in node_types_that_fit(_req(40), types)] == ["unbounded"]  # 16/2 x 4 = 32 < 40
    assert [t.name for t in node_types_that_fit(_req(4, gpu=True), types)] == ["gpu_worker"]
    assert node_types_that_fit(_req(5, gpu=True), types) == []
    assert [t.name for t in node_types_that_fit(_req(2, 3, strategy="STRICT_PACK"), types)] == ["cpu_worker"]


def test_the_message_names_what_was_asked_what_the_cluster_has_and_what_could_provide_it():
    msg = unschedulable_message(_req(40), nodes=[{"CPU": 8}], free={"CPU": 6.5}, node_types=None,
                                waited_s=None)
    assert "40 workers" in msg and "{CPU: 1}" in msg and "80 CPU in all" in msg
    assert "1 node" in msg and "8 CPU" in msg and "6.5 CPU free" in msg and "at most 4" in msg
    types = [NodeType("cpu_worker", {"CPU": 16}, 8), NodeType("small", {"CPU": 2}, 1)]
    msg = unschedulable_message(_req(40), nodes=[{"CPU": 8}], free={"CPU": 8}, node_types=types,
                                waited_s=12.0)
    assert "cpu_worker" in msg and "small" not in msg.split("could provide")[1]
    assert "12 s" in msg and "scaling.schedule_timeout_s" in msg
    msg = unschedulable_message(_req(40), nodes=[{"CPU": 8}], free={"CPU": 8},
                                node_types=[NodeType("small", {"CPU": 2}, 1)], waited_s=None)
    assert "no autoscaler node type" in msg and "small" in msg


def test_placeable_now_later_or_never():
    eight = [{"CPU": 8}]
    assert placeable(_req(2), eight, None, may_grow=False) == "now"
    assert placeable(_req(40), eight, None, may_grow=False) == "never"  # a local cluster we started
    assert placeable(_req(40), eight, None, may_grow=True) == "later"  # attached: nodes may join
    assert placeable(_req(40), eight, [NodeType("cpu_worker", {"CPU": 16}, 8)], may_grow=True) == "later"
    assert placeable(_req(40), eight, [NodeType("cpu_worker", {"CPU": 16}, 2)], may_grow=True) == "never"
    # no single type suffices, the existing node and two types together do
    mixed = [NodeType("a", {"CPU": 4}, 1), NodeType("b", {"CPU": 2}, 1)]
    assert node_types_that_fit(_req(7), mixed, eight) == []
    assert placeable(_req(7), eight, mixed, may_grow=True) == "later"
    assert placeable(_req(2, gpu=True), eight, [], may_grow=True) == "never"


def test_the_shipped_cluster_yaml_names_its_worker_types_for_a_request():
    types = node_types_from_cluster_yaml(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    assert {t.name: (t.resources, t.max_count) for t in types} == {
        "cpu_worker": ({"CPU": 16.0}, 16), "gpu_worker": ({"CPU": 4.0, "GPU": 1.0}, 4)}
    head_only = [{"CPU": 0.0}]  # the head advertises CPU 0
    assert placeable(_req(4), head_only, types, may_grow=True) == "later"
    assert [t.name for t in node_types_that_fit(_req(4, gpu=True), types, head_only)] == ["gpu_worker"]
    assert placeable(_req(5, gpu=True), head_only, types, may_grow=True) == "never"  # 4 g5 nodes at most
