"""Warm ``for item in ds`` against the decode limit of the same bytes (issue 14: >= 80%).

    python benchmarks/warm_iter.py STORE_URI DATASET [--rounds 3] [--workers 2]

Read only: nothing is written into the store. Per round, in this order:

* ``ours warm``: ``store.dataset(DATASET)`` with default options is iterated once to fill the
  cache (every blob is then in memory), then once more, timed: items/s of that warm pass. The
  consumer hashes every pixel of each item's image (xxhash) and reads its boxes, as
  ``benchmarks/peers.py`` does.
* ``decode limit``: the same items' bytes (taken from that cache) decoded by ``--workers``
  forked processes with ``peers.py``'s steps (PIL open, ``exif_transpose`` in place, RGB, numpy)
  and the same consumer work in the worker; items/s of the whole pool pass.

Prints each round and the medians; "ratio" is ours / decode limit of the same round; "CPU ms"
is CPU time per item (ours: this process, all threads; the limit: its worker processes), which a
loaded machine disturbs less than items/s. On a shared machine interleaved rounds and medians are
what to compare, not one figure.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peers import pil_decode  # noqa: E402 - the decode limit decodes as in peers.py

import orchestrator  # noqa: E402

BATCH = 32
_ITEMS: list[tuple[str, bytes, np.ndarray]] = []


def consume(item_id: str, image: np.ndarray, boxes: np.ndarray) -> int:
    """The consumer's work on one item (as in ``peers.py``): hash every pixel, count the boxes."""
    import xxhash

    xxhash.xxh3_128_hexdigest(np.ascontiguousarray(image))
    return len(np.asarray(boxes, dtype="<f4").reshape(-1, 4))


def _decode_batch(start: int) -> int:
    return sum(consume(i, pil_decode(data), boxes) for i, data, boxes in _ITEMS[start:start + BATCH])


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def ours_warm(ds: orchestrator.Dataset) -> tuple[float, float, int]:
    """(items/s, CPU ms an item, items) of one warm pass (the pass before filled the cache)."""
    t0, c0 = time.perf_counter(), _cpu(resource.RUSAGE_SELF)
    n = 0
    for item in ds:
        consume(item["id"], item["image"], item["boxes"])
        n += 1
    return n / (time.perf_counter() - t0), 1000 * (_cpu(resource.RUSAGE_SELF) - c0) / n, n


def decode_limit(workers: int) -> tuple[float, float]:
    """(items/s, CPU ms an item) of ``workers`` forked processes decoding ``_ITEMS`` (bytes in
    memory); the pool's start and end are included, as a loader's would be."""
    t0, c0 = time.perf_counter(), _cpu(resource.RUSAGE_CHILDREN)
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        sum(pool.imap_unordered(_decode_batch, range(0, len(_ITEMS), BATCH)))
        pool.close()
        pool.join()
    return len(_ITEMS) / (time.perf_counter() - t0), 1000 * (_cpu(resource.RUSAGE_CHILDREN) - c0) / len(_ITEMS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store")
    parser.add_argument("dataset")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    # A fresh node disk cache (the default one may hold these blobs from an earlier run, and
    # the first pass must fill the cache as a user's first epoch does).
    cache_dir = tempfile.mkdtemp(prefix="warm-iter-cache-")
    os.environ["ORCHESTRATOR_CACHE_DIR"] = cache_dir
    try:
        run(args)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def run(args: argparse.Namespace) -> None:
    ds = orchestrator.connect(args.store).dataset(args.dataset)
    for _ in ds:  # fill the cache
        pass
    if ds.cache_stats()["bytes_fetched"] == 0:
        raise SystemExit("the first pass fetched nothing: is the dataset empty?")
    load = ds.stream.load
    rows = ds.stream.rows.rows(np.arange(len(ds)))
    _ITEMS.clear()
    for row, data in zip(rows, load.fetch_many(rows), strict=True):
        if isinstance(data, Exception):
            raise data
        _ITEMS.append((row.item_id, data,
                       np.zeros((0, 4), np.float32)))
    ours, limit, ours_cpu, limit_cpu = [], [], [], []
    for r in range(args.rounds):
        fetched = ds.cache_stats()["bytes_fetched"]
        rate, cpu, n = ours_warm(ds)
        if ds.cache_stats()["bytes_fetched"] != fetched:
            raise SystemExit("the warm pass fetched bytes: the cache does not hold the dataset")
        ours.append(rate)
        ours_cpu.append(cpu)
        rate, cpu = decode_limit(args.workers)
        limit.append(rate)
        limit_cpu.append(cpu)
        print(f"round {r}: {n} items  ours warm {ours[-1]:6.0f}/s ({ours_cpu[-1]:.2f} CPU ms)  decode limit "
              f"({args.workers} procs) {limit[-1]:6.0f}/s ({limit_cpu[-1]:.2f} CPU ms)  "
              f"ratio {ours[-1] / limit[-1]:.0%}", flush=True)
    ratios = [a / b for a, b in zip(ours, limit, strict=True)]
    med = statistics.median
    print(f"median: ours warm {med(ours):.0f}/s ({med(ours_cpu):.2f} CPU ms an item)  decode limit "
          f"{med(limit):.0f}/s ({med(limit_cpu):.2f} CPU ms)  ratio {med(ratios):.0%}  (load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
