"""Which positions a reader visits, in what order: pure functions, tested without I/O.

Shuffling is by runs, then within a buffer: the order of manifest row groups is permuted (as
MosaicML Streaming permutes shards); within each window of ``window`` row groups the positions
are cut into runs of ``run`` adjacent items (adjacent in the manifest, so adjacent in a pack),
the runs are permuted, and items are permuted within each buffer of ``buffer`` items' worth of
runs. A buffer's items therefore come from ``buffer / run`` runs spread over the whole window,
and a reader fetches each run with one range request (``packs.plan_reads``) instead of one
request per item; it touches each manifest row group once per window. Deterministic: the order
depends only on (seed, epoch) and the slice. ``benchmarks/shuffle.py`` measures its quality and
cost against MosaicML Streaming's shuffles.
"""

from __future__ import annotations

import numpy as np

#: Adjacent items read as one run (one range request when packed): ~1.5 MB of 23 KB images.
DEFAULT_RUN = 64
#: Items permuted together: runs from ``DEFAULT_BUFFER / DEFAULT_RUN`` places in the window.
DEFAULT_BUFFER = 1024


def epoch_order(
    groups: np.ndarray, *, shuffle: bool, seed: int, epoch: int, window: int = 4,
    run: int = DEFAULT_RUN, buffer: int = DEFAULT_BUFFER,
) -> np.ndarray:
    """Positions 0..len(groups)-1 in visiting order.

    ``groups[i]`` is the row-group key of position ``i`` (positions of one group are adjacent).
    Unshuffled: ascending. Shuffled: a permutation that depends only on (seed, epoch); runs
    never cross a row group.
    """
    n = len(groups)
    if not shuffle or n == 0:
        return np.arange(n, dtype=np.int64)
    if run < 1 or buffer < 1 or window < 1:
        raise ValueError(f"window, run and buffer must be >= 1, got {window}, {run}, {buffer}")
    rng = np.random.default_rng([seed, epoch])
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    ends = np.r_[starts[1:], n]
    blocks = rng.permutation(len(starts))
    per_buffer = max(1, buffer // run)
    out = []
    for w in range(0, len(blocks), window):
        runs = [(s, min(s + run, int(ends[b]))) for b in blocks[w:w + window]
                for s in range(int(starts[b]), int(ends[b]), run)]
        picked = rng.permutation(len(runs))
        for k in range(0, len(picked), per_buffer):
            idx = np.concatenate([np.arange(*runs[r]) for r in picked[k:k + per_buffer]])
            out.append(rng.permutation(idx))
    return np.concatenate(out).astype(np.int64)


def shard(order: np.ndarray, shard_id: int, num_shards: int) -> np.ndarray:
    """Every ``num_shards``-th position from ``shard_id``: shards are disjoint, cover ``order``
    exactly once, and differ in length by at most one."""
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard {shard_id} out of range for {num_shards} shards")
    return order[shard_id::num_shards]
