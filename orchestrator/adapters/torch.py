"""PyTorch: an IterableDataset that splits a slice across DataLoader workers and ranks.

Shard = rank * num_workers + worker id, out of world_size * num_workers: every item is seen
exactly once per epoch in total. ``set_epoch(n)`` changes the shuffle, as with
DistributedSampler. ``collate_items`` batches items with different numbers of boxes.
"""

from __future__ import annotations

import multiprocessing
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from orchestrator.errors import ITEM_ERROR_REASONS
from orchestrator.optional import require
from orchestrator.stream.skips import Skips

torch = require("torch")
from torch.utils.data import IterableDataset, get_worker_info  # noqa: E402

if TYPE_CHECKING:
    from orchestrator.stream.reader import ItemStream


class TorchItems(IterableDataset):
    """Items of a dataset slice as torch-friendly dicts (image stays HWC uint8, as a tensor).

    Built on the slice's ``ItemStream`` (its read plan and index), which is what DataLoader
    workers receive. ``size``: the slice's item count if already known (saves an index build
    for ``len``)."""

    def __init__(self, stream: ItemStream, *, shuffle: bool = False, seed: int = 0,
                 transform: Callable[[dict], Any] | None = None,
                 rank: int | None = None, world_size: int | None = None, size: int | None = None) -> None:
        super().__init__()
        self.stream = stream
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        self.transform = transform
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        # Skips made in DataLoader worker processes, counted by reason where the caller can
        # read them (shared memory, handed to workers when they start).
        self._by_reason = multiprocessing.Array("q", len(ITEM_ERROR_REASONS))

    @property
    def skips(self) -> Skips:
        """Items skipped (missing, corrupt or undecodable blob) by every process that iterated
        this dataset, DataLoader workers included, by reason (each worker also warns once per
        epoch, with the first messages)."""
        with self._by_reason.get_lock():
            counts = list(self._by_reason)
        return Skips(by_reason=Counter({r: n for r, n in zip(ITEM_ERROR_REASONS, counts) if n}))

    @property
    def skipped(self) -> int:
        """How many items ``skips`` counts."""
        return self.skips.count

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank_world(self) -> tuple[int, int]:
        if self.rank is not None or self.world_size is not None:
            return self.rank or 0, self.world_size or 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def shard(self) -> tuple[int, int]:
        """(shard id, number of shards) for the calling process and worker."""
        rank, world = self._rank_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world * workers

    def __iter__(self) -> Iterator[Any]:
        shard_id, num_shards = self.shard()
        before = Counter(self.stream.skips.by_reason)
        try:
            for item in self.stream.iter_items(shuffle=self.shuffle, seed=self.seed, epoch=self.epoch,
                                               shard_id=shard_id, num_shards=num_shards):
                item = to_tensors(item)
                yield self.transform(item) if self.transform is not None else item
        finally:
            added = Counter(self.stream.skips.by_reason)
            added.subtract(before)
            if any(n > 0 for n in added.values()):
                with self._by_reason.get_lock():
                    for k, reason in enumerate(ITEM_ERROR_REASONS):
                        self._by_reason[k] += max(0, added[reason])

    def __len__(self) -> int:
        """Items this rank's workers yield together per epoch."""
        rank, world = self._rank_world()
        n = self.size if self.size is not None else len(self.stream)
        return n // world + (1 if rank < n % world else 0)


def to_tensors(item: dict) -> dict:
    out = dict(item)
    if item["image"] is not None:
        out["image"] = torch.from_numpy(item["image"])
    out["boxes"] = torch.from_numpy(item["boxes"])
    out["labels"] = torch.from_numpy(item["labels"])
    out["polygons"] = [torch.from_numpy(p) for p in item["polygons"]]
    return out


def collate_items(batch: list[dict]) -> dict:
    """Batch items with different box counts: ``boxes`` [B, max_n, 4] zero-padded, ``labels``
    [B, max_n] padded with -1, ``num_boxes`` [B]; images stacked [B, H, W, 3] when they share a
    size, else a list; everything else as lists."""
    n = max((len(b["boxes"]) for b in batch), default=0)
    boxes = torch.zeros(len(batch), n, 4, dtype=torch.float32)
    labels = torch.full((len(batch), n), -1, dtype=torch.int64)
    for i, b in enumerate(batch):
        k = len(b["boxes"])
        if k:
            boxes[i, :k] = torch.as_tensor(b["boxes"])
            labels[i, :k] = torch.as_tensor(b["labels"])
    images = [torch.as_tensor(b["image"]) for b in batch]
    same = len({tuple(im.shape) for im in images}) == 1
    out = {key: [b[key] for b in batch] for key in batch[0] if key not in ("image", "boxes", "labels")}
    out.update(
        image=torch.stack(images) if same else images,
        boxes=boxes,
        labels=labels,
        num_boxes=torch.tensor([len(b["boxes"]) for b in batch], dtype=torch.int64),
    )
    return out
