"""train.progress, the driver's side without Ray: what the controller's messages do to the
lineage and to the time the worker group has waited to be placed."""

from __future__ import annotations

from orchestrator.train.lineage import Lineage
from orchestrator.train.progress import RunWatch, StepReporter


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _watch() -> tuple[RunWatch, Clock]:
    clock = Clock()
    lineage = Lineage(run_id="r", config={}, dataset="d", version=0, query=None, items={},
                      items_digest={}, principal="p", code_revision="x", started_at="2026-01-01T00:00:00+00:00")
    return RunWatch(runs=None, lineage=lineage, clock=clock), clock


def test_waiting_for_placement_counts_until_running_and_again_after_a_restart():
    watch, clock = _watch()
    clock.t = 130.0
    assert watch.waited_for_placement() == 30.0  # a fit starts by placing its workers
    watch.apply([("state", "SchedulingState"), ("state", "RunningState")], at=131.0)
    assert watch.waited_for_placement() is None
    watch.apply([("state", "RestartingState")], at=140.0)  # a worker died
    watch.apply([("state", "SchedulingState")], at=141.0)  # still the same wait
    clock.t = 150.0
    assert watch.waited_for_placement() == 10.0
    watch.apply([("state", "RunningState"), ("state", "ShuttingDownState")], at=151.0)
    assert watch.waited_for_placement() is None


def test_reports_append_to_the_lineage_and_the_controller_handle_is_kept():
    watch, _ = _watch()
    assert not watch.apply([("controller", ("handle", "abc")), ("state", "RunningState")], at=1.0)
    assert watch.controller == "handle" and watch.controller_id == "abc"
    assert watch.apply([("report", {"epoch": 0, "train_loss": 2.0})], at=2.0)
    assert watch.apply([("report", {"epoch": 1, "train_loss": 1.0})], at=3.0)
    assert [m["epoch"] for m in watch.lineage.metrics] == [0, 1]


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def progress(self, report):
        self.calls.append(("step", report["step"]))

    def epoch(self, metrics):
        self.calls.append(("epoch", metrics["epoch"]))


def test_step_reports_reach_the_display_once_each_and_not_after_their_epoch_ended():
    watch, _ = _watch()
    watch.display = recorder = Recorder()
    watch.apply_step({"epoch": 0, "step": 1})
    watch.apply_step({"epoch": 0, "step": 1})  # the same report read again
    watch.apply_step({"epoch": 0, "step": 5})
    watch.apply([("report", {"epoch": 0, "train_loss": 1.0})], at=1.0)
    watch.apply_step({"epoch": 0, "step": 9})  # read after the epoch's report: not drawn again
    watch.apply_step({"epoch": 1, "step": 1})
    assert recorder.calls == [("step", 1), ("step", 5), ("epoch", 0), ("step", 1)]


def test_step_reporter_sends_at_most_once_per_interval_and_times_the_epoch():
    sent = []

    class Mailbox:
        class step:  # noqa: N801 - stands for an actor method
            @staticmethod
            def remote(report):
                sent.append(report)

    clock = Clock()
    reporter = StepReporter(Mailbox(), epoch=2, steps=10, world=2, every_s=1.0, clock=clock)
    for t, loss in ((100.1, 4.0), (100.5, 2.0), (101.2, 3.0)):
        clock.t = t
        reporter.step(8, loss)
    assert [(r["step"], r["samples"], r["loss"]) for r in sent] == [(1, 16, 4.0), (3, 48, 3.0)]
    clock.t = 104.0
    assert reporter.finish(48) == {"epoch_s": 4.0, "samples_per_s": 12.0}
