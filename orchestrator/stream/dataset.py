"""A dataset version as a Python object: pinned on open, so every read sees the same rows."""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.manifest import LabelMap, Snapshot, VersionInfo
from orchestrator.scan import label_totals

if TYPE_CHECKING:
    from orchestrator.store import Store


class Dataset:
    """One version of a dataset. ``store.dataset(name)`` pins the latest version at open time;
    later commits do not change what this object reads."""

    def __init__(self, store: "Store", name: str, version: int | None = None) -> None:
        self.store = store
        self.name = name
        self._snapshot: Snapshot = store.manifest(name).snapshot(version)

    @property
    def version(self) -> int:
        return self._snapshot.version

    @property
    def label_map(self) -> LabelMap:
        """Stable label ids: the same name has the same id in every version."""
        return self._snapshot.label_map

    def __len__(self) -> int:
        """Item count, from the Delta log's file statistics (no data read)."""
        return self._snapshot.rows

    def versions(self) -> list[VersionInfo]:
        """Every committed version of this dataset, oldest first."""
        return self.store.versions(self.name)

    def label_counts(self) -> dict[str, int]:
        """Instances per label in this version (reads only the ``labels`` column)."""
        return label_totals(self.store, self._snapshot)

    def __repr__(self) -> str:
        return f"Dataset({self.name!r}, version={self.version}, items={len(self)}, store={self.store.uri!r})"
