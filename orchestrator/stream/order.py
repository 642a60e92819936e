"""Which positions a reader visits, in what order: pure functions, tested without I/O.

Shuffling is block-wise, as in MosaicML Streaming: the order of row groups is permuted, then
rows are permuted within windows of a few row groups. Random enough for SGD, and a reader still
touches each manifest row group once per window instead of once per item.
"""

from __future__ import annotations

import numpy as np


def epoch_order(
    groups: np.ndarray, *, shuffle: bool, seed: int, epoch: int, window: int = 4
) -> np.ndarray:
    """Positions 0..len(groups)-1 in visiting order.

    ``groups[i]`` is the row-group key of position ``i`` (positions of one group are adjacent).
    Unshuffled: ascending. Shuffled: a permutation that depends only on (seed, epoch).
    """
    n = len(groups)
    if not shuffle or n == 0:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    ends = np.r_[starts[1:], n]
    blocks = rng.permutation(len(starts))
    out = []
    for w in range(0, len(blocks), window):
        idx = np.concatenate([np.arange(starts[b], ends[b]) for b in blocks[w : w + window]])
        out.append(rng.permutation(idx))
    return np.concatenate(out).astype(np.int64)


def shard(order: np.ndarray, shard_id: int, num_shards: int) -> np.ndarray:
    """Every ``num_shards``-th position from ``shard_id``: shards are disjoint, cover ``order``
    exactly once, and differ in length by at most one."""
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard {shard_id} out of range for {num_shards} shards")
    return order[shard_id::num_shards]
