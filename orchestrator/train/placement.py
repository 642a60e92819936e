"""Can the cluster place a run? Compare the request with the nodes that exist and could be added.

A run asks Ray Train for ``scaling.num_workers`` bundles of ``{CPU: cpus_per_worker}`` (plus
``{GPU: 1}`` with ``use_gpu``) in one placement group with ``scaling.placement_strategy``. Each
worker's data stages (scan 0.25, one fetch+decode actor 0.5, resize 0.25 CPU; see
``adapters/ray.py`` and ``train/data.py``) are pinned to that worker's node and wait there for a
free CPU, so a node holds ``k`` workers only if ``k × (bundle + DATA_CPUS_PER_WORKER CPU)`` fits
in its resources. Each bundle has to fit on one node; the strategy says how bundles may share
nodes (``STRICT_PACK``: all on one, ``STRICT_SPREAD``: one per node, ``PACK``/``SPREAD``: any).

Ray waits for a placement group it cannot create without end (its controller retries every
``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``). The runner asks this module twice: before fitting,
to refuse a run that nothing in the cluster, or that its autoscaler could add, can hold; and,
when ``scaling.schedule_timeout_s`` passes without the workers starting, for the message.

The functions on requests, nodes and node types are pure; ``cluster_nodes``,
``free_resources`` and ``autoscaler_node_types`` read the connected cluster.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from orchestrator.train.config import ScalingSettings

log = logging.getLogger(__name__)

DATA_CPUS_PER_WORKER = 1.0  # scan 0.25 + one fetch/decode actor 0.5 + resize 0.25, on the worker's node
_EPS = 1e-9  # 3.3 / 1.1 must count as 3
_UNBOUNDED = 10**9
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` leaves the autoscaler's config on the head

Resources = dict[str, float]


@dataclass(frozen=True)
class ResourceRequest:
    """What a run needs: ``num_workers`` bundles, each with its data stages beside it."""

    num_workers: int
    bundle: Resources  # one worker's placement-group bundle
    strategy: str
    data_cpus_per_worker: float = DATA_CPUS_PER_WORKER

    @classmethod
    def from_settings(cls, scaling: ScalingSettings) -> ResourceRequest:
        """The request the runner's ``ScalingConfig`` makes (Ray Train adds ``GPU: 1`` per
        worker with ``use_gpu``)."""
        bundle = {"CPU": float(scaling.cpus_per_worker)}
        if scaling.use_gpu:
            bundle["GPU"] = 1.0
        return cls(scaling.num_workers, bundle, scaling.placement_strategy)

    @property
    def per_worker_on_node(self) -> Resources:
        """A worker's bundle plus its data stages: what its node must hold for it."""
        need = dict(self.bundle)
        need["CPU"] = need.get("CPU", 0.0) + self.data_cpus_per_worker
        return need

    @property
    def total(self) -> Resources:
        return {k: v * self.num_workers for k, v in self.per_worker_on_node.items()}


@dataclass(frozen=True)
class NodeType:
    """An autoscaler node type: the resources of one node, and how many it may launch (-1: no limit)."""

    name: str
    resources: Resources
    max_count: int


def _per_node(request: ResourceRequest, resources: Resources) -> int:
    """How many of the request's workers one node of ``resources`` holds."""
    counts = [math.floor(resources.get(k, 0.0) / v + _EPS) for k, v in request.per_worker_on_node.items() if v > 0]
    return max(0, min(counts)) if counts else _UNBOUNDED


def workers_that_fit(request: ResourceRequest, nodes: Sequence[Resources]) -> int:
    """The most workers of ``request`` (at most ``num_workers``) that ``nodes`` hold together
    under its strategy; the request fits when this is ``num_workers``."""
    counts = [_per_node(request, n) for n in nodes]
    if request.strategy == "STRICT_PACK":
        k = max(counts, default=0)
    elif request.strategy == "STRICT_SPREAD":
        k = sum(1 for c in counts if c >= 1)
    else:
        k = sum(counts)
    return min(k, request.num_workers)


def _type_capacity(request: ResourceRequest, t: NodeType) -> int:
    """Workers that nodes of type ``t`` alone hold, launched up to its limit."""
    per = _per_node(request, t.resources)
    if per < 1 or t.max_count == 0:
        return 0
    count = _UNBOUNDED if t.max_count < 0 else t.max_count
    if request.strategy == "STRICT_PACK":
        return per
    if request.strategy == "STRICT_SPREAD":
        return count
    return min(per * count, _UNBOUNDED)


def node_types_that_fit(request: ResourceRequest, node_types: Sequence[NodeType],
                        existing: Sequence[Resources] = ()) -> list[NodeType]:
    """The node types whose nodes, added to the ``existing`` ones, could hold the request. One
    type at a time: an autoscaler may mix types, so an empty answer is checked against all of
    them together by :func:`placeable`."""
    have = 0 if request.strategy == "STRICT_PACK" else workers_that_fit(request, existing)
    return [t for t in node_types if have + _type_capacity(request, t) >= request.num_workers]


