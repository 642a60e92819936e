"""Deterministic train/validation membership by a hash of ``item_id``.

An item's split depends only on its id, the fraction and the seed: never on the version, the
order or the number of workers, so re-runs and later versions keep every item on its side.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def validation_mask(item_ids: Sequence[str], fraction: float, seed: int = 0) -> np.ndarray:
    """True where an item belongs to the validation split."""
    if fraction <= 0:
        return np.zeros(len(item_ids), dtype=bool)
    cut = int(fraction * 2**64)
    return np.fromiter(
        (int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") < cut
         for i in item_ids),
        dtype=bool, count=len(item_ids),
    )


@dataclass(frozen=True)
class HashSplit:
    """A picklable row filter for one side of the split (used inside Ray Data stages)."""

    fraction: float
    seed: int
    validation: bool

    def keep(self, item_ids: Sequence[str]) -> np.ndarray:
        mask = validation_mask(item_ids, self.fraction, self.seed)
        return mask if self.validation else ~mask


def _shard_key(seed: int, item_id: str) -> bytes:
    return hashlib.sha256(f"shard:{seed}:{item_id}".encode()).digest()[:8]


def balanced_shards(item_ids: Sequence[str], num_shards: int, seed: int = 0) -> list[list[str]]:
    """Split items into ``num_shards`` disjoint shards that together hold every item, of
    ``len // num_shards`` or one more items each.

    Items are ordered by a seeded hash of their id and dealt round robin, so the assignment
    depends only on the ids, the shard count and the seed: a restarted run gives every rank the
    same items, and its node's blob cache stays warm. Why not equal sizes (synchronous training
    needs equal step counts): the training loops equalize steps themselves with zero-weight
    padding (``train.loops``), which also absorbs items skipped for a bad blob; dropping the
    remainder instead left the same items out of every epoch."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    ordered = sorted(set(item_ids), key=lambda i: _shard_key(seed, i))
    if len(ordered) != len(item_ids):
        raise ValueError("item ids must be unique")
    return [ordered[rank::num_shards] for rank in range(num_shards)]
