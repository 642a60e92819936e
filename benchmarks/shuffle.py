"""Shuffle quality and cost: ours (runs within packs, then a buffer) vs MosaicML Streaming's.

    python benchmarks/shuffle.py [--n 1000000] [--item-kb 23] [--seeds 3]

No I/O: both sides get the same layout of ``--n`` items of ``--item-kb`` KB stored in order —
our packs of 32 MB (manifest row groups of 2,048 rows), MosaicML's MDS shards of ``--shard-mb``
— and each algorithm computes one epoch's order with its defaults. Printed per algorithm
(median over seeds):

* ``order s``: seconds to compute the epoch's order (1 process).
* ``displacement``: mean |output index − stored index| / n. A uniform permutation gives 0.333.
* ``batch spread``: distinct hundredths of the dataset (stored index // (n/100)) among the 32
  items of a batch, averaged over batches. A uniform permutation gives ~27.5; a sequential
  read gives 1.
* ``neighbours``: share of consecutive output pairs stored within 64 items of each other
  (uniform: ~128/n; sequential: 1.0).
* cost, ours: range requests per epoch reading the order in 16 MB read-ahead chunks
  (``packs.plan_reads``, default merge gap and request size), and the bytes held (two chunks).
* cost, MosaicML: whole-shard downloads per epoch with its default unbounded local cache (each
  shard once; the disk it fills is printed), and with an LRU shard cache of ``--cache-mb``
  (``cache_limit``: a shard evicted and needed again is downloaded again).

Needs the ``mosaicml-streaming`` package (``pip install -e '.[bench]'``); without it only ours
is printed, and says so.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.manifest import ROW_GROUP_ROWS  # noqa: E402
from orchestrator.packs import DEFAULT_PACK_BYTES, plan_reads  # noqa: E402
from orchestrator.stream.order import epoch_order  # noqa: E402
from orchestrator.stream.plan import StreamOptions  # noqa: E402


def quality(order: np.ndarray) -> dict[str, float]:
    n = len(order)
    out_index = np.arange(n)
    batches = order[: n - n % 32].reshape(-1, 32) * 100 // n
    spread = np.mean([len(np.unique(b)) for b in batches])
    return {
        "displacement": float(np.mean(np.abs(order - out_index)) / n),
        "batch_spread": float(spread),
        "neighbours": float(np.mean(np.abs(np.diff(order)) <= 64)),
    }


def our_requests(order: np.ndarray, item_bytes: int, read_ahead: int) -> int:
    """Range requests a reader makes for ``order`` (``ItemStream.iterate``'s chunks)."""
    per_pack = max(1, DEFAULT_PACK_BYTES // item_bytes)
    per_chunk = max(1, read_ahead // item_bytes)
    total = 0
    for k in range(0, len(order), per_chunk):
        chunk = order[k:k + per_chunk]
        total += len(plan_reads([(str(int(p) // per_pack), int(p) % per_pack * item_bytes, item_bytes)
                                 for p in chunk]))
    return total


def shard_downloads(order: np.ndarray, per_shard: int, capacity: int) -> int:
    """Whole-shard downloads for ``order`` with an LRU of ``capacity`` shards."""
    lru: OrderedDict[int, None] = OrderedDict()
    downloads = 0
    for shard_id in (order // per_shard).tolist():
        if shard_id in lru:
            lru.move_to_end(shard_id)
            continue
        downloads += 1
        lru[shard_id] = None
        if len(lru) > capacity:
            lru.popitem(last=False)
    return downloads


def mosaic_shuffles() -> dict[str, Callable[[np.ndarray, int, int], np.ndarray]] | None:
    try:
        sys.modules.setdefault("streaming.vision", types.ModuleType("streaming.vision"))  # see peers.py
        from streaming.base.shuffle import get_shuffle
    except ImportError:
        return None
    # StreamingDataset's default block: max(4,000,000 // num_canonical_nodes, 1 << 18) when the number of
    # canonical nodes is set, else 1 << 18 (dataset.py, _set_shuffle_block_size).
    block = 1 << 18
    return {f"mosaic {algo}": (lambda sizes, seed, epoch, algo=algo: get_shuffle(
        algo, sizes, 1, seed, epoch, block)) for algo in ("py1e", "py1br", "py1s", "py2s")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--item-kb", type=int, default=23)
    p.add_argument("--shard-mb", type=int, default=16, help="MDS shard size (default %(default)s)")
    p.add_argument("--cache-mb", type=int, default=1024, help="MosaicML shard cache for the LRU count")
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()
    n, item = args.n, args.item_kb << 10
    opts = StreamOptions()
    groups = np.arange(n) // ROW_GROUP_ROWS
    per_shard = max(1, (args.shard_mb << 20) // item)
    shard_sizes = np.full(-(-n // per_shard), per_shard, dtype=np.int64)
    shard_sizes[-1] = n - per_shard * (len(shard_sizes) - 1)
    capacity = max(1, args.cache_mb // args.shard_mb)

    def ours(seed: int, epoch: int) -> np.ndarray:
        return epoch_order(groups, shuffle=True, seed=seed, epoch=epoch, window=opts.shuffle_window,
                           run=opts.shuffle_run, buffer=opts.shuffle_buffer)

    systems: dict[str, Callable[[int, int], np.ndarray]] = {
        f"ours (window {opts.shuffle_window} groups, run {opts.shuffle_run}, buffer {opts.shuffle_buffer})": ours}
    mosaic = mosaic_shuffles()
    if mosaic is None:
        print("mosaicml-streaming is not installed: printing ours only (pip install -e '.[bench]')")
    else:
        for name, fn in mosaic.items():
            systems[name] = lambda seed, epoch, fn=fn: np.asarray(fn(shard_sizes, seed, epoch))
    systems["uniform permutation"] = lambda seed, epoch: np.random.default_rng([seed, epoch]).permutation(n)
    systems["sequential"] = lambda seed, epoch: np.arange(n)

    print(f"{n:,} items of {args.item_kb} KB; ours: {DEFAULT_PACK_BYTES >> 20} MB packs, row groups of "
          f"{ROW_GROUP_ROWS:,}, {opts.read_ahead_mb} MB read-ahead; MosaicML: {args.shard_mb} MB shards "
          f"({per_shard} items), block size 262,144, LRU of {capacity} shards ({args.cache_mb} MB); "
          f"median of {args.seeds} seeds")
    header = (f"{'algorithm':58} {'order s':>8} {'displace':>9} {'spread':>7} {'neighb':>7} "
              f"{'requests/epoch':>15} {'limited cache':>14} {'held MB':>8}")
    print(header)
    print("-" * len(header))
    for name, fn in systems.items():
        rows = []
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            order = np.asarray(fn(seed, 0), dtype=np.int64)
            dt = time.perf_counter() - t0
            assert np.array_equal(np.sort(order), np.arange(n)), f"{name} is not a permutation"
            q = quality(order)
            if name.startswith("mosaic") or name in ("uniform permutation", "sequential"):
                req = len(np.unique(order // per_shard))
                limited = shard_downloads(order, per_shard, capacity)
                held = len(np.unique(order // per_shard)) * args.shard_mb  # unbounded cache: disk filled
                held_note = "disk"
            else:
                req = limited = our_requests(order, item, opts.read_ahead_mb << 20)
                held = 2 * opts.read_ahead_mb
                held_note = "memory"
            rows.append({"s": dt, **q, "req": req, "limited": limited, "held": held})
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(f"{name:58} {med['s']:8.2f} {med['displacement']:9.3f} {med['batch_spread']:7.1f} "
              f"{med['neighbours']:7.3f} {med['req']:15,.0f} {med['limited']:14,.0f} {med['held']:6,.0f} {held_note}")
    print("\nrequests/epoch: ours = range requests; others = whole-shard downloads with an unbounded "
          f"cache; limited cache: with an LRU of {args.cache_mb} MB of shards (uniform/sequential read "
          "as MDS shards). held MB: ours = read-ahead in memory; others = local disk the unbounded cache "
          "fills in the epoch.")


if __name__ == "__main__":
    main()
