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
