"""Optional frameworks: import them on demand, and say which extra to install when missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from orchestrator.errors import ConfigError

EXTRAS = {
    "torch": "pip install -e '.[torch]' (torch==2.13.0, the CPU wheel)",
    "tensorflow": "pip install -e '.[tf]' (tensorflow 2.21 + tf-keras)",
}


def require(module: str) -> ModuleType:
    """Import ``module`` or raise ``ConfigError`` naming the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise ConfigError(f"{top} is not installed", hint=EXTRAS.get(top, f"pip install {top}")) from exc
