"""A dataset version as a Python object: pinned on open, so every read sees the same rows."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from orchestrator.manifest import LabelMap, Snapshot, VersionInfo
from orchestrator.query.compile import CompiledQuery, QueryContext, combine, compile_query
from orchestrator.scan import ScanStats, scan, sum_labels

if TYPE_CHECKING:
    from orchestrator.store import Store


class Dataset:
    """One version of a dataset, optionally sliced by a query.

    ``store.dataset(name)`` pins the latest version at open time; later commits do not change
    what this object reads. ``slice`` is lazy: it type-checks the query at once (a bad query
    fails before anything is read) and scans only when rows are needed.
    """

    def __init__(
        self, store: "Store", name: str, version: int | None = None, *, _snapshot: Snapshot | None = None,
        _queries: tuple[str, ...] = (),
    ) -> None:
        self.store = store
        self.name = name
        self._snapshot: Snapshot = _snapshot or store.manifest(name).snapshot(version)
        self._queries = _queries
        self._query: CompiledQuery | None = (
            compile_query(combine(list(_queries)), QueryContext(self._snapshot.label_map.names))
            if _queries else None
        )
        self._len: int | None = None if _queries else self._snapshot.rows
        self.last_scan: ScanStats | None = None

    @property
    def version(self) -> int:
        return self._snapshot.version

    @property
    def query(self) -> str | None:
        """The slice as one query text (chained slices joined with ``and``), or None."""
        return combine(list(self._queries)) if self._queries else None

    @property
    def label_map(self) -> LabelMap:
        """Stable label ids: the same name has the same id in every version."""
        return self._snapshot.label_map

    def slice(self, query: str) -> "Dataset":
        """Items of this dataset (and of any earlier slice) that match ``query``.

        ``ds.slice(a).slice(b)`` means both. Raises ``QueryError`` with a caret at once.
        """
        return Dataset(
            self.store, self.name, _snapshot=self._snapshot, _queries=(*self._queries, query)
        )

    def manifest_rows(self, columns: list[str] | None = None) -> pa.Table:
        """The manifest rows of this slice (only ``columns`` if given); records ``last_scan``."""
        table, self.last_scan = scan(self.store, self._snapshot, self._query, columns)
        self._len = table.num_rows
        return table

    def item_ids(self) -> list[str]:
        """Ids of the items in this slice, sorted."""
        ids = self.manifest_rows(["item_id"]).column("item_id")
        return sorted(ids.to_pylist())

    def __len__(self) -> int:
        """Item count: from the Delta log for a whole version; for a slice, a scan of the
        manifest columns the query needs (no blob is fetched)."""
        if self._len is None:
            self.manifest_rows(["item_id"])
        return self._len  # type: ignore[return-value]

    def versions(self) -> list[VersionInfo]:
        """Every committed version of this dataset, oldest first."""
        return self.store.versions(self.name)

    def label_counts(self) -> dict[str, int]:
        """Instances per label in this version or slice."""
        names = self.label_map.names
        return sum_labels(self.manifest_rows(["labels"]) if names else pa.table({}), names)

    def __repr__(self) -> str:
        q = f", query={self.query!r}" if self._queries else ""
        return f"Dataset({self.name!r}, version={self.version}{q}, store={self.store.uri!r})"
