"""Which positions a reader visits, in what order: pure functions, tested without I/O.

Shuffling is by runs, then within a buffer: the order of manifest row groups is permuted (as
MosaicML Streaming permutes shards); within each window of ``window`` row groups the positions
are cut into runs of ``run`` adjacent items (adjacent in the manifest, so adjacent in a pack),
the runs are permuted, and items are permuted within each buffer of ``buffer`` items' worth of
runs. A buffer's items therefore come from ``buffer / run`` runs spread over the whole window,
and a reader fetches each run with one range request (``packs.plan_reads``) instead of one
request per item; it touches each manifest row group once per window. Deterministic: the order
depends only on (seed, epoch, shard_id, num_shards) and the slice. ``benchmarks/shuffle.py``
measures its quality and cost against MosaicML Streaming's shuffles.

Sharding (DataLoader workers, ranks) is by runs, not by items: the epoch's run sequence (after
the row-group, window and run permutations, before the within-buffer permutation) is cut into
``num_shards`` contiguous spans of equal item count (±1; a span boundary may cut one run in
two), and each shard then permutes items within its part of each buffer. So a shard is whole
runs except at most its first and last, and each worker fetches its own runs with its own range
requests: no two workers read the same pack bytes (dealt item by item, every worker would touch
every run and fetch the merged range of all of them). Unshuffled, shard ``i`` is the contiguous
positions ``[i * n // k, (i + 1) * n // k)``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

#: Adjacent items read as one run (one range request when packed): ~1.5 MB of 23 KB images.
DEFAULT_RUN = 64
#: Items permuted together: runs from ``DEFAULT_BUFFER / DEFAULT_RUN`` places in the window.
DEFAULT_BUFFER = 1024


class Runs(NamedTuple):
    """An epoch (or a shard of it) as segments of adjacent positions, in visiting order:
    segment ``k`` is positions ``starts[k]:ends[k]``, permuted together with the other segments
    of buffer ``buffers[k]`` (non-decreasing)."""

    starts: np.ndarray
    ends: np.ndarray
    buffers: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return self.ends - self.starts


def _runs(starts: list[int], ends: list[int], buffers: list[int]) -> Runs:
    return Runs(np.asarray(starts, np.int64), np.asarray(ends, np.int64), np.asarray(buffers, np.int64))


def epoch_runs(
    groups: np.ndarray, *, shuffle: bool, seed: int, epoch: int, window: int = 4,
    run: int = DEFAULT_RUN, buffer: int = DEFAULT_BUFFER,
) -> Runs:
    """The epoch's runs in visiting order, each tagged with its buffer.

    ``groups[i]`` is the row-group key of position ``i`` (positions of one group are adjacent).
    Unshuffled: one segment of every position. Shuffled: row groups permuted, runs of ``run``
    items (never crossing a row group) permuted within each window of ``window`` groups, and
    grouped ``buffer // run`` runs to a buffer; depends only on (seed, epoch)."""
    n = len(groups)
    if not shuffle or n == 0:
        return _runs([0] if n else [], [n] if n else [], [0] if n else [])
    if run < 1 or buffer < 1 or window < 1:
        raise ValueError(f"window, run and buffer must be >= 1, got {window}, {run}, {buffer}")
    rng = np.random.default_rng([seed, epoch])
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    ends = np.r_[starts[1:], n]
    blocks = rng.permutation(len(starts))
    per_buffer = max(1, buffer // run)
    out_starts: list[int] = []
    out_ends: list[int] = []
    out_buffers: list[int] = []
    next_buffer = 0
    for w in range(0, len(blocks), window):
        runs = [(s, min(s + run, int(ends[b]))) for b in blocks[w:w + window]
                for s in range(int(starts[b]), int(ends[b]), run)]
        for k, r in enumerate(rng.permutation(len(runs))):
            out_starts.append(runs[r][0])
            out_ends.append(runs[r][1])
            out_buffers.append(next_buffer + k // per_buffer)
        next_buffer += -(-len(runs) // per_buffer)
    return _runs(out_starts, out_ends, out_buffers)


def shard_bounds(n: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """Shard ``shard_id``'s span ``[lo, hi)`` of an epoch of ``n`` items: spans are contiguous,
    disjoint, cover ``0..n`` exactly once and differ in length by at most one. Shards ``a..b``
    of ``k`` together are exactly ``[a * n // k, (b + 1) * n // k)``, so a rank's workers
    together hold the rank's span (``TorchItems.__len__`` relies on it)."""
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard {shard_id} out of range for {num_shards} shards")
    return shard_id * n // num_shards, (shard_id + 1) * n // num_shards


def shard_runs(runs: Runs, shard_id: int, num_shards: int) -> Runs:
    """Shard ``shard_id`` of ``num_shards``: the segments of items ``shard_bounds`` of the
    epoch's run sequence, the first and last cut where the bounds fall inside a run."""
    lengths = runs.lengths
    cum = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    lo, hi = shard_bounds(int(cum[-1]), shard_id, num_shards)
    if lo == hi:
        return _runs([], [], [])
    first = int(np.searchsorted(cum, lo, side="right")) - 1
    last = int(np.searchsorted(cum, hi, side="left"))  # exclusive
    starts = runs.starts[first:last].copy()
    ends = runs.ends[first:last].copy()
    starts[0] += lo - cum[first]
    ends[-1] -= cum[last] - hi
    return Runs(starts, ends, runs.buffers[first:last].copy())


def runs_order(runs: Runs, *, shuffle: bool, seed: int, epoch: int, shard_id: int = 0,
               num_shards: int = 1) -> np.ndarray:
    """The positions of ``runs`` in visiting order: segments in order, and (shuffled) items
    permuted within each buffer, by a generator of (seed, epoch, shard_id, num_shards)."""
    lengths = runs.lengths
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    seg_first = np.r_[0, np.cumsum(lengths)[:-1]]
    positions = np.repeat(runs.starts - seg_first, lengths) + np.arange(total, dtype=np.int64)
    if not shuffle:
        return positions
    rng = np.random.default_rng([seed, epoch, num_shards, shard_id])
    # Sort by buffer (kept in order), then by a random key: a permutation within each buffer.
    within = np.lexsort((rng.random(total), np.repeat(runs.buffers, lengths)))
    return positions[within]


def epoch_order(
    groups: np.ndarray, *, shuffle: bool, seed: int, epoch: int, window: int = 4,
    run: int = DEFAULT_RUN, buffer: int = DEFAULT_BUFFER, shard_id: int = 0, num_shards: int = 1,
) -> np.ndarray:
    """Positions of shard ``shard_id`` of ``num_shards`` (of 0..len(groups)-1) in visiting order.

    Unshuffled: ascending. Shuffled: a permutation (of the shard's runs) that depends only on
    (seed, epoch, shard_id, num_shards); runs never cross a row group. Over all shards, every
    position exactly once."""
    runs = epoch_runs(groups, shuffle=shuffle, seed=seed, epoch=epoch, window=window, run=run, buffer=buffer)
    mine = shard_runs(runs, shard_id, num_shards)
    return runs_order(mine, shuffle=shuffle, seed=seed, epoch=epoch, shard_id=shard_id, num_shards=num_shards)
