"""What a person sees while a run trains: a progress bar on a terminal and one line per epoch
as it ends.

The bar (tqdm; only when the output is a terminal) shows the epoch's steps of the expected
total, samples/s, the time left in the epoch and rank 0's running loss, from the step reports
rank 0 sends about once a second (``train.progress.StepReporter``). Each finished epoch prints
one plain line, on a terminal or not (CI, ``ray job submit`` logs), as soon as Ray Train has
accepted its report::

    epoch 1/3  train_loss 4.2933  val_map50 0.0123  train 12.4 s  37.9 samples/s  0 skipped

Nothing here talks to Ray: the driver's ``RunWatch`` hands in what the mailbox held.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

#: Metrics an epoch line shows first, in this order; other numeric metrics follow.
_LEADING = ("train_loss", "val_map50", "val_count_mae")
_NOT_SHOWN = {"epoch", "attempt_start_epoch", "epoch_s", "samples_per_s", "skipped_items", "train_items",
              "resumed_items"}


def epoch_line(metrics: dict[str, Any], epochs: int) -> str:
    """One finished epoch as a line (epochs counted from 1 here; the lineage counts from 0)."""
    parts = [f"epoch {int(metrics.get('epoch', 0)) + 1}/{epochs}"]
    names = [k for k in _LEADING if k in metrics] + sorted(
        k for k, v in metrics.items() if k not in _LEADING and k not in _NOT_SHOWN and isinstance(v, float))
    parts += [f"{k} {metrics[k]:.4f}" for k in names if isinstance(metrics[k], (int, float))]
    if "epoch_s" in metrics:
        parts.append(f"train {metrics['epoch_s']:.1f} s")
    if "samples_per_s" in metrics:
        parts.append(f"{metrics['samples_per_s']:.1f} samples/s")
    if "skipped_items" in metrics:
        parts.append(f"{metrics['skipped_items']} skipped")
    if metrics.get("resumed_items"):  # a mid-epoch resume: the time and rate are this attempt's
        parts.append(f"resumed after {metrics['resumed_items']} of {metrics.get('train_items', '?')} items")
    return "  ".join(parts)


class RunDisplay:
    """Progress of one run on ``out``: ``progress`` per step report, ``epoch`` per finished
    epoch, ``close`` at the end. ``interactive`` (default: ``out`` is a terminal) turns the bar on."""

    def __init__(self, out: TextIO | None = None, *, epochs: int, interactive: bool | None = None) -> None:
        self.out = out if out is not None else sys.stdout
        self.epochs = epochs
        self.interactive = self.out.isatty() if interactive is None else interactive
        self._bar: Any = None
        self._bar_epoch: int | None = None
        self.lines: list[str] = []  # every epoch line printed, for callers that report them again

    def progress(self, report: dict[str, Any]) -> None:
        """A step report: ``{"epoch", "step", "steps", "samples", "loss", "elapsed_s"}``."""
        if not self.interactive:
            return
        from tqdm import tqdm

        epoch = int(report.get("epoch", 0))
        if self._bar is None or self._bar_epoch != epoch:
            self._close_bar()
            self._bar = tqdm(total=report.get("steps") or None, desc=f"epoch {epoch + 1}/{self.epochs}",
                             unit="step", file=self.out, leave=False, dynamic_ncols=True)
            self._bar_epoch = epoch
        self._bar.n = int(report.get("step", 0))
        elapsed = float(report.get("elapsed_s") or 0.0)
        postfix = {"loss": f"{report['loss']:.4f}"} if report.get("loss") is not None else {}
        if elapsed > 0:
            postfix["samples/s"] = f"{report.get('samples', 0) / elapsed:.1f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.refresh()

    def epoch(self, metrics: dict[str, Any]) -> None:
        """A finished epoch: its line, printed at once."""
        self._close_bar()
        line = epoch_line(metrics, self.epochs)
        self.lines.append(line)
        print(line, file=self.out, flush=True)

    def close(self) -> None:
        self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar, self._bar_epoch = None, None


def finished_lines(run_id: str, epochs: int, skipped: int, lineage_uri: str, checkpoint_uri: str | None,
                   further: str) -> list[str]:
    """What a finished run prints last: epochs and skips, where its record and checkpoints are,
    and the exact command that trains it further."""
    lines = [f"finished run {run_id}: {epochs} epoch{'s' if epochs != 1 else ''}, "
             f"{skipped} item{'s' if skipped != 1 else ''} skipped",
             f"lineage:     {lineage_uri}"]
    if checkpoint_uri:
        lines.append(f"checkpoints: {checkpoint_uri}")
    lines.append(f"to train it further: {further}")
    return lines


def checkpoint_uri(store_uri: str, path: str | None) -> str | None:
    """A checkpoint's filesystem path (Ray Train's, on the store's filesystem) as a URI."""
    if not path or "://" in path:
        return path
    return f"s3://{path}" if store_uri.startswith("s3://") else f"file://{path}"
