"""Progress for people: the ingest/verify meter and a run's display, without Ray."""

from __future__ import annotations

import io
import logging

from orchestrator.meter import Meter
from orchestrator.train.display import RunDisplay, epoch_line


def test_meter_draws_count_of_total_and_mb_per_s_on_a_terminal():
    out = io.StringIO()
    with Meter("uploading media", 4, "blob", out=out, show=True, rate_bytes=True) as meter:
        meter.update(2, 3_000_000)
        meter.update(2, 1_000_000)
    text = out.getvalue()
    assert "uploading media" in text and "4/4" in text and "4.0 MB" in text and "MB/s" in text


def test_meter_without_a_terminal_draws_nothing_and_logs_one_summary(caplog):
    out = io.StringIO()
    with caplog.at_level(logging.INFO, logger="orchestrator.progress"):
        with Meter("probing files", 3, "file", out=out) as meter:  # StringIO is no terminal
            meter.update(3)
    assert out.getvalue() == ""
    assert [r.getMessage().split(" in ")[0] for r in caplog.records] == ["probing files: 3 of 3 files"]


def test_epoch_line_names_loss_metric_time_throughput_and_skips():
    line = epoch_line({"epoch": 0, "train_loss": 1.23456, "val_map50": 0.5, "epoch_s": 12.34,
                       "samples_per_s": 40.0, "skipped_items": 2, "train_items": 400,
                       "attempt_start_epoch": 0}, epochs=3)
    assert line == "epoch 1/3  train_loss 1.2346  val_map50 0.5000  train 12.3 s  40.0 samples/s  2 skipped"
    resumed = epoch_line({"epoch": 1, "train_loss": 1.0, "train_items": 47, "resumed_items": 32,
                          "train_digest": "00ab", "epoch_s": 2.0, "samples_per_s": 7.5}, epochs=2)
    assert resumed == "epoch 2/2  train_loss 1.0000  train 2.0 s  7.5 samples/s  resumed after 32 of 47 items"


def test_display_draws_a_bar_per_epoch_on_a_terminal_and_plain_lines_otherwise():
    tty, plain = io.StringIO(), io.StringIO()
    for out, interactive in ((tty, True), (plain, False)):
        display = RunDisplay(out, epochs=2, interactive=interactive)
        display.progress({"epoch": 0, "step": 3, "steps": 10, "samples": 48, "loss": 2.5, "elapsed_s": 2.0})
        display.epoch({"epoch": 0, "train_loss": 2.0})
        display.close()
    assert "3/10" in tty.getvalue() and "loss=2.5000" in tty.getvalue() and "samples/s=24.0" in tty.getvalue()
    assert plain.getvalue() == "epoch 1/2  train_loss 2.0000\n"
