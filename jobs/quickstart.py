"""The main job on the embedded default: demo data → file:// store → versions and label counts.

    python jobs/quickstart.py [--dir .demo] [--n 500] [--seed 0]

Everything stays under --dir: the drawn images with their COCO file, and the store
(file://<dir>/store). Running it again commits a new version that re-uses every blob.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import orchestrator
from orchestrator.demo import make_demo_data
from orchestrator.scan import label_totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(".demo"))
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    root = args.dir.resolve()
    data = root / f"street-n{args.n}-s{args.seed}"
    coco = data / "annotations.json"
    if not coco.exists():
        print(f"drawing {args.n} demo street scenes into {data} ...", flush=True)
        make_demo_data(data, args.n, args.seed, workers=2)

    store = orchestrator.connect(f"file://{root / 'store'}")
    print(f"ingesting into {store.uri} (dataset 'street') ...", flush=True)
    report = store.ingest("street", coco=coco, images=data / "images", message="quickstart")
    print(report.summary())

    print("\nversions of 'street':")
    for v in store.versions("street"):
        print(f"  v{v.version}  {v.timestamp:%Y-%m-%d %H:%M:%S}  {v.items:>6} items  "
              f"{v.operation:<7} by {v.principal}: {v.message}")

    snapshot = store.manifest("street").snapshot()
    print(f"\nlabel counts in version {snapshot.version} ({snapshot.rows} items):")
    for label, count in label_totals(store, snapshot).items():
        print(f"  {label:<14} {count:>7}")


if __name__ == "__main__":
    main()
