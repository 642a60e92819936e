"""How a fit reports back to its driver while it runs: epoch metrics, controller states, and the
controller itself (to stop it).

Ray Train V2 runs its controller in an actor, and its callbacks run there, not in the driver.
:class:`RunProgressCallback` forwards what the controller sees to a :class:`RunMailbox`, a small
actor on the driver's node (no CPU), and the driver reads it every second (:class:`RunWatch`).
The driver stays the only writer of a run's lineage, for three reasons:

* no two processes race on one ``lineage.json`` (S3 has no locks; the last writer wins);
* a record stops changing exactly when its driver dies, which is how a reader tells ``lost``
  (the driver also refreshes ``heartbeat_at``);
* it sees what Ray Train has accepted: ``after_report`` fires once all workers have reported
  an epoch and its checkpoint is persisted. A rank-0 worker writing the record itself would
  write before that, and again after every restart, with credentials it should not need.

Ray internals used (checked against Ray 2.60): ``ControllerCallback`` / ``ReportCallback`` (a
``RunConfig`` callback that is not a ``UserCallback`` is registered for every hook it has) and
the controller's ``abort`` method, which is what Ray's own Ctrl-C handler calls.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from ray.train.v2._internal.execution.callback import ControllerCallback, ReportCallback

from orchestrator.errors import OrchestratorError
from orchestrator.train.lineage import HEARTBEAT_S, Lineage, merge_epoch_metrics, now, write_lineage

if TYPE_CHECKING:
    from orchestrator.train.display import RunDisplay
    from orchestrator.train.lineage import RunHome

log = logging.getLogger(__name__)

# Controller states in which the worker group is not (yet, or no longer) placed and started.
WAITING_STATES = frozenset({"InitializingState", "SchedulingState", "ReschedulingState",
                            "RestartingState", "ResizingState"})
ABORT_TIMEOUT_S = 20.0  # a controller busy waiting on a placement group cannot answer abort
#: Everything a stop does (find the controller, abort or kill it, remove its placement groups,
#: wait for the fit to end) shares this budget. Each step had its own bound before, and on a
#: busy cluster they added up past two minutes: an interrupted run must be gone well within one.
STOP_BUDGET_S = 30.0


class RunMailbox:
    """Messages from the controller to the driver, kept in order; ``read(since)`` is idempotent,
    so a read interrupted by Ctrl-C loses nothing."""

    def __init__(self) -> None:
        self._messages: list[tuple[str, Any]] = []
        self._step: dict[str, Any] | None = None

    def post(self, kind: str, payload: Any) -> None:
        self._messages.append((kind, payload))

    def step(self, report: dict[str, Any]) -> None:
        """Rank 0's latest step report (``StepReporter``): kept alone, not queued, since only
        the newest matters to a progress bar and a long run sends one a second."""
        self._step = report

    def read(self, since: int) -> list[tuple[str, Any]]:
        return self._messages[since:]

    def read_with_step(self, since: int) -> tuple[list[tuple[str, Any]], dict[str, Any] | None]:
        """``read(since)`` and the latest step report, in one call."""
        return self._messages[since:], self._step


def open_mailbox():
    """A mailbox actor on this driver's node, owned by it (it dies with the driver)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return ray.remote(num_cpus=0, max_restarts=0)(RunMailbox).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()


class RunProgressCallback(ControllerCallback, ReportCallback):
    """Runs in the controller: posts the controller's handle, each state it enters and rank 0's
    metrics of each epoch (fire and forget: the controller never waits on the driver)."""

    def __init__(self, mailbox: Any) -> None:
        self._mailbox = mailbox

    def after_controller_start(self, train_run_context: Any) -> None:
        import ray

        context = ray.get_runtime_context()
        self._mailbox.post.remote("controller", (context.current_actor, context.get_actor_id()))

    def after_controller_state_update(self, previous_state: Any, current_state: Any) -> None:
        self._mailbox.post.remote("state", type(current_state).__name__)

    def after_report(self, training_report: Any, metrics: list[dict[str, Any]]) -> None:
        if metrics:
            self._mailbox.post.remote("report", {k: _plain(v) for k, v in metrics[0].items()})


