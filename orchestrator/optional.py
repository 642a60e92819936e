"""Optional frameworks: import them on demand, and say which extra to install when missing."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Iterator
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


@contextlib.contextmanager
def native_logs_hidden() -> Iterator[None]:
    """Hide what native code writes to stderr meanwhile (fd 2), unless this process logs INFO.

    Why: importing TensorFlow writes absl/oneDNN/CUDA-stub INFO lines straight to fd 2 from
    C++ ("oneDNN custom operations are on", "Could not find cuda drivers"), which
    ``TF_CPP_MIN_LOG_LEVEL`` no longer silences in TF 2.21; ``ray.train.tensorflow`` imports it in
    the driver. Python exceptions pass through untouched; ``-v`` shows everything."""
    if logging.getLogger().isEnabledFor(logging.INFO):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)
