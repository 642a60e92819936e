"""Where each item of a (sliced) version lives: file and row, without holding the rows.

``build_index`` scans only the columns the slice needs, file by file (files the Delta statistics
rule out are skipped), and keeps two integer arrays: 12 bytes an item, so a 1M-item dataset
indexes in ~12 MB. ``RowReader`` fetches full rows on demand, one Parquet row group at a time
(``manifest.ROW_GROUP_ROWS`` rows, as Arrow), keeping the few most recent: ``ds[i]`` reads one
row group, not the manifest. (A manifest written before row groups were capped has one group
per file; it is then held as Arrow, ~1 KB a row, while that file is being read.)
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.access.policy import ReadView
from orchestrator.access.redact import redact
from orchestrator.manifest import Snapshot
from orchestrator.manifest_faults import manifest_file_errors
from orchestrator.query.compile import CompiledQuery
from orchestrator.retry import RetryPolicy
from orchestrator.scan import candidate_files, fill_label_counts, manifest_dataset
from orchestrator.storage_errors import retrying

if TYPE_CHECKING:
    from orchestrator.store import Store

#: Columns an item dict is built from (they never change type across versions).
ITEM_COLUMNS = ["item_id", "blob", "width", "height", "instances", "attributes", "tags"]


@dataclass(frozen=True)
class ItemIndex:
    """Position ``i`` of the slice is row ``row_of[i]`` of ``files[file_of[i]]``.

    Positions follow file path order, then row order: stable for a given version and query.
    """

    files: tuple[str, ...]
    file_of: np.ndarray
    row_of: np.ndarray

    def __len__(self) -> int:
        return len(self.file_of)


def build_index(store: Store, snapshot: Snapshot, query: CompiledQuery | None,
                retry: RetryPolicy | None = None) -> ItemIndex:
    """Scan the slice once (only the query's columns) and record every match's location.
    Transient store faults are retried under ``retry`` (default: the store's policy)."""
    kept = [f for f, _ in candidate_files(snapshot, query)]
    columns = query.columns if query is not None else ["item_id"]
    files, file_of, row_of = [], [], []
    for f in kept:
        table = manifest_dataset(store, snapshot, [f])
        with manifest_file_errors(store, [f], snapshot.dataset):
            rows = fill_label_counts(retrying(
                lambda: table.to_table(columns=columns),  # noqa: B023 (called within this iteration)
                location=store.location,
                action="read the manifest of dataset", target=repr(snapshot.dataset), policy=retry))
        if query is None:
            hits = np.arange(rows.num_rows, dtype=np.int64)
        else:
            hits = np.flatnonzero(query.evaluate(rows).to_numpy(zero_copy_only=False))
        if len(hits):
            file_of.append(np.full(len(hits), len(files), dtype=np.int32))
            row_of.append(hits.astype(np.int64))
            files.append(f)
    if not files:
        return ItemIndex((), np.zeros(0, np.int32), np.zeros(0, np.int64))
    return ItemIndex(tuple(files), np.concatenate(file_of), np.concatenate(row_of))


class RowReader:
    """Reads manifest rows by (file, row) through a small LRU of decoded row groups."""

    def __init__(self, store: Store, index: ItemIndex, keep_groups: int = 4,
                 access: ReadView | None = None, retry: RetryPolicy | None = None) -> None:
        self.store = store
        self.index = index
        self.keep_groups = keep_groups
        self.access = access
        self.retry = retry
        self._bounds: dict[int, np.ndarray] = {}  # file -> cumulative row-group starts
        self._groups: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()

    def __getstate__(self) -> dict:
        return {"store": self.store, "index": self.index, "keep_groups": self.keep_groups,
                "access": self.access, "retry": self.retry}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def _file(self, file_idx: int) -> pq.ParquetFile:
        path = self.index.files[file_idx]
        with manifest_file_errors(self.store, [path]):
            return retrying(lambda: pq.ParquetFile(self.store.fs.open_input_file(path)),
                            location=self.store.location, action="open manifest file",
                            target=path.rsplit("/", 1)[-1], policy=self.retry)

    def locate(self, file_idx: int, row: int) -> tuple[int, int]:
        """(row group, row within it) for a row of a file."""
        bounds = self._bounds.get(file_idx)
        if bounds is None:
            meta = self._file(file_idx).metadata
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            bounds = np.concatenate([[0], np.cumsum(sizes)])
            self._bounds[file_idx] = bounds
        group = int(np.searchsorted(bounds, row, side="right") - 1)
        return group, int(row - bounds[group])

    def group_rows(self, file_idx: int, group: int) -> pa.Table:
        """One row group as Arrow (about 1 KB a row; Python dicts would take ~15 KB)."""
        key = (file_idx, group)
        rows = self._groups.get(key)
        if rows is not None:
            self._groups.move_to_end(key)
            return rows
        path = self.index.files[file_idx]
        with manifest_file_errors(self.store, [path]):
            rows = redact(retrying(lambda: self._file(file_idx).read_row_group(group, columns=ITEM_COLUMNS),
                                   location=self.store.location, action="read manifest file",
                                   target=path.rsplit("/", 1)[-1], policy=self.retry), self.access)
        self._groups[key] = rows
        while len(self._groups) > self.keep_groups:
            self._groups.popitem(last=False)
        return rows

    def row(self, position: int) -> dict:
        f = int(self.index.file_of[position])
        group, offset = self.locate(f, int(self.index.row_of[position]))
        return self.group_rows(f, group).slice(offset, 1).to_pylist()[0]