class StepReporter:
    """Rank 0's step reports for the driver's progress bar, sent to the run's mailbox at most
    every ``every_s`` seconds (fire and forget: a step never waits on the driver), and the
    epoch's time and throughput for its metrics (``finish``).

    ``samples`` counts this rank's items times the world size: the global figure when shards
    are equal, without a collective per step."""

    def __init__(self, mailbox: Any, epoch: int, steps: int | None, world: int, *,
                 every_s: float = 1.0, clock=time.monotonic) -> None:
        self.mailbox, self.epoch, self.steps, self.world = mailbox, epoch, steps, world
        self.every_s, self.clock = every_s, clock
        self.started = clock()
        self.step_count = self.samples = 0
        self.loss_sum = 0.0
        self._running_loss: float | None = None
        self._sent_at = -float("inf")

    def step(self, samples: int, loss: float | None = None, *, running_loss: float | None = None) -> None:
        """One step of ``samples`` items on this rank, with its ``loss`` (or Keras's
        ``running_loss``, already a mean over the epoch's steps)."""
        self.step_count += 1
        self.samples += samples * self.world
        if loss is not None:
            self.loss_sum += loss
        self._running_loss = running_loss
        now = self.clock()
        if self.mailbox is not None and now - self._sent_at >= self.every_s:
            self._sent_at = now
            self.mailbox.step.remote(self.report())

    def report(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step_count, "steps": self.steps, "samples": self.samples,
                "loss": (self._running_loss if self._running_loss is not None
                         else self.loss_sum / self.step_count if self.step_count else None),
                "elapsed_s": self.clock() - self.started}

    def finish(self, samples: int | None = None) -> dict[str, float]:
        """``epoch_s`` and ``samples_per_s`` of the epoch (``samples``: the exact global count,
        when the loop has it)."""
        seconds = max(self.clock() - self.started, 1e-9)
        total = self.samples if samples is None else samples
        return {"epoch_s": round(seconds, 3), "samples_per_s": round(total / seconds, 2)}


def skipped_so_far(ledger_name: str | None) -> int | None:
    """Items the run's pipelines have skipped so far (its skip ledger), or None when it cannot
    be read; an epoch's count is the difference across it."""
    if not ledger_name:
        return None
    try:
        from orchestrator.adapters.ray import SkipLedger

        return SkipLedger(ledger_name, None).read(timeout=10.0).count
    except Exception:  # noqa: BLE001 - a count missing from a metric must not fail training
        log.warning("cannot read the skip ledger %s", ledger_name, exc_info=True)
        return None


