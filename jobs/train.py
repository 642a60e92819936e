"""Entrypoint for `ray job submit`: train one config on the cluster this job runs in.

    ray job submit --working-dir . -- python jobs/train.py --config configs/street_torch.yaml \
        [--set train.epochs=5] [--resume [RUN_ID]] [--json]

``--config FILE`` names the run config; every other argument is ``orchestrator train``'s and is
checked there (same options, messages and exit codes). The config path may also come first, as
``orchestrator train FILE`` takes it (``python jobs/train.py configs/street_torch.yaml ...``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.cli import main  # noqa: E402


def train_argv(argv: Sequence[str]) -> list[str]:
    """The ``orchestrator`` command line for this job's arguments: ``--config FILE`` becomes
    ``train``'s positional config, the rest is passed on in order."""
    parser = argparse.ArgumentParser(
        prog="jobs/train.py",
        description="Train one run config on the Ray cluster this job runs in.",
        epilog="Other arguments are those of `orchestrator train` (--set KEY=VALUE, repeatable; "
               "--resume [RUN_ID]; --json). A config path given as the first argument instead of "
               "--config is accepted too.",
    )
    parser.add_argument("--config", type=Path, metavar="FILE", help="run config YAML (see configs/)")
    args, rest = parser.parse_known_args(list(argv))
    config = [str(args.config)] if args.config is not None else []
    return ["train", *config, *rest]


if __name__ == "__main__":
    main(train_argv(sys.argv[1:]))
