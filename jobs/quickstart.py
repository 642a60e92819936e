"""The main job on the embedded default: demo data → file:// store → versions and label counts
→ a short training run (PyTorch detector, 2 Ray Train workers) that prints its metrics.

    python jobs/quickstart.py [--dir .demo] [--n 500] [--seed 0] [--epochs 3] [--no-train]

Everything stays under --dir: the drawn images with their COCO file, and the store
(file://<dir>/store) with the run's checkpoints and lineage under runs/<principal>/. Running it again
commits a new version that re-uses every blob.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

import orchestrator
from orchestrator.dev.demo import make_demo_data
from orchestrator.train.config import load_config
from orchestrator.train.display import RunDisplay, checkpoint_uri, finished_lines
from orchestrator.train.lineage import lineage_uri
from orchestrator.train.runner import plan_run, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # At the repository root whatever the working directory: the shipped configs name this store.
    parser.add_argument("--dir", type=Path, default=Path(__file__).resolve().parent.parent / ".demo")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--no-train", action="store_true", help="stop after the label counts")
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

    latest = store.dataset("street")
    print(f"\nlabel counts in version {latest.version} ({len(latest)} items):")
    for label, count in latest.label_counts().items():
        print(f"  {label:<14} {count:>7}")
    busy = store.dataset("street").slice("labels.car > 3 and labels.pedestrian >= 1")
    print(f"\nslice 'labels.car > 3 and labels.pedestrian >= 1': {len(busy)} items")
    if args.no_train:
        return

    config = Path(__file__).resolve().parent.parent / "configs" / "street_torch.yaml"
    settings = load_config(config, [f"store={store.uri}", f"train.epochs={args.epochs}"])
    plan = plan_run(settings, config_name="quickstart")
    print(f"\ntraining run {plan.run_id}: torch detector, {settings.scaling.num_workers} workers, "
          f"version {plan.lineage.version}, {plan.lineage.items['train']} train / "
          f"{plan.lineage.items['validation']} validation items, {args.epochs} epochs ...", flush=True)
    display = RunDisplay(sys.stdout, epochs=args.epochs)
    try:
        lineage = run(plan, display)
    finally:
        display.close()
    further = shlex.join(["orchestrator", "train", str(config), "--store", store.uri, "--resume", plan.run_id,
                          "--set", f"train.epochs={len(lineage.metrics) + 1}"])
    for line in finished_lines(plan.run_id, len(lineage.metrics), lineage.skipped_items,
                               lineage_uri(store.runs, plan.run_id),
                               checkpoint_uri(store.uri, lineage.checkpoint), further):
        print(line, flush=True)


if __name__ == "__main__":
    main()
