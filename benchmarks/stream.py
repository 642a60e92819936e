"""Streaming throughput, time to first item, peak RSS and bytes fetched: ours vs a naive loader.

    python benchmarks/stream.py [--sizes 10000,50000] [--epochs 2] [--keep DIR]
                                [--budget-mib 128] [--big-cache-mib 1024] [--seed 0]

Data: ``max(sizes)`` demo images are drawn once (``make_demo_data``, 2 workers); for each size a
COCO file with the first ``size`` images is written and ingested as dataset ``street{size/1000}k``
into a ``file://`` store and into an ``s3://`` store (a SeaweedFS this script starts on
loopback). With ``--keep DIR`` the images, stores and SeaweedFS data live under DIR and are
reused by the next run (a dataset already holding the right number of items is not ingested
again).

Each (size, backend, method) is measured in a fresh subprocess, so its peak RSS
(``VmHWM``, see ``peak_rss_mb``) belongs to that run alone. Methods:

* ``ours``: ``store.dataset(name, cache=BlobCache(memory_budget=--budget-mib), prefetch=16,
  threads=8)`` iterated ``--epochs`` times in a plain for-loop (the same Dataset object, so the
  second epoch sees the cache the first one filled); no disk tier.
* ``ours`` with ``--big-cache-mib`` (smallest size only): the same with a memory budget big enough
  to hold the whole dataset, to show what a warm cache saves on the second epoch.
* ``naive``: what the Diffgram SDK does: a map-style ``torch.utils.data.Dataset`` over the
  manifest's ``(item_id, blob)`` rows whose ``__getitem__`` does one boto3 ``get_object`` (s3://)
  or one open+read of the blob file (file://) and decodes with PIL + ``exif_transpose`` into a
  numpy array; iterated over ``range(len(ds))`` with no cache and no prefetch. Its process
  imports torch (as a training process would), so its base RSS is ~180 MB higher than ours.

The default budget is 128 MiB, not 256: demo JPEGs average ~23 KB, so 10k items are 226 MB and a
256 MiB cache would hold the whole 10k dataset.

The consumer loop touches every image (sums one pixel) so decoding really happens. "items/s" is
items over the epoch's wall time (epoch 1 includes opening the dataset); "first item" is the time
from ``store.dataset(...)`` to the first item yielded (epoch 1) or from the start of the loop
(epoch 2); "fetched" is what came from the store in that epoch (our cache's ``bytes_fetched``, or
the bytes the naive loader read). "base RSS" is the process's peak after imports and connecting,
before the dataset is opened. The SeaweedFS server shares the machine's cores with the consumer;
on file:// the blobs are in the OS page cache (they were just written or read), so "cold" means
the blob cache is cold, not the disk.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orchestrator  # noqa: E402

log = logging.getLogger("bench.stream")

MIB = 1 << 20
PREFETCH = 16
THREADS = 8
BUCKET = "bench"
HEARTBEAT_S = 30.0


def peak_rss_mb() -> float:
    """This process's peak RSS: ``VmHWM`` (the high-water mark of its own address space).

    Not ``ru_maxrss``: Linux carries a parent's high-water mark over ``fork``/``exec`` into the
    child's ``ru_maxrss`` (measured: a driver that once held 350 MB gives a fresh 11 MB child an
    ``ru_maxrss`` of 356 MB), so a child started by a heavy driver would report the driver's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def dataset_name(size: int) -> str:
    return f"street{size // 1000}k" if size % 1000 == 0 else f"street{size}"


# -- data prep ----------------------------------------------------------------------------------
def prepare_images(work: Path, n: int, seed: int) -> Path:
    """``work/demo`` with at least ``n`` images of ``seed`` (drawn once, reused with --keep)."""
    from orchestrator.dev.demo import make_demo_data

    demo = work / "demo"
    marker = demo / "drawn.json"
    if marker.exists():
        have = json.loads(marker.read_text())
        if have["seed"] == seed and have["n"] >= n:
            print(f"reusing {have['n']:,} demo images in {demo}", flush=True)
            return demo
    print(f"drawing {n:,} demo images (2 workers) into {demo} ...", flush=True)
    t0 = time.perf_counter()
    make_demo_data(demo, n, seed, workers=2)
    marker.write_text(json.dumps({"n": n, "seed": seed}))
    print(f"drew {n:,} demo images in {time.perf_counter() - t0:.1f} s", flush=True)
    return demo


