"""Run a training config on Ray Train: resolve the data, record lineage, fit, record results.

Everything that can be wrong with the config, the store, the dataset, the version or the query is
checked before Ray starts. The data reach the workers as Ray Data pipelines (manifest scan with
the slice and split pushed down → blob fetch through the node cache → decode → resize/pad): each
worker gets its own shard of ``train``, produced on its own node (train/data.py), and rank 0
scores ``validation``.

A run ends honestly. ``trainer.fit()`` runs in a thread while this (main) thread watches it
(train/progress.py): it appends each epoch's metrics to the lineage as the epoch reports,
refreshes the driver's heartbeat, and fails the run when the worker group has waited longer than
``scaling.schedule_timeout_s`` to be placed (a run nothing in the cluster or its autoscaler can
hold fails before fitting). Ctrl-C (or SIGTERM) reaches this thread, not Ray's handler (Ray Train
registers one only when ``fit`` runs in the main thread): the controller is aborted, which shuts
the workers down and removes their placement group, and the lineage records ``interrupted``
with the epochs that finished before the exception goes on.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orchestrator
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.ray_runtime import (
    anchor_data_actors,
    ensure_ray,
    orchestrator_error_in,
    running_cluster_address,
    warm_up_for_training,
)
from orchestrator.stream.split import HashSplit, validation_mask
from orchestrator.train.config import RunSettings
from orchestrator.train.lineage import (
    Lineage,
    code_revision,
    driver_identity,
    ids_digest,
    new_run_id,
    now,
    read_lineage,
    runs_dir,
    write_lineage,
)
from orchestrator.train.models.registry import import_root, model_function
from orchestrator.train.placement import (
    ResourceRequest,
    autoscaler_node_types,
    cluster_nodes,
    free_resources,
    placeable,
    unschedulable_message,
)
from orchestrator.train.storage import checkpoint_filesystem

if TYPE_CHECKING:
    from orchestrator.train.data import RunData
    from orchestrator.train.display import RunDisplay
    from orchestrator.train.progress import RunWatch

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """A config resolved against the store: exact version, item sets, run id."""

    settings: RunSettings
    store: orchestrator.Store
    dataset: orchestrator.Dataset
    run_id: str
    lineage: Lineage
    train_ids: list[str]


def latest_run_id(store: orchestrator.Store, config_name: str) -> str:
    """The most recent run started from a config of this name (for ``--resume``)."""
    from orchestrator.train.lineage import list_runs

    runs = [r for r in list_runs(store.runs) if r.run_id.startswith(f"{config_name}-")]
    if not runs:
        raise ConfigError(f"no earlier run of {config_name!r} to resume in {store.uri}",
                          hint="run without --resume first, or pass --resume RUN_ID")
    return runs[-1].run_id


#: Config sections a resume may change: how the run is placed, fed and checkpointed, not what
#: it trains on or how (``train.epochs`` too, when extending is asked for explicitly).
RESUME_MAY_CHANGE = ("scaling.", "data.", "checkpoint.")


def _flat(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_conflicts(recorded: dict[str, Any], resolved: dict[str, Any], *, extend: bool) -> list[str]:
    """The keys in which a resume's config differs from the run it resumes, each as
    ``key: recorded -> now``, leaving out what a resume may change (``RESUME_MAY_CHANGE``, the
    store URI's spelling, ``version: latest``, and ``train.epochs`` when ``extend``)."""
    before, after = _flat(recorded), _flat(resolved)
    conflicts = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old == new or key.startswith(RESUME_MAY_CHANGE) or key == "store":
            continue
        if key == "train.epochs" and extend:
            continue
        conflicts.append(f"{key}: {old!r} -> {new!r}")
    return conflicts


def plan_run(settings: RunSettings, *, config_name: str = "run", resume: str | bool | None = None,
             extend_epochs: bool = False) -> Plan:
    """Resolve everything a run needs without starting Ray; raise user errors early.

    ``resume``: a run id, or True for the latest run of ``config_name``. A resumed run trains
    what it recorded: the same dataset version, query, split, model and training settings; a
    config that differs in any of them is refused with the keys that differ. ``extend_epochs``
    (the CLI: an explicit ``--set train.epochs=N``) lets ``train.epochs`` grow; placement,
    data-path and checkpoint settings may change freely (e.g. fewer workers)."""
    store = orchestrator.connect(settings.store)
    if resume is True:
        resume = latest_run_id(store, config_name)
    version = None if settings.version == "latest" else int(settings.version)
    if resume:
        previous = read_lineage(store.runs, resume)
        if settings.version == "latest":  # the recorded number; another number is refused below
            settings = settings.model_copy(update={"version": previous.version})
        version = previous.version
        _check_resume(previous, settings, extend_epochs)
    ds = store.dataset(settings.dataset, version)
    if settings.query:
        ds = ds.slice(settings.query)
    ids = ds.item_ids()
    if not ids:
        raise ConfigError(
            f"dataset {settings.dataset!r} version {ds.version} has no items"
            + (f" matching {settings.query!r}" if settings.query else ""),
            hint="check the query with `orchestrator slice --count`",
        )
    val = validation_mask(ids, settings.split.validation_fraction, settings.split.seed)
    train_ids = [i for i, v in zip(ids, val) if not v]
    val_ids = [i for i, v in zip(ids, val) if v]
    if len(train_ids) < settings.scaling.num_workers:
        raise ConfigError(
            f"only {len(train_ids)} training items for {settings.scaling.num_workers} workers",
            hint="lower scaling.num_workers or split.validation_fraction",
        )
    model_function(settings.model.name)  # a user model's import fails here, before Ray starts
    resolved = settings.model_dump(mode="json")
    resolved["version"] = ds.version
    run_id = resume or new_run_id(config_name)
    lineage = Lineage(
        run_id=run_id, config=resolved, dataset=settings.dataset, version=ds.version,
        query=settings.query, items={"train": len(train_ids), "validation": len(val_ids)},
        items_digest={"train": ids_digest(train_ids), "validation": ids_digest(val_ids)},
        principal=store.principal, policy_version=store.access.policy_version,
        code_revision=code_revision(), started_at=now(),
    )
    if resume:
        lineage.metrics, lineage.position = previous.metrics, previous.position
        lineage.started_at = previous.started_at
        if lineage.items_digest != previous.items_digest:  # e.g. a policy change hides items now
            raise ConfigError(
                f"run {resume} cannot resume: its items are not the ones it recorded "
                f"(train {previous.items.get('train')} -> {lineage.items['train']}, validation "
                f"{previous.items.get('validation')} -> {lineage.items['validation']} items)",
                hint="start a new run; a resume must train on exactly what the run began with")
    return Plan(settings, store, ds, run_id, lineage, train_ids)


def _check_resume(previous: Lineage, settings: RunSettings, extend_epochs: bool) -> None:
    """Refuse a resume that would train something else than the run recorded (see ``plan_run``)."""
    resolved = settings.model_dump(mode="json")
    conflicts = resume_conflicts(previous.config, resolved, extend=extend_epochs)
    if conflicts:
        raise ConfigError(
            f"run {previous.run_id} cannot resume with a different config; it differs in:\n  "
            + "\n  ".join(conflicts),
            hint="resume with the recorded config (lineage.json's `config`), or start a new run; "
                 "only scaling.*, data.* and checkpoint.* may change, and train.epochs with an "
                 "explicit --set train.epochs=N")
    epochs, done = settings.train.epochs, len(previous.metrics)
    if previous.status == "finished" and epochs <= done:
        raise ConfigError(f"run {previous.run_id} finished all {done} of its epochs: nothing to resume",
                          hint=f"to train it further: --resume {previous.run_id} "
                               f"--set train.epochs={done + 1} (or more)")
    if epochs < done:
        raise ConfigError(f"run {previous.run_id} has trained {done} epochs; train.epochs={epochs} is fewer",
                          hint=f"resume with train.epochs >= {done}")


def run_data(plan: Plan) -> RunData:
    """What a plan's workers read: the read plan with the run's cache, read-task concurrency, retry
    deadline and skip ledger, the train ids and the split; ``train_datasets`` builds the run's
    pipelines from it. Public so that code outside a run can read exactly what the run would,
    e.g. the whole train split on the driver: ``run_data(plan).pipeline("train", 0, 1, None)``."""
    from orchestrator.stream.cache import BlobCache
    from orchestrator.train.data import RunData

    s = plan.settings
    # Each fetch worker builds its own cache from these settings (a BlobCache pickles as its
    # settings); the disk tier, on unless disk_cache_mb is 0, is its own node's (resolved on that
    # node), shared by every process there and by the run's epochs.
    cache = BlobCache(memory_budget=s.data.memory_cache_mb << 20, node_disk=s.data.disk_cache_mb != 0,
                      disk_budget=(s.data.disk_cache_mb << 20) if s.data.disk_cache_mb else None)
    return RunData(
        plan=plan.dataset.with_options(ray_fetch_actors=s.data.decode_concurrency, cache=cache,
                                       retry_deadline=s.data.retry_deadline_s,
                                       skip_ledger=skip_ledger_name(plan.run_id)).plan,
        train_ids=plan.train_ids,
        split=HashSplit(s.split.validation_fraction, s.split.seed, validation=True),
        shard_seed=s.split.seed, image_size=s.model.image_size, max_boxes=s.model.max_boxes,
    )


def skip_ledger_name(run_id: str) -> str:
    """The Ray actor in which every worker pipeline of a run records its skipped items."""
    return f"orchestrator-skips-{run_id}"


def _record_skips(lineage: Lineage) -> None:
    """Copy the run's skip ledger into its lineage and end the ledger; never raises (the run's
    own outcome is what must be recorded)."""
    import ray

    if not ray.is_initialized():  # the run failed before Ray was up: nothing was read (and any
        return  # Ray call here would start or attach to a cluster of its own)
    try:
        from orchestrator.adapters.ray import SkipLedger

        ledger = SkipLedger(skip_ledger_name(lineage.run_id), None)
        skips = ledger.read(timeout=5.0)
        ledger.close()
    except Exception:  # noqa: BLE001 - Ray gone, ledger never created
        log.warning("run %s: could not read its skipped-item ledger", lineage.run_id, exc_info=True)
        return
    lineage.skipped_items = skips.count
    lineage.skipped = skips.as_dict() if skips.count else None
    if skips.count:
        log.warning("run %s: %s", lineage.run_id, skips.summary(f"dataset {lineage.dataset!r}"))


def train_datasets(plan: Plan) -> tuple[dict[str, Any], Any]:
    """Ray Train's ``datasets`` and ``dataset_config`` for a plan. The datasets only name the
    splits; each worker's real pipeline is built per node by ``NodeLocalDataConfig.configure``
    once the workers are placed."""
    from orchestrator.train.data import NodeLocalDataConfig

    data = run_data(plan)
    datasets = {name: data.pipeline(name, 0, 1, None, [[]]) for name in ("train", "validation")}
    return datasets, NodeLocalDataConfig(data)


POLL_S = 1.0  # how often the driver reads the fit's progress


def run(plan: Plan, display: RunDisplay | None = None) -> Lineage:
    """Fit on Ray Train; the lineage record is written at start, after every epoch, every
    ``HEARTBEAT_S`` while the driver lives, and at the end: ``finished``, ``failed`` (the error
    is raised as an ``OrchestratorError``) or ``interrupted`` (``KeyboardInterrupt`` /
    ``SystemExit`` is re-raised once the workers are gone). ``display`` shows the steps and
    each finished epoch as they happen (``train.display``)."""
    lineage = plan.lineage
    lineage.status, lineage.driver, lineage.heartbeat_at = "running", driver_identity(), now()
    watch: RunWatch | None = None
    try:
        write_lineage(plan.store.runs, lineage)
        import ray

        may_grow = ray.is_initialized() or running_cluster_address()[0] is not None
        ensure_ray()  # without a cluster to attach to, a local one: it never grows
        anchor_data_actors()
        warm_up_for_training(plan.settings.scaling.num_workers)  # on a local cluster only
        request = ResourceRequest.from_settings(plan.settings.scaling)
        _refuse_unplaceable(request, may_grow=may_grow)
        trainer, watch = _trainer(plan, display)
        result = _fit_watched(plan, trainer, watch, request)
    except (KeyboardInterrupt, SystemExit) as stop:
        with _sigint_ignored():
            _wind_down(watch)
            _record_skips(lineage)
            lineage.status, lineage.finished_at = "interrupted", now()
            lineage.error = (f"interrupted by {_describe(stop)} after {len(lineage.metrics)} "
                             f"finished epoch{'s' if len(lineage.metrics) != 1 else ''}")
            write_lineage(plan.store.runs, lineage)
        raise
    except Exception as exc:
        _wind_down(watch)  # e.g. the store failed under the watch: nothing is left running
        _record_skips(lineage)
        # A store outage in a worker's fetch stage arrives wrapped in Ray's report: name it.
        cause = exc if isinstance(exc, OrchestratorError) else orchestrator_error_in(exc)
        lineage.status, lineage.finished_at = "failed", now()
        lineage.error = (str(cause) if cause is not None else str(exc))[:2000]
        write_lineage(plan.store.runs, lineage)
        if cause is exc:
            raise
        if cause is not None:
            raise cause from None
        raise OrchestratorError(f"training run {plan.run_id} failed: {str(exc).splitlines()[0][:500]}",
                                user_fault=False) from exc
    finally:
        if watch is not None:
            watch.close()
    if result.checkpoint is not None:  # the full history travels in the last checkpoint
        from orchestrator.train.loops import _load_history

        with result.checkpoint.as_directory() as d:
            lineage.metrics = [{k: _plain(v) for k, v in m.items()} for m in _load_history(d)]
    lineage.checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    _record_skips(lineage)
    lineage.status, lineage.finished_at = "finished", now()
    write_lineage(plan.store.runs, lineage)
    return lineage


def _wind_down(watch: RunWatch | None) -> None:
    """Stop a fit that is still going and take its last reports in; never raises, so the run's
    end is recorded whatever Ray answers."""
    if watch is None:
        return
    try:
        watch.stop(graceful=True)
        watch.poll(write=False, timeout=5.0)  # the last reports, if the mailbox still answers
    except Exception:  # noqa: BLE001 - recording the end matters more
        log.warning("run %s: stopping the fit failed", watch.lineage.run_id, exc_info=True)


def _refuse_unplaceable(request: ResourceRequest, *, may_grow: bool) -> None:
    """Fail now when neither the cluster's nodes nor those its autoscaler could add can ever
    hold the request (a cluster whose node types are unknown and that may grow gets the
    benefit of the doubt: the watch bounds the wait)."""
    nodes, types = cluster_nodes(), autoscaler_node_types()
    if placeable(request, nodes, types, may_grow=may_grow) == "never":
        raise ConfigError("the run cannot be placed on this cluster: "
                          + unschedulable_message(request, nodes, free_resources(), types, None),
                          hint=_UNPLACEABLE_HINT)


_UNPLACEABLE_HINT = ("lower scaling.num_workers or scaling.cpus_per_worker, or give the cluster more "
                     "nodes; if they are on their way, raise scaling.schedule_timeout_s")


def _trainer(plan: Plan, display: RunDisplay | None = None) -> tuple[Any, RunWatch]:
    """The Ray Train trainer for a plan, reporting its progress to a new ``RunWatch``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from orchestrator.train import loops
    from orchestrator.train.progress import RunProgressCallback, RunWatch, open_mailbox

    s = plan.settings
    loop_config = {
        "model": s.model.model_dump(), "train": s.train.model_dump(), "data": s.data.model_dump(),
        "num_classes": len(plan.dataset.label_map), "checkpoint_every": s.checkpoint.every_epochs,
        "checkpoint_every_steps": s.checkpoint.every_steps,
        "framework": s.framework, "train_items": plan.lineage.items["train"],
        "cpus_per_worker": s.scaling.cpus_per_worker,
        "skip_ledger": skip_ledger_name(plan.run_id),
        # What a model function receives beyond model.*: the label names and the whole config.
        "label_names": list(plan.dataset.label_map.names), "run_config": plan.lineage.config,
        "model_path": import_root(s.model.name),  # where a user model's module was found
    }
    scaling = ScalingConfig(
        num_workers=s.scaling.num_workers, use_gpu=s.scaling.use_gpu,
        resources_per_worker={"CPU": s.scaling.cpus_per_worker},
        placement_strategy=s.scaling.placement_strategy,
    )
    mailbox = open_mailbox()
    loop_config["mailbox"] = mailbox  # rank 0's step reports (progress.StepReporter)
    storage_path = s.checkpoint.path or runs_dir(plan.store.runs)
    run_config = RunConfig(
        name=plan.run_id,
        storage_path=storage_path,
        storage_filesystem=checkpoint_filesystem(plan.store.fs) if s.checkpoint.path is None else None,
        failure_config=FailureConfig(max_failures=s.checkpoint.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=s.checkpoint.keep),
        callbacks=[RunProgressCallback(mailbox)],
    )
    datasets, data_config = train_datasets(plan)
    loop_config["run_data"] = data_config.data  # a resumed epoch's remaining items (train.position)
    if s.framework == "torch":
        from ray.train.torch import TorchTrainer

        trainer = TorchTrainer(loops.torch_loop, train_loop_config=loop_config, scaling_config=scaling,
                               run_config=run_config, datasets=datasets, dataset_config=data_config)
    else:
        from orchestrator.optional import native_logs_hidden

        with native_logs_hidden():  # TensorFlow's C++ start-up lines
            from ray.train.tensorflow import TensorflowTrainer

        trainer = TensorflowTrainer(loops.tf_loop, train_loop_config=loop_config, scaling_config=scaling,
                                    run_config=run_config, datasets=datasets, dataset_config=data_config)
    return trainer, RunWatch(plan.store.runs, plan.lineage, mailbox, display=display)


def _fit_watched(plan: Plan, trainer: Any, watch: RunWatch, request: ResourceRequest) -> Any:
    """``trainer.fit()`` in a thread, watched from this one (see the module doc). A fit whose
    workers wait too long to be placed is killed here; anything else that ends the watch early
    (Ctrl-C) is stopped by ``run`` before it records the run."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the watching thread
            outcome["error"] = exc
        finally:
            watch.fit_done.set()

    watch.waiting_since = watch.clock()
    watch.fit_running = True
    threading.Thread(target=fit, name=f"fit {plan.run_id}", daemon=True).start()
    while not watch.fit_done.wait(POLL_S):
        watch.poll()
        waited = watch.waited_for_placement()
        if waited is not None and waited > plan.settings.scaling.schedule_timeout_s:
            # Killed, not aborted: a controller waiting on its placement group answers nothing.
            watch.stop(graceful=False)
            raise ConfigError(
                f"the workers of run {plan.run_id} were not placed and started in time: "
                + unschedulable_message(request, cluster_nodes(), free_resources(),
                                        autoscaler_node_types(), waited),
                hint=_UNPLACEABLE_HINT)
    watch.poll(write=False)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


@contextlib.contextmanager
def _sigint_ignored():
    """While a stopped run winds down and records itself, a second Ctrl-C would leave both
    half done: ignore it for that bounded time (main thread only; elsewhere signals are not ours)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _describe(stop: BaseException) -> str:
    if isinstance(stop, KeyboardInterrupt):
        return "SIGINT (Ctrl-C)"
    code = getattr(stop, "code", None)
    return f"SIGTERM (exit {code})" if code == signal.SIGTERM else f"SystemExit({code!r})"


def _plain(v: Any) -> Any:
    try:
        return v.item()  # numpy scalar
    except AttributeError:
        return v
