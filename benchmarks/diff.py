"""``ds.diff`` on synthetic manifests of 10k, 100k and 1M items: seconds and peak RSS.

    python benchmarks/diff.py [--sizes 10000,100000,1000000] [--seed 0] [--keep DIR]

No images: version ``before`` is the manifest ``benchmarks/slice.py`` draws (street-like label
counts, one box per counted instance, attributes and tags), written in chunks of 10,000 rows.
Then one commit edits it the way a relabelling round does: 1% of the items get their first
instance relabelled ``car`` -> ``truck``, 0.5% their first box moved by a pixel, 0.5% a tag
added; and one commit deletes 0.1%. Per size a fresh subprocess builds the store ("build peak
RSS"), another opens it and times ``store.dataset(name, before).diff(store.dataset(name))``
(cold: the first run in that process; median of 3 after it) with its peak RSS. The diff's
counts are checked against the edits the generator made.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from slice import CHUNK, LABELS, Items, peak_rss_mb  # noqa: E402

import orchestrator  # noqa: E402
from orchestrator.manifest import label_field, manifest_schema  # noqa: E402
from orchestrator.scan import read_table  # noqa: E402

log = logging.getLogger("bench.diff")
NAME = "street"
RELABEL, MOVE, TAG, DELETE = 0.01, 0.005, 0.005, 0.001
RUNS = 3


def _edited(table: pa.Table, relabel: np.ndarray, move: np.ndarray, tag: np.ndarray) -> tuple[pa.Table, dict]:
    """``table``'s rows with the edits (row masks) applied (as Python rows: few enough), and
    which items each edit really changed (an item without a car cannot be relabelled)."""
    rows = table.filter(pa.array(relabel | move | tag)).to_pylist()
    done: dict[str, set[str]] = {"relabel": set(), "move": set(), "tag": set()}
    for row, i in zip(rows, np.flatnonzero(relabel | move | tag)):
        first = row["instances"][0] if row["instances"] else None
        if relabel[i] and first is not None and first["label"] == "car":
            first["label"] = "truck"
            row["labels"][label_field("car")] -= 1
            row["labels"][label_field("truck")] = 1
            done["relabel"].add(row["item_id"])
        if move[i] and first is not None:
            first["bbox"] = [v + 1 for v in first["bbox"]]
            done["move"].add(row["item_id"])
        if tag[i]:
            row["tags"] = [*(row["tags"] or []), "checked"]
            done["tag"].add(row["item_id"])
    return pa.Table.from_pylist(rows, schema=manifest_schema((*LABELS, "truck"))), done


def build(root: Path, size: int, seed: int) -> dict:
    from deltalake import write_deltalake

    store = orchestrator.connect(f"file://{root}")
    items = Items(size, seed)
    uri = store.manifest(NAME).uri
    for no, start in enumerate(range(0, size, CHUNK)):
        write_deltalake(uri, items.chunk(np.arange(start, min(size, start + CHUNK)), no), mode="append")
    before = store.dataset(NAME).version
    table = read_table(store.location, store.manifest(NAME).snapshot())  # as stored: it is written back
    rng = np.random.default_rng(seed + 1)
    relabel = rng.random(size) < RELABEL
    move = (rng.random(size) < MOVE) & ~relabel
    tag = rng.random(size) < TAG
    edited, done = _edited(table, relabel, move, tag)
    store.manifest(NAME).upsert(edited, message="relabel", principal="bench", operation="ingest")
    gone = {f"img_{i + 1:07d}.jpg" for i in np.flatnonzero(rng.random(size) < DELETE)}
    store.delete(NAME, sorted(gone))
    changed = (done["relabel"] | done["move"] | done["tag"]) - gone
    return {"size": size, "before": before, "peak_rss_mb": peak_rss_mb(),
            "expected": {"removed": len(gone), "changed": len(changed),
                         "parts": {"labels": len(done["relabel"] - gone),
                                   "boxes": len(done["move"] - gone),
                                   "tags": len(done["tag"] - gone)}}}


def measure(root: Path, before: int) -> dict:
    store = orchestrator.connect(f"file://{root}")
    times = []
    for _ in range(RUNS + 1):
        t0 = time.perf_counter()
        diff = store.dataset(NAME, before).diff(store.dataset(NAME))
        times.append(time.perf_counter() - t0)
    return {"cold_s": times[0], "median_s": statistics.median(times[1:]), "spread_s": [min(times[1:]), max(times[1:])],
            "added": len(diff.added), "removed": len(diff.removed), "changed": len(diff.changed),
            "parts": diff.rows.parts_changed(), "truck": diff.rows.label_totals.get("truck"),
            "peak_rss_mb": peak_rss_mb()}


def in_subprocess(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{args} failed with exit status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", nargs="?", default="all", choices=["all", "build", "measure"])
    ap.add_argument("size", nargs="?", type=int)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", type=Path)
    ap.add_argument("--before", type=int)
    ap.add_argument("--keep", type=Path, help="build under DIR and keep it")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.mode == "build":
        print(json.dumps(build(args.root, args.size, args.seed)))
        return
    if args.mode == "measure":
        print(json.dumps(measure(args.root, args.before)))
        return
    base = args.keep or Path(tempfile.mkdtemp(prefix="bench-diff-"))
    print(f"{'items':>9} {'cold s':>7} {'median s':>9} {'spread s':>13} {'peak RSS MB':>11} {'build RSS MB':>12}  "
          "added/removed/changed  parts")
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            root = base / f"n{size}"
            shutil.rmtree(root, ignore_errors=True)
            built = in_subprocess("build", str(size), "--root", str(root), "--seed", str(args.seed))
            got = in_subprocess("measure", "--root", str(root), "--before", str(built["before"]))
            exp = built["expected"]
            ok = ((got["removed"], got["changed"], got["added"], got["parts"])
                  == (exp["removed"], exp["changed"], 0, exp["parts"]))
            print(f"{size:>9,} {got['cold_s']:>7.2f} {got['median_s']:>9.2f} "
                  f"{got['spread_s'][0]:>6.2f}-{got['spread_s'][1]:<6.2f} {got['peak_rss_mb']:>11.0f} "
                  f"{built['peak_rss_mb']:>12.0f}  {got['added']}/{got['removed']}/{got['changed']}  "
                  f"{got['parts']}  truck {got['truck']}  {'ok' if ok else 'MISMATCH ' + json.dumps(exp)}")
            if not ok:
                raise SystemExit(1)
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
