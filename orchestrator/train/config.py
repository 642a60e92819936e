"""The run configuration: one YAML file, mapped 1:1 onto these pydantic models.

A bad file fails before Ray starts, with the key path and what is allowed, e.g.
``configs/x.yaml: train.epochs: must be >= 1 (got 0)``. ``--set train.epochs=3`` overrides a key
(the value is parsed as YAML, so numbers, booleans and lists work).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.errors import ConfigError
from orchestrator.yaml_docs import load_mapping, validation_message


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitSettings(_Strict):
    """Train/validation split by a deterministic hash of ``item_id`` (stable across versions:
    an item never moves between splits)."""

    validation_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="share of items held out for validation")
    seed: int = Field(0, description="seed of the hash that assigns items to a side")


class ModelSettings(_Strict):
    name: str = Field("detector", description='a built-in model (detector, counter) or your own, '
                                              '"package.module:function" (train/models/registry.py)')
    image_size: int = Field(128, ge=32, le=1024, multiple_of=8,
                            description="images are decoded straight to this square size (boxes scaled with them)")
    max_boxes: int = Field(32, ge=1, le=512, description="boxes per image the model sees (padded or cut to it)")
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="passed to the model's build function as ctx.params")


    @field_validator("name")
    @classmethod
    def _model_name(cls, v: str) -> str:
        from orchestrator.train.models.registry import MODELS, valid_model_name

        if not valid_model_name(v):
            raise ValueError(f"must be a built-in model ({', '.join(sorted(MODELS))}) or "
                             '"package.module:function"')
        return v


class TrainLoopSettings(_Strict):
    epochs: int = Field(3, ge=1, description="epochs in all; a --resume may raise it with --set train.epochs=N")
    batch_size: int = Field(16, ge=1, description="items per step on each worker")
    learning_rate: float = Field(1e-3, gt=0, description="the optimizer's learning rate")
    seed: int = Field(0, description="seed of the model's initialisation (torch.manual_seed, tf.random.set_seed)")


class ScalingSettings(_Strict):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (each gets its own shard of the data)")
    cpus_per_worker: float = Field(1.0, gt=0, description="logical CPUs each worker reserves")
    use_gpu: bool = Field(False, description="one GPU per worker")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how Ray places the workers' resource bundles on nodes")
    schedule_timeout_s: float = Field(
        900.0, gt=0, le=7 * 24 * 3600,
        description="seconds the worker group may wait to be placed and started (at the start "
                    "and after a restart) before the run fails, naming what it asked for and "
                    "what the cluster has; long enough for an autoscaler's cold start")


class DataSettings(_Strict):
    prefetch_batches: int = Field(2, ge=0, description="batches each worker's pipeline prepares ahead")
    memory_cache_mb: int = Field(256, ge=1, description="each process's in-memory blob cache")
    disk_cache_mb: int | None = Field(
        None, ge=0, description="the node's shared disk cache (stream.cache): None: on, with the default "
                                "budget (ORCHESTRATOR_CACHE_GB or 10% of free space); 0: off; else its budget in MB")
    decode_concurrency: int = Field(2, ge=1, description="max concurrent read tasks (fetch+decode) per pipeline")
    retry_deadline_s: float | None = Field(
        None, ge=0, description="seconds to wait for a store that does not answer before the run "
                                "fails (default: the store URI's retry_deadline, else 120)")


class CheckpointSettings(_Strict):
    path: str | None = Field(None, description="default: <store>/runs")
    every_epochs: int = Field(1, ge=1, description="a checkpoint every N epochs")
    every_steps: int | None = Field(
        None, ge=1, description="also checkpoint every N steps inside an epoch, with the data position: "
        "a run killed mid-epoch resumes with exactly the items the epoch had not trained (train.position)")
    keep: int = Field(2, ge=1, description="checkpoints kept (the oldest are deleted)")
    max_failures: int = Field(2, ge=0, description="worker failures to recover from")


class RunSettings(_Strict):
    store: str
    dataset: str
    version: int | Literal["latest"] = "latest"
    query: str | None = None
    framework: Literal["torch", "tensorflow"] = "torch"
    split: SplitSettings = Field(default_factory=SplitSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    train: TrainLoopSettings = Field(default_factory=TrainLoopSettings)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    checkpoint: CheckpointSettings = Field(default_factory=CheckpointSettings)

    @field_validator("version")
    @classmethod
    def _non_negative(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError("must be >= 0 or 'latest'")
        return v


def _apply_override(doc: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r} is not KEY=VALUE", hint="e.g. --set train.epochs=3")
    key, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    parts = key.strip().split(".")
    node = doc
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
    node[parts[-1]] = value


def store_uri(value: Any, base: Path) -> Any:
    """A config's ``store``: a URI as given, or a path (relative to ``base``) as a ``file://``
    URI. Why paths: the shipped configs name the quickstart's store next to them
    (``../.demo/store``), so they run as-is after it from any working directory."""
    if not isinstance(value, str) or "://" in value or not value.strip():
        return value
    return f"file://{(base / value.strip()).resolve()}"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                doc: dict | None = None, store: str | None = None) -> RunSettings:
    """Read, override and validate a run config; every problem is a ``ConfigError``.

    The store, highest precedence first: ``--set store=...`` in ``overrides``, ``store`` (the
    CLI's ``--store``, else ``$ORCHESTRATOR_STORE``), the config's own ``store:``. A relative
    path in the config is relative to the config file; given otherwise, to the working directory."""
    source = str(path) if path is not None else "config"
    if doc is None:
        try:
            text = Path(path).read_text()  # type: ignore[arg-type]
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        doc = load_mapping(text, source, "store, dataset, train, ...")
    if not isinstance(doc, dict):
        raise ConfigError(f"{source} must be a mapping of keys (store, dataset, train, ...)")
    doc = yaml.safe_load(yaml.safe_dump(doc))  # deep copy
    if "store" in doc:
        doc["store"] = store_uri(doc["store"], Path(path).resolve().parent if path is not None else Path.cwd())
    if store:
        doc["store"] = store_uri(store, Path.cwd())
    for assignment in overrides:
        _apply_override(doc, assignment)
    if "store" in doc:
        doc["store"] = store_uri(doc["store"], Path.cwd())
    else:
        raise ConfigError(f"{source} names no store",
                          hint="add `store: file:///abs/path` (or s3://bucket/prefix) to the config, "
                               "or pass --store URI or set ORCHESTRATOR_STORE")
    try:
        return RunSettings.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, f"{source} is not a valid run config"),
                          hint="see docs/reference/config.md (every key, its default and range)") from None
