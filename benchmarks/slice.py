"""Slice latency on synthetic manifests of 10k, 100k and 1M items, and peak RSS.

    python benchmarks/slice.py [--sizes 10000,100000,1000000] [--seed 0] [--keep DIR]

No images: manifest rows that follow ``manifest_schema(LABELS)`` exactly are drawn with numpy
(label counts like street data: car ~ Binomial(8, .35), pedestrian ~ Binomial(5, .25),
traffic light ~ Binomial(3, .35), bicycle ~ Binomial(3, .2); one box instance per counted
label; attributes time_of_day / weather; tags 'night' and 'reviewed') and appended to a
``file://`` store with ``deltalake.write_deltalake`` in chunks of 10,000 rows, so a 1M manifest
has 100 data files (one commit each). Each size is written twice, as two datasets with the same
items:

* ``ingest``: rows in ingest order (item_id ascending), labels random, so the Delta file
  statistics of every file look alike and file skipping on labels rarely helps;
* ``by_car``: the same rows sorted by ``labels.car`` (stable) before chunking, so files hold
  narrow ranges of ``labels.car`` and queries on it skip files.

Per size, a fresh subprocess builds the store (its peak RSS is "build peak RSS"), then another
fresh subprocess only opens the store and runs the queries (its peak RSS is "query peak RSS";
"query base RSS" is that process's peak after imports and opening the datasets once). Every
timing is ``len(store.dataset(name).slice(q))`` end to end: open the Delta log (pin the
version), compile, prune files, read, filter. "cold" is the first run of a query in that
process, "median" the median of the 5 runs after it; the OS page cache is warm (the files were
just written). The matched count is checked against a count computed from the generator's own
numpy arrays.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orchestrator  # noqa: E402
from orchestrator.manifest import INSTANCE_TYPE, STRING_MAP, label_field, manifest_schema  # noqa: E402

log = logging.getLogger("bench.slice")

LABELS = ("car", "pedestrian", "traffic light", "bicycle")
#: Binomial (n, p) per label, in LABELS order.
LABEL_DRAWS = ((8, 0.35), (5, 0.25), (3, 0.35), (3, 0.2))
WEATHER = ("clear", "cloudy", "rain", "fog")
WEATHER_P = (0.6, 0.2, 0.15, 0.05)
NIGHT_P = 0.3
REVIEWED_P = 0.1
CHUNK = 10_000
LAYOUTS = {
    "ingest": "rows in ingest order (item_id ascending), labels random",
    "by_car": "same rows sorted by labels.car (stable) before chunking",
}
QUERIES = (
    "labels.car > 3 and labels.pedestrian >= 1",
    "labels.car >= 8",
    "'night' in tags",
    "attributes.weather = 'rain' and labels.bicycle >= 1",
    "file.width > 600",
    "labels.car >= 0",  # every row: the full scan
)
RUNS = 5
EPOCH_US = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# -- synthetic rows -----------------------------------------------------------------------------
class Items:
    """Per-item draws for the whole dataset (a few numpy columns); Arrow chunks are built from
    any subset of row indices, so both layouts hold exactly the same items."""

    def __init__(self, n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.n = n
        self.counts = np.stack(
            [rng.binomial(k, p, n) for k, p in LABEL_DRAWS], axis=1
        ).astype(np.int32)
        self.width = rng.integers(320, 1921, n, dtype=np.int32)
        self.height = rng.integers(240, 1081, n, dtype=np.int32)
        self.size_bytes = (
            self.width.astype(np.int64) * self.height * rng.uniform(0.08, 0.25, n)
        ).astype(np.int64)
        self.night = rng.random(n) < NIGHT_P
        self.weather = rng.choice(len(WEATHER), n, p=WEATHER_P).astype(np.int32)
        self.reviewed = rng.random(n) < REVIEWED_P
        self.seed = seed

    def expected(self) -> dict[str, int]:
        """The true match count of every query in QUERIES, from the draws themselves."""
        car, ped, _light, bike = (self.counts[:, j] for j in range(4))
        masks = (
            (car > 3) & (ped >= 1),
            car >= 8,
            self.night,
            (self.weather == WEATHER.index("rain")) & (bike >= 1),
            self.width > 600,
            car >= 0,
        )
        return {q: int(m.sum()) for q, m in zip(QUERIES, masks)}

    def chunk(self, idx: np.ndarray, chunk_no: int) -> pa.Table:
        """Manifest rows for items ``idx`` (row indices), schema ``manifest_schema(LABELS)``."""
        rng = np.random.default_rng([self.seed, chunk_no])
        k = len(idx)
        counts = self.counts[idx]
        width, height = self.width[idx], self.height[idx]
        ids = pa.array([f"img_{i + 1:07d}.jpg" for i in idx.tolist()], pa.string())
        hexed = rng.bytes(32 * k).hex().encode()  # 64 hex chars per row, one buffer
        blob = pa.StringArray.from_buffers(
            k, pa.py_buffer(np.arange(0, 64 * k + 1, 64, dtype=np.int32)), pa.py_buffer(hexed)
        )
        labels = pa.StructArray.from_arrays(
            [pa.array(counts[:, j]) for j in range(len(LABELS))],
            fields=[pa.field(label_field(name), pa.int32()) for name in LABELS],
        )
        # attributes: {time_of_day, weather} per row
        vocab = pa.array(["day", "night", *WEATHER])
        codes = np.empty(2 * k, np.int32)
        codes[0::2] = self.night[idx]
        codes[1::2] = 2 + self.weather[idx]
        attributes = pa.MapArray.from_arrays(
            pa.array(np.arange(0, 2 * k + 1, 2, dtype=np.int32)),
            pc.take(pa.array(["time_of_day", "weather"]), pa.array(np.tile([0, 1], k))),
            pc.take(vocab, pa.array(codes)),
            type=STRING_MAP,
        )
        # tags: ['night'] for night items, 'reviewed' for some
        present = np.stack([self.night[idx], self.reviewed[idx]], axis=1)
        tag_offsets = np.zeros(k + 1, np.int32)
        np.cumsum(present.sum(axis=1), out=tag_offsets[1:])
        tag_values = pc.take(pa.array(["night", "reviewed"]),
                             pa.array(np.tile([0, 1], k)[present.ravel()]))
        tags = pa.ListArray.from_arrays(pa.array(tag_offsets), tag_values)
        ingested = pa.array(EPOCH_US + idx.astype(np.int64) * 1000,
                            pa.timestamp("us", tz="UTC"))
        arrays = [
            ids,
            blob,
            pc.take(pa.array(["image/jpeg"]), pa.array(np.zeros(k, np.int32))),
            pa.array(width),
            pa.array(height),
            pa.array(self.size_bytes[idx]),
            ids,  # source_name: the file name as it was in the source
            _instances(counts, width, height, rng),
            labels,
            attributes,
            tags,
            ingested,
            pa.nulls(k, pa.string()),  # pack: loose blobs (no media here at all)
            pa.nulls(k, pa.int64()),  # pack_offset
        ]
        return pa.Table.from_arrays(arrays, schema=manifest_schema(LABELS))


def _instances(counts: np.ndarray, width: np.ndarray, height: np.ndarray,
               rng: np.random.Generator) -> pa.Array:
    """One box per counted label instance, in label order, consistent with ``counts``."""
    k = len(counts)
    per_row = counts.sum(axis=1)
    offsets = np.zeros(k + 1, np.int32)
    np.cumsum(per_row, out=offsets[1:])
    m = int(offsets[-1])
    label_idx = np.repeat(np.tile(np.arange(len(LABELS), dtype=np.int32), k), counts.ravel())
    w = np.repeat(width, per_row).astype(np.float64)
    h = np.repeat(height, per_row).astype(np.float64)
    x0 = np.floor(rng.random(m) * w * 0.9)
    y0 = np.floor(rng.random(m) * h * 0.9)
    x1 = np.minimum(w, x0 + 4 + np.floor(rng.random(m) * (w - x0) * 0.5))
    y1 = np.minimum(h, y0 + 4 + np.floor(rng.random(m) * (h - y0) * 0.5))
    quad = np.arange(0, 4 * m + 1, 4, dtype=np.int32)
    empty = pa.array(np.zeros(m + 1, np.int32))
    struct = pa.StructArray.from_arrays(
        [
            pc.take(pa.array(list(LABELS)), pa.array(label_idx)),
            pc.take(pa.array(["box"]), pa.array(np.zeros(m, np.int32))),
            pa.ListArray.from_arrays(pa.array(quad), pa.array(np.stack([x0, y0, x1, y1], 1).ravel())),
            pa.ListArray.from_arrays(empty, pa.array([], pa.float64())),
            pa.MapArray.from_arrays(empty, pa.array([], pa.string()), pa.array([], pa.string()),
                                    type=STRING_MAP),
        ],
        fields=list(INSTANCE_TYPE),
    )
    return pa.ListArray.from_arrays(pa.array(offsets), struct, type=pa.list_(INSTANCE_TYPE))


# -- subprocess: build --------------------------------------------------------------------------
def dataset_name(size: int, layout: str) -> str:
    return f"street-{size}-{layout}"


def build(root: Path, size: int, seed: int) -> dict:
    from deltalake import write_deltalake

    store = orchestrator.connect(f"file://{root}")
    t0 = time.perf_counter()
    items = Items(size, seed)
    gen = time.perf_counter() - t0
    write = 0.0
    orders = {"ingest": np.arange(size), "by_car": np.argsort(items.counts[:, 0], kind="stable")}
    for layout, order in orders.items():
        uri = store.manifest(dataset_name(size, layout)).uri
        for no, start in enumerate(range(0, size, CHUNK)):
            t1 = time.perf_counter()
            chunk = items.chunk(order[start:start + CHUNK], no)
            t2 = time.perf_counter()
            write_deltalake(uri, chunk, mode="append")  # the first chunk creates the table
            t3 = time.perf_counter()
            gen += t2 - t1
            write += t3 - t2
        log.info("built %s: %d rows in %d files", dataset_name(size, layout), size, no + 1)
    return {"size": size, "generate_s": gen, "write_s": write, "peak_rss_mb": peak_rss_mb(),
            "expected": items.expected()}


# -- subprocess: query --------------------------------------------------------------------------
def query(root: Path, size: int) -> dict:
    store = orchestrator.connect(f"file://{root}")
    for layout in LAYOUTS:  # open each dataset once: log replay, imports, filesystem set up
        len(store.dataset(dataset_name(size, layout)))
    base_rss = peak_rss_mb()
    rows = []
    for layout in LAYOUTS:
        name = dataset_name(size, layout)
        for q in QUERIES:
            times = []
            for _ in range(RUNS + 1):
                t0 = time.perf_counter()
                ds = store.dataset(name).slice(q)
                matched = len(ds)
                times.append(time.perf_counter() - t0)
            st = ds.last_scan
            rows.append({
                "size": size, "layout": layout, "query": q, "matched": matched,
                "files_read": st.files_read, "files_total": st.files_total,
                "rows_read": st.rows_in_files_read, "rows_total": st.rows_total,
                "cold_ms": times[0] * 1e3, "median_ms": statistics.median(times[1:]) * 1e3,
            })
    return {"size": size, "base_rss_mb": base_rss, "peak_rss_mb": peak_rss_mb(), "rows": rows}


def in_subprocess(mode: str, root: Path, size: int, seed: int) -> dict:
    cmd = [sys.executable, __file__, mode, str(size), "--root", str(root), "--seed", str(seed)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr (logging) passes through
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- driver -------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000",
                        help="comma-separated manifest sizes (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="build the stores under DIR and keep them")
    parser.add_argument("--build", type=int, metavar="SIZE", help=argparse.SUPPRESS)
    parser.add_argument("--one", type=int, metavar="SIZE", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    log.setLevel(logging.INFO)

    if args.build is not None:
        print(json.dumps(build(args.root, args.build, args.seed)), flush=True)
        return
    if args.one is not None:
        print(json.dumps(query(args.root, args.one)), flush=True)
        return

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    work = (args.keep or Path(tempfile.mkdtemp(prefix="bench-slice-"))).resolve()
    builds, results = [], []
    try:
        for size in sizes:
            root = work / f"store-{size}"
            t0 = time.perf_counter()
            b = in_subprocess("--build", root, size, args.seed)
            builds.append(b)
            print(f"built {size:,} items x {len(LAYOUTS)} layouts in {time.perf_counter() - t0:.1f} s "
                  f"(generate {b['generate_s']:.1f} s, write_deltalake {b['write_s']:.1f} s)",
                  flush=True)
            t0 = time.perf_counter()
            r = in_subprocess("--one", root, size, args.seed)
            results.append(r)
            print(f"queried {size:,} items in {time.perf_counter() - t0:.1f} s", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\nlabels: {', '.join(f'{name} ~ Binomial{d}' for name, d in zip(LABELS, LABEL_DRAWS))}; "
          f"{CHUNK:,} rows per data file (one append each)")
    for layout, what in LAYOUTS.items():
        print(f"layout {layout}: {what}")
    print(f"times: len(store.dataset(name).slice(q)); median of {RUNS} runs after a first (cold) "
          "run; OS page cache warm\n")
    header = f"{'size':>9}  {'layout':<7} {'query':<52} {'matched':>9} {'ok':>3} " \
             f"{'files':>9} {'rows in files':>13} {'median ms':>10} {'cold ms':>9}"
    print(header)
    print("-" * len(header))
    mismatches = []
    for b, r in zip(builds, results):
        for row in r["rows"]:
            expected = b["expected"][row["query"]]
            ok = row["matched"] == expected
            if not ok:
                mismatches.append((row["size"], row["layout"], row["query"], row["matched"], expected))
            files = f"{row['files_read']}/{row['files_total']}"
            print(f"{row['size']:>9,}  {row['layout']:<7} {row['query']:<52} {row['matched']:>9,} "
                  f"{'yes' if ok else 'NO':>3} {files:>9} {row['rows_read']:>13,} "
                  f"{row['median_ms']:>10.1f} {row['cold_ms']:>9.1f}")
    print()
    header = f"{'size':>9}  {'generate s':>10} {'write s':>8} {'build peak RSS':>15} " \
             f"{'query base RSS':>15} {'query peak RSS':>15}"
    print(header)
    print("-" * len(header))
    for b, r in zip(builds, results):
        print(f"{b['size']:>9,}  {b['generate_s']:>10.1f} {b['write_s']:>8.1f} "
              f"{b['peak_rss_mb']:>12.0f} MB {r['base_rss_mb']:>12.0f} MB {r['peak_rss_mb']:>12.0f} MB")
    print(f"\n(build = both layouts; RSS = ru_maxrss of a fresh process per size and step; "
          f"machine: {os.cpu_count()} cores)")
    for size, layout, q, got, want in mismatches:
        print(f"MISMATCH {size:,} {layout} {q!r}: slice matched {got}, generator says {want}")


if __name__ == "__main__":
    main()
