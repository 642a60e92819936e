"""Each train worker's data: its own shard, fetched and decoded on its own node.

Ray Train's default ``DataConfig`` runs one pipeline for all workers and hands its output blocks
out with ``streaming_split(equal=True, locality_hints=...)``. The hints are best effort: whenever
the local worker is ahead, the splitter gives a block to the worker with the least data, wherever
it was produced, so decoded images cross the network and a node's cache fills with items its
worker never sees. Here the split is decided on item ids before anything is fetched
(:func:`~orchestrator.stream.split.balanced_shards`: sizes within one, stable across restarts) and each
worker's scan → fetch → decode → resize stages are pinned to the node that worker runs on. Every
blob is fetched once per epoch, on the node that trains on it, into that node's cache; when the
worker group is rebuilt (a node lost, a resize), ``configure`` runs again with the new nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import ray.train

from orchestrator.adapters.ray import SkipLedger, to_ray_dataset
from orchestrator.stream.plan import ReadPlan
from orchestrator.stream.split import HashSplit, balanced_shards

if TYPE_CHECKING:
    import ray.data

    from orchestrator.train.position import Resume


@dataclass
class RunData:
    """What a run reads: the read plan (version, slice and access view fixed; picklable, so it
    travels to the Train controller), its train ids and the split."""

    plan: ReadPlan
    train_ids: list[str]
    split: HashSplit  # validation side; the train side is ``train_ids``
    shard_seed: int
    image_size: int
    max_boxes: int

    def pipeline(self, name: str, rank: int, world_size: int, node_id: str | None,
                 shards: list[list[str]] | None = None) -> ray.data.Dataset:
        """``train``: rank's shard; ``validation``: the whole validation side (read by rank 0).
        Rows are the model's fixed-shape examples, made in the read tasks themselves."""
        ledger = SkipLedger.new(self.plan.options.skip_ledger)
        examples = Examples(self.image_size, self.max_boxes)
        # Decoded straight to the model's size (JPEG draft mode, one resize) in the read task.
        plan = self.plan.with_options(self.plan.options.replace(image_size=self.image_size))
        if name == "train":
            shards = shards or balanced_shards(self.train_ids, world_size, self.shard_seed)
            return to_ray_dataset(plan, ledger, item_ids=frozenset(shards[rank]), node_id=node_id,
                                  batch_fn=examples)
        return to_ray_dataset(plan, ledger, self.split, node_id=node_id, batch_fn=examples)


def rest_of_epoch(data: RunData, resume: Resume, rank: int, world_size: int) -> tuple[ray.data.Dataset, int]:
    """This rank's pipeline of the items a mid-epoch checkpoint's epoch had not trained yet
    (``train.position``), on this worker's node, and how many items remain over all ranks.

    The remaining items are dealt over the worker group as it is now (``balanced_shards``: sizes
    within one), which may be larger or smaller than the one that wrote the checkpoint. Built in
    the worker, once, for the resumed epoch; the epochs after it read the shards
    ``NodeLocalDataConfig`` made."""
    remaining = resume.remaining(data.train_ids)
    shards = balanced_shards(remaining, world_size, data.shard_seed)
    rds = data.pipeline("train", rank, world_size, ray.get_runtime_context().get_node_id(), shards)
    rds.context.execution_options = ray.train.DataConfig.default_ingest_options()
    return rds, len(remaining)


class NodeLocalDataConfig(ray.train.DataConfig):
    """A ``DataConfig`` that gives every worker its own node-local pipeline (see module doc)."""

    def __init__(self, data: RunData) -> None:
        super().__init__(datasets_to_split=["train"])
        self._data = data

    @property
    def data(self) -> RunData:
        """What the run reads (the workers' ``data.rest_of_epoch`` needs it too)."""
        return self._data

    def configure(self, datasets: dict[str, Any], world_size: int, worker_handles: Any,
                  worker_node_ids: list[str] | None, **kwargs: Any) -> list[dict[str, Any]]:
        output: list[dict[str, Any]] = [{} for _ in range(world_size)]
        # Ray Train calls this once per dataset name: shard only when "train" is asked for.
        shards = (balanced_shards(self._data.train_ids, world_size, self._data.shard_seed)
                  if "train" in datasets else None)
        for name, base in datasets.items():
            for rank in range(world_size):
                if name in ("train", "validation"):
                    node = worker_node_ids[rank] if worker_node_ids else None
                    rds = self._data.pipeline(name, rank, world_size, node, shards)
                else:
                    rds = base
                rds.context.execution_options = self.default_ingest_options()
                output[rank][name] = rds.iterator()
        return output


@dataclass(frozen=True)
class Examples:
    """A read task's items -> the model's fixed-shape examples (``train.batches.prepare_item``:
    image at ``size`` (the plan decodes to it), boxes normalized and padded to ``max_boxes``), stacked; the Ray
    adapter adds ``id`` and ``fetch_node``. Made where the item was decoded, so no full-size image
    crosses the object store and no per-row stage follows."""

    size: int
    max_boxes: int

    def __call__(self, items: list[dict]) -> dict[str, np.ndarray]:
        from orchestrator.train.batches import prepare_item, stack

        return stack([prepare_item(item, self.size, self.max_boxes) for item in items])
