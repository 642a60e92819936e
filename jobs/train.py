"""Entrypoint for `ray job submit`: train one config on the cluster this job runs in.

    ray job submit --working-dir . -- python jobs/train.py --config configs/street_torch.yaml \
        [--set train.epochs=5] [--resume [RUN_ID]]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.cli import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--config" in args:
        i = args.index("--config")
        args = [args[i + 1], *args[:i], *args[i + 2:]]
    main(["train", *args])
