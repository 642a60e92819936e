"""orchestrator: versioned annotated training data on object storage, streamed into training.

    import orchestrator
    store = orchestrator.connect("file:///data/store")   # or "s3://bucket/prefix"
    report = store.ingest("street", coco="annotations.json", images="images/")
    ds = store.dataset("street"); ds.versions(); ds.label_counts()

``ds.plan`` is the slice's ``ReadPlan`` (picklable: what the framework adapters and Ray tasks
receive) and ``store.handle`` the store's low-level ``StoreHandle``.

The names below are imported on first use: a Ray worker or DataLoader worker that unpickles a
read plan imports the reader's modules only, not the facade, ingest and query compiler (about a
second of a fresh worker's start, which is time to a first item).

Importing the package caps glibc's heap arenas at the usable cores (``stream.memory``: a warm
pass's RSS otherwise grew ~15% over five epochs that read nothing new); it must happen before
Arrow's and Delta's threads take arenas of their own. ``MALLOC_ARENA_MAX`` in the environment
overrides it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from orchestrator.stream.memory import limit_arenas

limit_arenas()

if TYPE_CHECKING:
    from orchestrator import errors
    from orchestrator.dataset import Dataset
    from orchestrator.handle import StoreHandle
    from orchestrator.ingest.report import IngestReport
    from orchestrator.manifest import LabelMap, VersionInfo
    from orchestrator.store import Store, connect
    from orchestrator.stream.plan import ReadPlan, StreamOptions

_HOMES = {"errors": "orchestrator.errors", "Dataset": "orchestrator.dataset", "StoreHandle": "orchestrator.handle",
          "IngestReport": "orchestrator.ingest.report", "LabelMap": "orchestrator.manifest",
          "VersionInfo": "orchestrator.manifest", "Store": "orchestrator.store", "connect": "orchestrator.store",
          "ReadPlan": "orchestrator.stream.plan", "StreamOptions": "orchestrator.stream.plan"}

__all__ = ["Dataset", "IngestReport", "LabelMap", "ReadPlan", "Store", "StoreHandle", "StreamOptions",
           "VersionInfo", "connect", "errors"]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
    module = importlib.import_module(home)
    value = module if name == "errors" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