def placeable(request: ResourceRequest, nodes: Sequence[Resources],
              node_types: Sequence[NodeType] | None, *, may_grow: bool) -> Literal["now", "later", "never"]:
    """``now``: the nodes there are hold the request (it may still wait for busy resources);
    ``later``: only with nodes an autoscaler could add (``node_types``; when they are unknown,
    ``may_grow`` says whether the cluster can grow at all); ``never``: nothing could hold it."""
    if workers_that_fit(request, nodes) >= request.num_workers:
        return "now"
    if node_types is None:
        return "later" if may_grow else "never"
    if request.strategy == "STRICT_PACK":
        ok = any(_type_capacity(request, t) >= request.num_workers for t in node_types)
    else:
        ok = workers_that_fit(request, nodes) + sum(_type_capacity(request, t) for t in node_types) \
            >= request.num_workers
    return "later" if ok else "never"


def _fmt(resources: Resources, braces: bool = True) -> str:
    if braces:
        return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"
    return " + ".join(f"{v:g} {k}" for k, v in sorted(resources.items())) or "nothing"


def _sum(nodes: Sequence[Resources], keys: Sequence[str]) -> Resources:
    return {k: sum(n.get(k, 0.0) for n in nodes) for k in keys}


def unschedulable_message(request: ResourceRequest, nodes: Sequence[Resources], free: Resources,
                          node_types: Sequence[NodeType] | None, waited_s: float | None) -> str:
    """What was asked, what the cluster has, and (autoscaling) which node types could provide it."""
    n, keys = request.num_workers, sorted(request.per_worker_on_node)
    text = (f"{n} workers × {_fmt(request.bundle)} (placement {request.strategy}), each with "
            f"{request.data_cpus_per_worker:g} CPU for its data stages on its node: "
            f"{_fmt(request.total, braces=False)} in all. The cluster has {len(nodes)} "
            f"node{'s' if len(nodes) != 1 else ''} with {_fmt(_sum(nodes, keys), braces=False)} "
            f"({_fmt({k: free.get(k, 0.0) for k in keys}, braces=False)} free now): room for at most "
            f"{workers_that_fit(request, nodes)} such workers.")
    if node_types is not None:
        fitting = node_types_that_fit(request, node_types, nodes)
        if fitting:
            text += " Autoscaler node types that could provide them: " + ", ".join(
                f"{t.name} ({_fmt(t.resources)}, up to "
                f"{'any number of' if t.max_count < 0 else t.max_count} nodes)" for t in fitting) + "."
        else:
            text += " And no autoscaler node type can provide them (" + (", ".join(
                f"{t.name} {_fmt(t.resources)} × {t.max_count}" for t in node_types) or "none") + ")."
    if waited_s is not None:
        text += f" Waited {waited_s:.0f} s for the workers to be placed (scaling.schedule_timeout_s)."
    return text


def cluster_nodes() -> list[Resources]:
    """Total resources of each alive node of the connected cluster."""
    import ray

    return [{k: float(v) for k, v in n.get("Resources", {}).items()} for n in ray.nodes() if n.get("Alive")]


def free_resources() -> Resources:
    import ray

    return {k: float(v) for k, v in ray.available_resources().items()}


def autoscaler_node_types() -> list[NodeType] | None:
    """The node types the cluster's autoscaler may launch, or None when this driver cannot
    know them: from the cluster config in the GCS (what Ray Train itself consults), else from
    the config ``ray up`` leaves on the head (``~/ray_bootstrap_config.yaml``), minus the head
    type (that node exists already)."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - best effort: a Ray without it, a GCS hiccup
        log.debug("no cluster config in the GCS", exc_info=True)
        config = None
    if config is not None and config.node_group_configs:
        return [NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.max_count))
                for g in config.node_group_configs]
    path = os.path.expanduser(BOOTSTRAP_CONFIG)
    if not os.path.exists(path):
        return None
    import yaml

    try:
        with open(path) as f:
            return node_types_from_cluster_yaml(yaml.safe_load(f) or {})
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError):
        log.warning("cannot read the autoscaler config %s", path, exc_info=True)
        return None


def node_types_from_cluster_yaml(doc: dict) -> list[NodeType]:
    """The worker node types of a ``ray up`` cluster config (``available_node_types`` without
    the head type; a type's ``max_workers`` defaults to the global one)."""
    head = doc.get("head_node_type")
    cap = int(doc.get("max_workers", -1))
    return [NodeType(name, {k: float(v) for k, v in (spec.get("resources") or {}).items()},
                     int(spec.get("max_workers", cap)))
            for name, spec in (doc.get("available_node_types") or {}).items() if name != head]