def write_subset(demo: Path, size: int) -> tuple[Path, int]:
    """A COCO file with the first ``size`` images and their annotations; (path, image bytes)."""
    doc = json.loads((demo / "annotations.json").read_text())
    images = doc["images"][:size]
    if len(images) < size:
        raise SystemExit(f"only {len(images)} demo images in {demo}, need {size}")
    keep = {img["id"] for img in images}
    doc["images"] = images
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] in keep]
    path = demo.parent / f"coco-{size}.json"
    path.write_text(json.dumps(doc, separators=(",", ":")))
    nbytes = sum((demo / "images" / img["file_name"]).stat().st_size for img in images)
    return path, nbytes


def prep_store(uri: str, coco: Path, images: Path, size: int, pack: bool = False) -> dict:
    """(subprocess) Ingest ``coco`` as ``dataset_name(size)`` (with ``-packed`` and packed media
    if ``pack``) unless it is already there."""
    store = orchestrator.connect(uri)
    name = dataset_name(size) + ("-packed" if pack else "")
    if name in store.datasets():
        have = len(store.dataset(name))
        if have == size:
            return {"name": name, "ingested": False, "items": have, "seconds": 0.0}
        raise SystemExit(f"{uri} already has dataset {name} with {have} items, not {size}; "
                         "remove the --keep directory and run again")
    t0 = time.perf_counter()
    report = store.ingest(name, coco=coco, images=images, pack=pack)
    dt = time.perf_counter() - t0
    return {"name": name, "ingested": True, "items": report.items, "seconds": dt,
            "rejected": len(report.rejected)}


# -- subprocess: measure ------------------------------------------------------------------------
def measure(spec: dict) -> dict:
    if spec["method"] == "naive":
        import torch.utils.data  # noqa: F401  (a training process has torch loaded)
    store = orchestrator.connect(spec["uri"])
    base_rss = peak_rss_mb()
    base_cur = current_rss_mb()
    run = measure_ours if spec["method"] == "ours" else measure_naive
    out = run(store, spec)
    out.update(spec=spec, base_rss_mb=base_rss, base_cur_rss_mb=base_cur, peak_rss_mb=peak_rss_mb(),
               final_rss_mb=current_rss_mb())
    return out


def consume(it, t_start: float, on_first=None) -> tuple[int, int, float, float]:
    """Touch every image; (items, checksum, seconds to the first item, seconds to the last)."""
    total = n = 0
    ttfi = float("nan")
    for item in it:
        if n == 0:
            ttfi = time.perf_counter() - t_start
            if on_first is not None:
                on_first()
        total += int(item["image"][0, 0, 0])
        n += 1
    return n, total, ttfi, time.perf_counter() - t_start


def measure_ours(store, spec: dict) -> dict:
    from orchestrator.stream.cache import BlobCache

    cache = BlobCache(memory_budget=spec["budget_mib"] * MIB)
    epochs = []
    diag: dict = {}
    t0 = time.perf_counter()
    ds = store.dataset(spec["name"], cache=cache, prefetch=PREFETCH, threads=THREADS)
    for epoch in range(spec["epochs"]):
        before = cache.stats.as_dict()
        t_start = time.perf_counter() if epoch else t0
        n, checksum, ttfi, seconds = consume(
            iter(ds), t_start, (lambda: diag.update(first_item_rss_mb=current_rss_mb())) if epoch == 0 else None)
        after = cache.stats.as_dict()
        epochs.append({
            "epoch": epoch + 1, "items": n, "seconds": seconds, "items_per_s": n / seconds,
            "first_item_s": ttfi, "checksum": checksum,
            "bytes_fetched": after["bytes_fetched"] - before["bytes_fetched"],
            "hits": after["hits"] - before["hits"], "misses": after["misses"] - before["misses"],
            "evictions": after["evictions"] - before["evictions"],
            "peak_rss_mb": peak_rss_mb(), "rss_mb": current_rss_mb(),
        })
        if epoch == 0:
            diag.update(stream_diagnostics(ds, cache))
    return {"epochs": epochs, "diag": diag, "skipped": ds.skipped}


