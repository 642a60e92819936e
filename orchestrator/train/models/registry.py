"""The model registry: :class:`ModelSpec`, ``MODELS`` and :func:`get_model`.

Import them from :mod:`orchestrator.train.models` (whose docstring describes the fields), which
re-exports them from here. The registry lives outside the package ``__init__`` so that the imports
form no cycle: ``__init__`` imports this module, these loaders import a model module on first
call (so a framework is imported only when a model of it is asked for), and the model modules
import :mod:`orchestrator.train.models.centernet` directly, never the package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

FRAMEWORKS = ("torch", "tensorflow")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    framework: Literal["torch", "tensorflow"]
    task: Literal["detection", "counting"]
    build: Callable[..., Any]
    inputs: Callable[[Any], Any]
    loss: Callable[[Any, Any], Any]
    predict: Callable[..., Any]
    targets: Callable[[Any, Any], Any] | None = None


def _detector_torch() -> ModelSpec:
    import orchestrator.train.models.torch_detector as m

    return ModelSpec("detector", "torch", "detection", m.build, m.inputs, m.loss, m.predict)


def _detector_tensorflow() -> ModelSpec:
    import orchestrator.train.models.keras_detector as m

    return ModelSpec("detector", "tensorflow", "detection", m.build, m.inputs, m.loss_fn, m.predict_boxes, m.targets)


def _counter_torch() -> ModelSpec:
    import orchestrator.train.models.counting as m

    return ModelSpec("counter", "torch", "counting", m.build_torch, m.torch_inputs, m.torch_loss, m.torch_predict)


def _counter_tensorflow() -> ModelSpec:
    import orchestrator.train.models.counting as m

    return ModelSpec(
        "counter", "tensorflow", "counting", m.build_keras, m.keras_inputs, m.keras_loss, m.keras_predict,
        m.keras_targets,
    )


# name -> framework -> loader (imports that framework on first call)
MODELS: dict[str, dict[str, Callable[[], ModelSpec]]] = {
    "detector": {"torch": _detector_torch, "tensorflow": _detector_tensorflow},
    "counter": {"torch": _counter_torch, "tensorflow": _counter_tensorflow},
}


def get_model(name: str, framework: str) -> ModelSpec:
    """The :class:`ModelSpec` for config ``model.name`` and ``framework``; ValueError names the
    choices when either is unknown."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    if framework not in MODELS[name]:
        raise ValueError(f"unknown framework {framework!r} for model {name!r}; choose from {sorted(MODELS[name])}")
    return MODELS[name][framework]()
