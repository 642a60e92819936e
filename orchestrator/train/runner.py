"""Run a training config on Ray Train: resolve the data, record lineage, fit, record results.

Everything that can be wrong with the config, the store, the dataset, the version or the query is
checked before Ray starts. The data reach the workers as Ray Data pipelines (manifest scan with
the slice and split pushed down → blob fetch through the node cache → decode → resize/pad): each
worker gets its own shard of ``train``, produced on its own node (train/data.py), and rank 0
scores ``validation``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orchestrator
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.ray_runtime import anchor_data_actors, ensure_ray
from orchestrator.stream.split import HashSplit, validation_mask
from orchestrator.train.config import RunSettings
from orchestrator.train.storage import checkpoint_filesystem
from orchestrator.train.lineage import (
    Lineage, code_revision, ids_digest, new_run_id, now, read_lineage, runs_dir, write_lineage,
)

if TYPE_CHECKING:
    from orchestrator.train.data import RunData

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

    runs = [r for r in list_runs(store) if r.run_id.startswith(f"{config_name}-")]
    if not runs:
        raise ConfigError(f"no earlier run of {config_name!r} to resume in {store.uri}",
                          hint="run without --resume first, or pass --resume RUN_ID")
    return runs[-1].run_id


def plan_run(settings: RunSettings, *, config_name: str = "run", resume: str | bool | None = None) -> Plan:
    """Resolve everything a run needs without starting Ray; raise user errors early.

    ``resume``: a run id, or True for the latest run of ``config_name``; the resumed run keeps
    its version and continues from its latest checkpoint."""
    store = orchestrator.connect(settings.store)
    if resume is True:
        resume = latest_run_id(store, config_name)
    version = None if settings.version == "latest" else int(settings.version)
    if resume:
        previous = read_lineage(store, resume)
        version = previous.version
    ds = store.dataset(settings.dataset, version, prefetch=settings.data.prefetch_batches + 1)
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
        lineage.metrics = previous.metrics
        lineage.started_at = previous.started_at
    return Plan(settings, store, ds, run_id, lineage, train_ids)


def _run_data(plan: Plan) -> "RunData":
    from orchestrator.stream.cache import BlobCache, default_disk_dir
    from orchestrator.train.data import RunData

    s = plan.settings
    # Each fetch worker builds its own cache from these settings (a BlobCache pickles as its
    # settings); the disk tier, when on, is shared by every process on a node.
    cache = BlobCache(memory_budget=s.data.memory_cache_mb << 20,
                      disk_dir=default_disk_dir() if s.data.disk_cache_mb else None,
                      disk_budget=(s.data.disk_cache_mb << 20) or None)
    return RunData(
        dataset=plan.dataset.with_options(threads=s.data.decode_concurrency, cache=cache),
        train_ids=plan.train_ids,
        split=HashSplit(s.split.validation_fraction, s.split.seed, validation=True),
        shard_seed=s.split.seed, image_size=s.model.image_size, max_boxes=s.model.max_boxes,
    )


def train_datasets(plan: Plan) -> tuple[dict[str, Any], Any]:
    """Ray Train's ``datasets`` and ``dataset_config`` for a plan. The datasets only name the
    splits; each worker's real pipeline is built per node by ``NodeLocalDataConfig.configure``
    once the workers are placed."""
    from orchestrator.train.data import NodeLocalDataConfig

    run_data = _run_data(plan)
    datasets = {name: run_data.pipeline(name, 0, 1, None, [[]]) for name in ("train", "validation")}
    return datasets, NodeLocalDataConfig(run_data)


def run(plan: Plan) -> Lineage:
    """Fit on Ray Train; the lineage record is written at start, per epoch by the driver's
    result, and at the end (``status``: finished or failed)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    s = plan.settings
    write_lineage(plan.store, plan.lineage)
    ensure_ray()
    anchor_data_actors()
    from orchestrator.train import loops

    loop_config = {
        "model": s.model.model_dump(), "train": s.train.model_dump(), "data": s.data.model_dump(),
        "num_classes": len(plan.dataset.label_map), "checkpoint_every": s.checkpoint.every_epochs,
        "framework": s.framework, "train_items": plan.lineage.items["train"],
        "cpus_per_worker": s.scaling.cpus_per_worker,
    }
    scaling = ScalingConfig(
        num_workers=s.scaling.num_workers, use_gpu=s.scaling.use_gpu,
        resources_per_worker={"CPU": s.scaling.cpus_per_worker},
        placement_strategy=s.scaling.placement_strategy,
    )
    storage_path = s.checkpoint.path or runs_dir(plan.store)
    run_config = RunConfig(
        name=plan.run_id,
        storage_path=storage_path,
        storage_filesystem=checkpoint_filesystem(plan.store.fs) if s.checkpoint.path is None else None,
        failure_config=FailureConfig(max_failures=s.checkpoint.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=s.checkpoint.keep),
    )
    datasets, data_config = train_datasets(plan)
    if s.framework == "torch":
        from ray.train.torch import TorchTrainer

        trainer = TorchTrainer(loops.torch_loop, train_loop_config=loop_config, scaling_config=scaling,
                               run_config=run_config, datasets=datasets, dataset_config=data_config)
    else:
        from ray.train.tensorflow import TensorflowTrainer

        trainer = TensorflowTrainer(loops.tf_loop, train_loop_config=loop_config, scaling_config=scaling,
                                    run_config=run_config, datasets=datasets, dataset_config=data_config)
    lineage = plan.lineage
    try:
        result = trainer.fit()
    except Exception as exc:
        lineage.status, lineage.finished_at, lineage.error = "failed", now(), str(exc)[:2000]
        write_lineage(plan.store, lineage)
        if isinstance(exc, OrchestratorError):
            raise
        raise OrchestratorError(f"training run {plan.run_id} failed: {str(exc).splitlines()[0][:500]}",
                                user_fault=False) from exc
    if result.checkpoint is not None:  # the full history travels in the last checkpoint
        from orchestrator.train.loops import _load_history

        with result.checkpoint.as_directory() as d:
            lineage.metrics = [{k: _plain(v) for k, v in m.items()} for m in _load_history(d)]
    lineage.checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    lineage.status, lineage.finished_at = "finished", now()
    write_lineage(plan.store, lineage)
    return lineage


def _plain(v: Any) -> Any:
    try:
        return v.item()  # numpy scalar
    except AttributeError:
        return v