class RunWatch:
    """The driver's side: applies the mailbox to the lineage (metrics appended per epoch, a
    heartbeat every ``HEARTBEAT_S``), tracks how long the worker group has waited to be placed,
    and stops the controller. ``apply`` is pure given ``at``; the rest talks to Ray and the store."""

    def __init__(self, runs: RunHome, lineage: Lineage, mailbox: Any = None, *,
                 clock=time.monotonic, display: RunDisplay | None = None) -> None:
        self.runs, self.lineage, self.mailbox, self.clock = runs, lineage, mailbox, clock
        self.display = display
        self._last_step: dict[str, Any] | None = None
        self.controller: Any = None
        self.controller_id: str | None = None
        # Set by the thread running trainer.fit() when it ends. Not Thread.join/is_alive: on
        # Python 3.11 a join interrupted by Ctrl-C can mark a live thread as stopped.
        self.fit_running = False
        self.fit_done = threading.Event()
        self.waiting_since: float | None = clock()  # the fit starts by placing its workers
        self._read = 0
        self._written_at = clock()

    def apply(self, messages: list[tuple[str, Any]], at: float) -> bool:
        """Take messages in; True when the lineage changed."""
        changed = False
        for kind, payload in messages:
            if kind == "controller":
                self.controller, self.controller_id = payload
            elif kind == "state":
                if payload == "RunningState":
                    self.waiting_since = None
                elif payload in WAITING_STATES and self.waiting_since is None:
                    self.waiting_since = at
            elif kind == "report" and payload.get("mid_epoch"):  # a checkpoint inside an epoch
                self.lineage.position = {"epoch": payload.get("epoch"), "step": payload.get("step")}
                changed = True
            elif kind == "report":
                self.lineage.metrics = merge_epoch_metrics(self.lineage.metrics, payload)
                self.lineage.position = None
                changed = True
                if self.display is not None:
                    self.display.epoch(payload)
        return changed

    def apply_step(self, report: dict[str, Any] | None) -> None:
        """Rank 0's latest step report, to the display (once each)."""
        if report is not None and report != self._last_step and self.display is not None:
            self._last_step = report
            if not self.lineage.metrics or report.get("epoch", -1) > self.lineage.metrics[-1].get("epoch", -1):
                self.display.progress(report)  # not a late report of an epoch already printed

    def waited_for_placement(self) -> float | None:
        """Seconds the worker group has been waiting to be placed and started, or None."""
        return None if self.waiting_since is None else self.clock() - self.waiting_since

    def poll(self, *, write: bool = True, timeout: float = 2.0) -> None:
        """Read new messages (waiting at most ``timeout`` for the mailbox: short, because a
        Ctrl-C may reach the driver only once this wait returns, and a read that times out loses
        nothing, the next poll asks again from the same place); write the lineage
        when an epoch arrived or the heartbeat is due. Store trouble is logged, not raised: the
        run goes on and the next poll writes again."""
        import ray

        if self.mailbox is not None:
            step = None
            try:
                messages, step = ray.get(self.mailbox.read_with_step.remote(self._read),
                                         timeout=max(0.1, timeout))
            except ray.exceptions.GetTimeoutError:
                messages = []
            except ray.exceptions.RayError as exc:  # the mailbox is gone or never started
                log.warning("run %s: no progress reports (%s): the epochs are recorded at the end, "
                            "and the schedule timeout is off", self.lineage.run_id, type(exc).__name__)
                self.mailbox, messages, self.waiting_since = None, [], None
            self._read += len(messages)
            changed = self.apply(messages, self.clock())
            self.apply_step(step)
        else:
            changed = False
        if write and (changed or self.clock() - self._written_at >= HEARTBEAT_S):
            self.write()

    def write(self) -> None:
        self.lineage.heartbeat_at = now()
        try:
            write_lineage(self.runs, self.lineage)
            self._written_at = self.clock()
        except OrchestratorError:
            log.warning("cannot record the progress of run %s", self.lineage.run_id, exc_info=True)

    def await_controller(self, timeout: float) -> Any:
        """The controller's handle, waiting up to ``timeout`` for it to be posted."""
        deadline = self.clock() + timeout
        while self.controller is None and self.clock() < deadline:
            self.poll(write=False, timeout=deadline - self.clock())
            if self.controller is None:
                time.sleep(0.2)
        return self.controller

    def stop(self, *, graceful: bool, budget: float = STOP_BUDGET_S) -> None:
        """End a fit that is still going and wait until it has wound down, all within ``budget``
        seconds: ``abort`` the controller (workers shut down, their placement group removed, as
        Ray's own Ctrl-C handler does), or ``ray.kill`` it when ``graceful`` is off or abort gets
        no answer (its workers are owned by it and die with it; its placement groups are removed
        here)."""
        if not self.fit_running or self.fit_done.is_set():
            return
        deadline = self.clock() + budget
        self._end_controller(graceful, deadline)
        if self.controller_id:  # abort removes them too, unless it came mid-start; a kill never does
            _remove_placement_groups_of(self.controller_id)
        if not self.fit_done.wait(max(0.0, deadline - self.clock())):
            log.warning("run %s: the fit did not wind down within %.0f s", self.lineage.run_id, budget)

    def _end_controller(self, graceful: bool, deadline: float) -> None:
        import ray

        controller = self.await_controller(min(10.0, max(0.0, deadline - self.clock())))
        if controller is None:
            log.warning("run %s: no controller to stop", self.lineage.run_id)
            return
        if graceful:
            log.info("run %s: aborting the controller", self.lineage.run_id)
            try:
                # Leave a third of what is left for the kill and the wait that follow.
                ray.get(controller.abort.remote(),
                        timeout=max(1.0, min(ABORT_TIMEOUT_S, (deadline - self.clock()) * 2 / 3)))
                log.info("run %s: abort returned", self.lineage.run_id)
                return
            except ray.exceptions.GetTimeoutError:
                log.info("run %s: the controller did not answer abort; killing it", self.lineage.run_id)
            except ray.exceptions.RayError as exc:  # abort ends the actor: the expected answer
                log.info("run %s: abort ended the controller (%s)", self.lineage.run_id, type(exc).__name__)
                return
        try:
            ray.kill(controller, no_restart=True)
        except ValueError:  # already gone
            pass

    def close(self) -> None:
        import ray

        if self.mailbox is not None:
            try:
                ray.kill(self.mailbox, no_restart=True)
            except Exception:  # noqa: BLE001 - the driver may be disconnecting
                pass
            self.mailbox = None


def _remove_placement_groups_of(actor_id: str) -> None:
    """Remove the placement groups a killed actor created. Ray ties a placement group's life to
    its creator's job, not to the creating actor: the worker group's group (pending, when the
    run could not be placed) would outlive a killed controller for as long as the driver lives.
    Reads the GCS table (the state API needs a dashboard, which a local cluster lacks)."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        table = [gcs_pb2.PlacementGroupTableData.FromString(raw)
                 for raw in state._connect_and_get_accessor().get_placement_group_table()]
        for pg in table:
            if pg.creator_actor_id.hex() == actor_id and pg.state != gcs_pb2.PlacementGroupTableData.REMOVED:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
                log.info("removed placement group %s of the stopped controller", pg.placement_group_id.hex())
    except Exception:  # noqa: BLE001 - best effort; Ray removes it when the driver's job ends
        log.warning("cannot remove the placement groups of controller %s", actor_id, exc_info=True)


def _plain(v: Any) -> Any:
    try:
        return v.item()  # numpy scalar
    except AttributeError:
        return v
