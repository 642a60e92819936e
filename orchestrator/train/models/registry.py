"""The model interface: a model is a function ``build(ctx: ModelContext) -> ModelSpec``.

``model.name`` in a run config names one: a built-in (``detector``, ``counter``) or any function
reachable by an import path, ``"package.module:function"``. The built-in models are written
against the same interface (``detector`` and ``counter`` below), so a user model gets exactly
what they get and nothing more.

What the function receives (:class:`ModelContext`): the framework it must build for, the
number of classes and their names in label-id order (the dataset's label map), the image size
and box padding of the batches, ``model.params`` from the config, and the whole resolved config.

What it returns (:class:`ModelSpec`): the model, built (a ``torch.nn.Module``, or an uncompiled
``keras.Model`` created now, so that it lands in the caller's distribution scope), and the
functions the training loops call on it; see :mod:`orchestrator.train.models` for the batch
layout and each function's signature. It is called once per model instance a worker needs
(TensorFlow: once inside ``MultiWorkerMirroredStrategy``'s scope, once more on rank 0 for the
evaluation copy), so it must build a fresh model each call.

Import paths are resolved on the driver before Ray starts (an unknown module or function fails
the run there, naming it), and the folder the module was found in travels with the run so
workers on the same machine (or a shared filesystem) import it the same way; on a remote
cluster, ship it in the job's working directory (``ray job submit --working-dir``) or install it.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from orchestrator.errors import ConfigError

FRAMEWORKS = ("torch", "tensorflow")
TASKS = ("detection", "counting", "custom")
#: ``package.module:function``
IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


@dataclass(frozen=True)
class ModelContext:
    """What a model function receives."""

    framework: Literal["torch", "tensorflow"]
    num_classes: int
    label_names: tuple[str, ...] = ()  # index = label id, as in the batches' ``labels``
    image_size: int = 128  # batches' images are [B, image_size, image_size, 3] uint8
    max_boxes: int = 32  # boxes and labels are padded to this many per image
    params: dict[str, Any] = field(default_factory=dict)  # the config's ``model.params``
    config: dict[str, Any] = field(default_factory=dict)  # the whole resolved run config


@dataclass(frozen=True)
class ModelSpec:
    """What a model function returns (see :mod:`orchestrator.train.models` for the signatures).

    ``task`` picks the validation metric: ``detection`` (mAP@0.5 from ``predict``'s boxes),
    ``counting`` (count MAE from ``predict``'s counts) or ``custom`` (``metrics(model_out,
    batch) -> {name: float}``, averaged over validation batches weighted by their size).
    ``targets`` is required for TensorFlow (``fit`` takes ``(inputs, targets)`` pairs)."""

    name: str
    framework: Literal["torch", "tensorflow"]
    task: Literal["detection", "counting", "custom"]
    model: Any
    inputs: Callable[[Any], Any]
    loss: Callable[[Any, Any], Any]
    predict: Callable[..., Any] | None = None
    targets: Callable[[Any, Any], Any] | None = None
    metrics: Callable[[Any, Any], dict[str, float]] | None = None


def detector(ctx: ModelContext) -> ModelSpec:
    """The built-in CenterNet-style detector (``params``: ``width``, ``stride`` 4|8)."""
    if ctx.framework == "torch":
        import orchestrator.train.models.torch_detector as t

        return ModelSpec("detector", "torch", "detection", t.build(ctx.num_classes, **ctx.params),
                         t.inputs, t.loss, t.predict)
    import orchestrator.train.models.keras_detector as k

    return ModelSpec("detector", "tensorflow", "detection",
                     k.build(ctx.num_classes, **{**ctx.params, "image_size": ctx.image_size}),
                     k.inputs, k.loss_fn, k.predict_boxes, k.targets)


def counter(ctx: ModelContext) -> ModelSpec:
    """The built-in multi-label counting baseline (``params``: ``width``)."""
    import orchestrator.train.models.counting as c

    if ctx.framework == "torch":
        return ModelSpec("counter", "torch", "counting", c.build_torch(ctx.num_classes, **ctx.params),
                         c.torch_inputs, c.torch_loss, c.torch_predict)
    return ModelSpec("counter", "tensorflow", "counting",
                     c.build_keras(ctx.num_classes, **{**ctx.params, "image_size": ctx.image_size}),
                     c.keras_inputs, c.keras_loss, c.keras_predict, c.keras_targets)


#: The built-in models by config name.
MODELS: dict[str, Callable[[ModelContext], ModelSpec]] = {"detector": detector, "counter": counter}


def valid_model_name(name: str) -> bool:
    return name in MODELS or bool(IMPORT_PATH.match(name))


def model_function(name: str) -> Callable[[ModelContext], ModelSpec]:
    """The function ``model.name`` names; ``ConfigError`` naming what is wrong otherwise."""
    if name in MODELS:
        return MODELS[name]
    if not IMPORT_PATH.match(name):
        raise ConfigError(f"model.name {name!r} is neither a built-in model ({', '.join(sorted(MODELS))}) "
                          "nor an import path", hint='write "package.module:function"')
    module_name, function_name = name.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"model.name {name!r}: cannot import {module_name!r} ({exc})",
                          hint="make the module importable here (install it, or run from the folder "
                               "that holds it, or add that folder to PYTHONPATH)") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing
        raise ConfigError(f"model.name {name!r}: importing {module_name!r} failed: "
                          f"{type(exc).__name__}: {exc}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"model.name {name!r}: {module_name!r} has no function {function_name!r}",
                          hint="define `def " + function_name + "(ctx: ModelContext) -> ModelSpec` there")
    return function


def import_root(name: str) -> str | None:
    """The ``sys.path`` folder the module of an import path was found in (None for a built-in
    or an installed module): workers put it on their path before importing (``ensure_importable``)."""
    if name in MODELS:
        return None
    module = sys.modules.get(name.split(":")[0]) or importlib.import_module(name.split(":")[0])
    origin = getattr(module, "__file__", None)
    if not origin:
        return None
    path = Path(origin).resolve()
    depth = name.split(":")[0].count(".") + (2 if path.name == "__init__.py" else 1)
    root = path.parents[depth - 1]
    if any(part in ("site-packages", "dist-packages") for part in root.parts):
        return None
    return str(root)


def ensure_importable(root: str | None) -> None:
    """In a worker: put the driver's folder for a model's module on the path, if it exists here."""
    if root and root not in sys.path and Path(root).is_dir():
        sys.path.insert(0, root)


def build_model(name: str, ctx: ModelContext) -> ModelSpec:
    """Call the model function ``name`` with ``ctx`` and check what it returned."""
    spec = model_function(name)(ctx)
    where = f"model {name!r} ({ctx.framework})"
    if not isinstance(spec, ModelSpec):
        raise ConfigError(f"{where} returned {type(spec).__name__}, not a ModelSpec",
                          hint="return orchestrator.train.models.ModelSpec(...)")
    if spec.framework != ctx.framework:
        raise ConfigError(f"{where} built a {spec.framework} model for a {ctx.framework} run")
    if spec.task not in TASKS:
        raise ConfigError(f"{where}: task {spec.task!r} is not one of {', '.join(TASKS)}")
    if spec.task == "custom" and spec.metrics is None:
        raise ConfigError(f"{where}: a custom task needs metrics(model_out, batch) -> {{name: value}}")
    if spec.task != "custom" and spec.predict is None:
        raise ConfigError(f"{where}: task {spec.task!r} needs predict(model_out, ...)")
    if ctx.framework == "tensorflow" and spec.targets is None:
        raise ConfigError(f"{where}: a TensorFlow model needs targets(batch, model) -> y_true")
    return spec


def get_model(name: str, framework: str, num_classes: int = 1, **context: Any) -> ModelSpec:
    """``build_model`` with a context made of keywords (tests, notebooks): e.g.
    ``get_model("detector", "torch", 3, params={"width": 8})``."""
    if framework not in FRAMEWORKS:
        raise ConfigError(f"unknown framework {framework!r}; choose from {', '.join(FRAMEWORKS)}")
    return build_model(name, ModelContext(framework, num_classes, **context))  # type: ignore[arg-type]