def stream_diagnostics(ds, cache) -> dict:
    """What the reader holds after an epoch: index arrays, row-group cache, blob cache."""
    stream = ds.stream
    index = stream.index
    return {
        "index_bytes": int(index.file_of.nbytes + index.row_of.nbytes),
        "manifest_files": len(index.files),
        **stream.rows.stats(),
        "cache_entries": len(cache.memory),
        "cache_bytes": cache.memory.size,
    }


def measure_naive(store, spec: dict) -> dict:
    import io

    import numpy as np
    import torch.utils.data
    from PIL import Image, ImageOps

    if store.location.scheme == "s3":
        import boto3
        import botocore.config

        client = boto3.client(
            "s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"],
            aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
            region_name=os.environ.get("AWS_REGION", "us-east-1"),
            config=botocore.config.Config(s3={"addressing_style": "path"}),
        )
        bucket = store.location.root.split("/", 1)[0]

        def read(path: str) -> bytes:
            return client.get_object(Bucket=bucket, Key=path[len(bucket) + 1:])["Body"].read()
    else:
        def read(path: str) -> bytes:
            with open(path, "rb") as f:
                return f.read()

    class NaiveItems(torch.utils.data.Dataset):
        """One request per item, decode in the caller, nothing kept (like the Diffgram SDK)."""

        def __init__(self, rows) -> None:
            self.ids = rows.column("item_id").to_pylist()
            self.paths = [store.blobs(spec["name"]).path(b) for b in rows.column("blob").to_pylist()]
            self.bytes_read = 0

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict:
            data = read(self.paths[i])
            self.bytes_read += len(data)
            with Image.open(io.BytesIO(data)) as img:
                img = ImageOps.exif_transpose(img).convert("RGB")
                return {"id": self.ids[i], "image": np.asarray(img, dtype=np.uint8)}

    epochs = []
    t0 = time.perf_counter()
    items = NaiveItems(store.dataset(spec["name"]).manifest_rows(["item_id", "blob"]))
    for epoch in range(spec["epochs"]):
        before = items.bytes_read
        t_start = time.perf_counter() if epoch else t0
        gen = (items[i] for i in range(len(items)))
        n, checksum, ttfi, seconds = consume(gen, t_start)
        epochs.append({
            "epoch": epoch + 1, "items": n, "seconds": seconds, "items_per_s": n / seconds,
            "first_item_s": ttfi, "checksum": checksum,
            "bytes_fetched": items.bytes_read - before, "hits": 0, "misses": n, "evictions": 0,
            "peak_rss_mb": peak_rss_mb(), "rss_mb": current_rss_mb(),
        })
    return {"epochs": epochs, "diag": {}, "skipped": 0}


