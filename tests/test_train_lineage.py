"""train.lineage pure parts: per-epoch merge, reading newer records, and when a `running`
record is shown as `lost`."""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime, timedelta

from orchestrator.train.lineage import (
    Lineage,
    driver_identity,
    merge_epoch_metrics,
    observed_status,
    process_alive,
)

NOW = datetime(2026, 1, 2, 12, 0, 0, tzinfo=UTC)


def _record(**kw) -> Lineage:
    base = dict(run_id="r", config={}, dataset="street", version=0, query=None,
                items={"train": 1, "validation": 0}, items_digest={}, principal="me",
                code_revision="x", started_at=(NOW - timedelta(hours=1)).isoformat())
    return Lineage(**{**base, **kw})


def test_epoch_reports_append_and_a_repeated_epoch_replaces_the_later_ones():
    h = merge_epoch_metrics([], {"epoch": 0, "train_loss": 3.0})
    h = merge_epoch_metrics(h, {"epoch": 1, "train_loss": 2.0})
    h = merge_epoch_metrics(h, {"epoch": 2, "train_loss": 1.5})
    assert [m["epoch"] for m in h] == [0, 1, 2]
    # a worker group restarted from the epoch-0 checkpoint reports epoch 1 again
    h = merge_epoch_metrics(h, {"epoch": 1, "train_loss": 1.9})
    assert [(m["epoch"], m["train_loss"]) for m in h] == [(0, 3.0), (1, 1.9)]


def test_a_record_with_fields_this_code_does_not_know_still_reads():
    doc = {**_record().as_dict(), "a_field_from_a_newer_release": 4}
    assert Lineage.from_dict(doc).run_id == "r"


def test_finished_failed_and_interrupted_records_are_shown_as_written():
    for status in ("finished", "failed", "interrupted"):
        assert observed_status(_record(status=status), now=NOW, host="h",
                               alive=lambda *_: False) == status


def test_a_running_record_on_this_host_is_lost_once_its_driver_process_is_gone():
    rec = _record(driver={"host": "h", "pid": 123, "process_start": "boot:1"},
                  heartbeat_at=NOW.isoformat())
    assert observed_status(rec, now=NOW, host="h", alive=lambda pid, start: True) == "running"
    assert observed_status(rec, now=NOW, host="h", alive=lambda pid, start: False) == "lost"


def test_a_running_record_from_another_host_is_lost_once_its_heartbeat_is_stale():
    fresh = _record(driver={"host": "other", "pid": 1}, heartbeat_at=(NOW - timedelta(seconds=20)).isoformat())
    stale = _record(driver={"host": "other", "pid": 1}, heartbeat_at=(NOW - timedelta(minutes=30)).isoformat())
    never = lambda *_: False  # noqa: E731 - another host's pid is never checked here
    assert observed_status(fresh, now=NOW, host="h", alive=never) == "running"
    assert observed_status(stale, now=NOW, host="h", alive=never) == "lost"
    # records written before drivers were recorded: judged by their start
    assert observed_status(_record(), now=NOW, host="h") == "lost"
    assert observed_status(_record(started_at=NOW.isoformat()), now=NOW, host="h") == "running"


def test_process_alive_tells_this_process_from_a_finished_one_and_a_reused_pid():
    me = driver_identity()
    assert me["pid"] == os.getpid() and me["host"]
    assert process_alive(me["pid"], me["process_start"])
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid is free
    assert not process_alive(gone.pid, None)
    if me["process_start"] is not None:  # Linux: a live pid that started at another time
        assert not process_alive(me["pid"], me["process_start"] + "0")
