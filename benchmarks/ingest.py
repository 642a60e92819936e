"""Ingest throughput into both backends: items/s and MB/s, first import and re-import.

    python benchmarks/ingest.py [--n 2000] [--seed 0] [--loose]

Draws N demo images once, then for file:// and s3:// (a SeaweedFS started on loopback) runs a
first ingest (every blob uploaded) and a second ingest of the same input (every blob re-used).
Media go into packs (the default layout), or with ``--loose`` one object per item (the layout
the README's table was measured on, before packs were the default).
Times include Ray Data stage start-up but not Ray cluster start-up. Prints a table and the
driver's peak RSS.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orchestrator  # noqa: E402
from orchestrator.dev.demo import make_demo_data  # noqa: E402
from orchestrator.dev.seaweed import SeaweedServer  # noqa: E402
from orchestrator.ray_runtime import ensure_ray  # noqa: E402


def run(store_uri: str, data: Path, label: str, pack: bool) -> list[dict]:
    store = orchestrator.connect(store_uri)
    rows = []
    for attempt in ("first import", "re-import"):
        t0 = time.perf_counter()
        report = store.ingest("street", coco=data / "annotations.json", images=data / "images", pack=pack)
        dt = time.perf_counter() - t0
        mb = sum(f.stat().st_size for f in (data / "images").iterdir()) / 1e6
        rows.append({
            "backend": label, "run": attempt, "items": report.items, "seconds": dt,
            "items/s": report.items / dt, "MB/s": mb / dt,
            "uploaded": report.blobs_uploaded, "reused": report.blobs_reused,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loose", action="store_true", help="one object per item instead of packs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    data = work / "demo"
    t0 = time.perf_counter()
    make_demo_data(data, args.n, args.seed, workers=2)
    print(f"drew {args.n} demo images in {time.perf_counter() - t0:.1f} s", flush=True)
    ensure_ray()

    print(f"layout: {'loose blobs' if args.loose else 'packs'}", flush=True)
    results = run(f"file://{work / 'store'}", data, "file://", not args.loose)
    with SeaweedServer(work / "seaweed") as s3:
        s3.create_bucket("bench", "bench", "bench")
        os.environ.update(s3.env("bench", "bench"))
        results += run("s3://bench/store", data, "s3:// (SeaweedFS)", not args.loose)

    cols = ["backend", "run", "items", "seconds", "items/s", "MB/s", "uploaded", "reused"]
    print("\n" + "  ".join(f"{c:>18}" for c in cols))
    for r in results:
        print("  ".join(f"{r[c]:>18.1f}" if isinstance(r[c], float) else f"{r[c]:>18}" for c in cols))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\ndriver peak RSS: {rss:.0f} MB; machine: {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