# -- driver -------------------------------------------------------------------------------------
def in_subprocess(args: list[str], what: str, stderr_log: Path) -> dict:
    """Run this script with ``args``; print a heartbeat while it runs; its last stdout line."""
    cmd = [sys.executable, __file__, *args]
    t0 = time.perf_counter()
    with open(stderr_log, "a") as err:
        err.write(f"\n=== {what}: {' '.join(cmd)}\n")
        err.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        while True:
            try:
                out, _ = proc.communicate(timeout=HEARTBEAT_S)
                break
            except subprocess.TimeoutExpired:
                print(f"  ... {what}: {time.perf_counter() - t0:.0f} s", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed with exit status {proc.returncode}; see {stderr_log}")
    # Ray may print its own messages to stdout; the result is the last line that is JSON.
    return json.loads(next(line for line in reversed(out.strip().splitlines()) if line.startswith("{")))


def fmt_mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,50000",
                        help="comma-separated dataset sizes (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--backends", default="file,s3", help="comma list of file, s3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-mib", type=int, default=128,
                        help="memory cache budget, smaller than every dataset (default: %(default)s)")
    parser.add_argument("--big-cache-mib", type=int, default=1024,
                        help="budget of the extra run on the smallest size (0: skip; default: %(default)s)")
    parser.add_argument("--keep", type=Path, help="keep images, stores and SeaweedFS data under DIR")
    parser.add_argument("--layout", choices=("packed", "loose"), default="packed",
                        help="ingest media into packs (datasets named street<N>k-packed) or one object "
                             "per item (default: %(default)s)")
    parser.add_argument("--methods", default="ours,naive", help="comma list of ours, naive (default: %(default)s)")
    parser.add_argument("--prep", help=argparse.SUPPRESS)  # JSON: uri, coco, images, size
    parser.add_argument("--one", help=argparse.SUPPRESS)  # JSON: a measure() spec
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    if args.prep:
        p = json.loads(args.prep)
        print(json.dumps(prep_store(p["uri"], Path(p["coco"]), Path(p["images"]), p["size"], p["pack"])),
              flush=True)
        return
    if args.one:
        print(json.dumps(measure(json.loads(args.one))), flush=True)
        return

    from orchestrator.dev.seaweed import SeaweedServer

    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    packed = args.layout == "packed"

    def name_of(size: int) -> str:
        return dataset_name(size) + ("-packed" if packed else "")

    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    work = (args.keep or Path(tempfile.mkdtemp(prefix="bench-stream-"))).resolve()
    errlog = work / "subprocess-stderr.log"
    print(f"work dir {work}; subprocess stderr (Ray, warnings) goes to {errlog}", flush=True)
    results: list[dict] = []
    data_bytes: dict[int, int] = {}
    try:
        demo = prepare_images(work, max(sizes), args.seed)
        subsets = {}
        for size in sizes:
            subsets[size], data_bytes[size] = write_subset(demo, size)
        with SeaweedServer(work / "seaweed") as s3:
            s3.create_bucket(BUCKET, BUCKET, BUCKET)
            os.environ.update(s3.env(BUCKET, BUCKET))  # inherited by every subprocess
            print(f"SeaweedFS on {s3.endpoint_url} (started in {s3.startup_seconds or 0:.1f} s)", flush=True)
            backends = [("file://", f"file://{work / 'store'}"), ("s3://", f"s3://{BUCKET}/store")]
            backends = [b for b in backends if b[0].rstrip(":/") in args.backends.split(",")]
            for label, uri in backends:
                for size in sizes:
                    what = f"ingest {name_of(size)} into {label}"
                    print(f"{what} ...", flush=True)
                    r = in_subprocess(["--prep", json.dumps({"uri": uri, "coco": str(subsets[size]),
                                                             "images": str(demo / "images"),
                                                             "size": size, "pack": packed})], what, errlog)
                    if r["ingested"]:
                        print(f"ingested {r['items']:,} items into {label} in {r['seconds']:.1f} s "
                              f"({r['items'] / r['seconds']:.0f} items/s)", flush=True)
                    else:
                        print(f"{label} already holds {r['name']} ({r['items']:,} items)", flush=True)
            runs = []
            methods = [m for m in ("ours", "naive") if m in args.methods.split(",")]
            for label, uri in backends:
                for size in sizes:
                    for method in methods:
                        runs.append((label, uri, size, method, args.budget_mib))
                if args.big_cache_mib and "ours" in methods:
                    runs.append((label, uri, sizes[0], "ours", args.big_cache_mib))
            for label, uri, size, method, budget in runs:
                spec = {"uri": uri, "name": name_of(size), "method": method,
                        "budget_mib": budget if method == "ours" else 0, "epochs": args.epochs,
                        "backend": label, "size": size}
                what = f"{method} {label} {name_of(size)}" + (f" cache {budget} MiB" if method == "ours" else "")
                print(f"measuring {what} ...", flush=True)
                r = in_subprocess(["--one", json.dumps(spec)], what, errlog)
                results.append(r)
                rates = " | ".join(f"epoch {x['epoch']}: {x['items_per_s']:.0f} items/s" for x in r["epochs"])
                print(f"  {rates} | peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    report(results, sizes, data_bytes, args)


def report(results: list[dict], sizes: list[int], data_bytes: dict[int, int], args) -> None:
    print("\ndataset bytes (JPEGs): " + ", ".join(
        f"{dataset_name(s)} {data_bytes[s] / 1e6:.0f} MB" for s in sizes))
    print(f"ours: prefetch={PREFETCH}, threads={THREADS}, memory-only BlobCache; naive: one "
          f"request per item, PIL decode, no cache, no prefetch; {os.cpu_count()} cores\n")
    header = (f"{'backend':<8} {'size':>7} {'method':<6} {'cache MiB':>9} {'epoch':>5} {'items/s':>8} "
              f"{'first item s':>12} {'fetched MB':>10} {'hits':>7} {'misses':>7} "
              f"{'base RSS MB':>11} {'peak RSS MB':>11}")
    print(header)
    print("-" * len(header))
    for r in results:
        s = r["spec"]
        cache = str(s["budget_mib"]) if s["method"] == "ours" else "-"
        for e in r["epochs"]:
            print(f"{s['backend']:<8} {s['size']:>7,} {s['method']:<6} {cache:>9} {e['epoch']:>5} "
                  f"{e['items_per_s']:>8.0f} {e['first_item_s']:>12.3f} {fmt_mb(e['bytes_fetched']):>10} "
                  f"{e['hits']:>7,} {e['misses']:>7,} {r['base_rss_mb']:>11.0f} {e['peak_rss_mb']:>11.0f}")
    print("\n(peak RSS per row = VmHWM of that run's process at the end of that epoch; "
          "base = VmHWM after imports + connect)")

    print("\nwhat the reader held after epoch 1 (ours):")
    for r in results:
        s, d = r["spec"], r["diag"]
        if s["method"] != "ours":
            continue
        print(f"  {s['backend']:<8} {s['size']:>7,} cache {s['budget_mib']:>5} MiB: index "
              f"{d['index_bytes'] / 1e6:.2f} MB, {d['manifest_files']} manifest file(s), "
              f"{d['row_groups']} row group(s) of up to {d['rows_per_group_max']:,} rows, "
              f"{d['row_groups_kept']} kept ({d['rows_kept']:,} rows as Python dicts), blob cache "
              f"{d['cache_entries']:,} entries / {d['cache_bytes'] / 1e6:.0f} MB")
        print(f"  {'':<8} {'':>7} {'':>16}  RSS: {r['base_cur_rss_mb']:.0f} MB before opening, "
              f"{d['first_item_rss_mb']:.0f} MB at the first item (index, current row groups, first prefetch), "
              f"{r['final_rss_mb']:.0f} MB at the end; peak {r['peak_rss_mb']:.0f} MB")

    if len(sizes) >= 2:
        lo, hi = sizes[0], sizes[-1]
        print(f"\npeak RSS {dataset_name(hi)} / {dataset_name(lo)} (cache {args.budget_mib} MiB):")
        for method in ("ours", "naive"):
            for backend in ("file://", "s3://"):
                pick = {r["spec"]["size"]: r for r in results
                        if r["spec"]["method"] == method and r["spec"]["backend"] == backend
                        and r["spec"]["budget_mib"] in (args.budget_mib, 0)}
                if lo in pick and hi in pick:
                    a, b = pick[lo], pick[hi]
                    ratio = b["peak_rss_mb"] / a["peak_rss_mb"]
                    grow_a = a["peak_rss_mb"] - a["base_rss_mb"]
                    grow_b = b["peak_rss_mb"] - b["base_rss_mb"]
                    verdict = "within 10%" if ratio <= 1.10 else "NOT within 10%"
                    print(f"  {method:<6} {backend:<8} {b['peak_rss_mb']:.0f} / {a['peak_rss_mb']:.0f} MB "
                          f"= {ratio:.2f} ({verdict}); above base RSS: {grow_b:.0f} / {grow_a:.0f} MB")


if __name__ == "__main__":
    main()
