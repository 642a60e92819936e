"""Where each item of a (sliced) version lives: file and row, without holding the rows.

``build_index`` reads only the columns the slice needs through the one manifest reader
(``scan.read_rows`` with row numbers; files the Delta statistics rule out are skipped), and keeps
two integer arrays: 12 bytes an item, so a 1M-item dataset indexes in ~12 MB. ``RowReader``
fetches full rows on demand, one Parquet row group at a time (``manifest.ROW_GROUP_ROWS`` rows,
held as an ``ItemBlock``), keeping the most recent within ``KEEP_ROWS_BYTES`` (so a later epoch
of a slice that fits reads no manifest bytes): ``ds[i]`` reads one row group, not the manifest.
(A manifest written before row groups were capped has one group per file; it is then held as one
block, ~1 KB a row.) ``ShippedRows`` are rows read by the Ray driver and carried in a read task.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.access.redact import redact
from orchestrator.manifest import LabelMap
from orchestrator.manifest_faults import manifest_file_errors
from orchestrator.scan import FILE_INDEX, ROW_NUMBER, with_columns
from orchestrator.storage_errors import retrying
from orchestrator.store_location import filesystem_for
from orchestrator.stream.item import ITEM_COLUMNS, ItemBlock, ItemRow
from orchestrator.stream.plan import ReadPlan


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

    def subset(self, positions: np.ndarray) -> ItemIndex:
        """The index of ``positions`` only (in that order), naming only the files they use:
        what one Ray read task needs, without the other items' 12 bytes each."""
        files = self.file_of[positions]
        used = np.unique(files)
        renumber = np.full(len(self.files), -1, dtype=np.int32)
        renumber[used] = np.arange(len(used), dtype=np.int32)
        return ItemIndex(tuple(self.files[i] for i in used), renumber[files], self.row_of[positions])


def build_index(plan: ReadPlan, keep: Callable[[list[str]], np.ndarray] | None = None) -> ItemIndex:
    """Scan the slice once (only the query's columns) and record every match's location.
    ``keep``: given the matches' item ids, a boolean mask of those to index (a train/validation
    split, one worker's shard). Transient store faults are retried under the plan's retry policy."""
    rows = plan.rows(["item_id"], row_numbers=True)
    file_of = rows.table.column(FILE_INDEX).to_numpy()
    row_of = rows.table.column(ROW_NUMBER).to_numpy()
    if keep is not None:
        mask = np.asarray(keep(rows.table.column("item_id").to_pylist()), dtype=bool)
        file_of, row_of = file_of[mask], row_of[mask]
    used = np.unique(file_of)  # files with at least one match, in path order
    renumber = np.full(len(rows.files), -1, dtype=np.int32)
    renumber[used] = np.arange(len(used), dtype=np.int32)
    return ItemIndex(tuple(rows.files[i] for i in used), renumber[file_of].astype(np.int32),
                     row_of.astype(np.int64))


#: Decoded row groups a ``RowReader`` keeps beyond its ``keep_groups``, by their Arrow bytes: a
#: slice whose rows fit (~50,000 demo rows) is read from the manifest once, not every epoch.
KEEP_ROWS_BYTES = 64 << 20


class RowReader:
    """Reads manifest rows by (file, row) through an LRU of decoded row groups: at least
    ``keep_groups`` (a shuffle window's), more while they take at most ``keep_bytes``."""

    def __init__(self, plan: ReadPlan, index: ItemIndex, keep_groups: int = 4,
                 keep_bytes: int = KEEP_ROWS_BYTES) -> None:
        self.plan = plan
        self.index = index
        self.keep_groups = keep_groups
        self.keep_bytes = keep_bytes
        self._bounds: dict[int, np.ndarray] = {}  # file -> cumulative row-group starts
        self._groups: OrderedDict[tuple[int, int], tuple[ItemBlock, int]] = OrderedDict()
        self._held = 0  # Arrow bytes of the kept groups

    def __getstate__(self) -> dict:
        return {"plan": self.plan, "index": self.index, "keep_groups": self.keep_groups,
                "keep_bytes": self.keep_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def _file(self, file_idx: int) -> pq.ParquetFile:
        path = self.index.files[file_idx]
        location = self.plan.location
        with manifest_file_errors(location, [path]):
            return retrying(lambda: pq.ParquetFile(filesystem_for(location).open_input_file(path)),
                            location=location, action="open manifest file",
                            target=path.rsplit("/", 1)[-1], policy=self.plan.retry)

    def bounds(self, file_idx: int) -> np.ndarray:
        """Cumulative row counts of a file's row groups: ``[0, n0, n0 + n1, ...]``."""
        bounds = self._bounds.get(file_idx)
        if bounds is None:
            meta = self._file(file_idx).metadata
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            bounds = np.concatenate([[0], np.cumsum(sizes)])
            self._bounds[file_idx] = bounds
        return bounds

    def locate(self, file_idx: int, row: int) -> tuple[int, int]:
        """(row group, row within it) for a row of a file."""
        bounds = self.bounds(file_idx)
        group = int(np.searchsorted(bounds, row, side="right") - 1)
        return group, int(row - bounds[group])

    def group_block(self, file_idx: int, group: int) -> ItemBlock:
        """One row group as an ``ItemBlock`` (redacted for the plan's access view first): its
        rows' fetch fields and columnar annotations, ~1.1 KB a row of demo data (the Arrow
        rows take ~1.3 KB, Python dicts ~15 KB). Built once per group while the group is kept, so
        ``ds[i]`` and a shuffled pass, which visit a group's rows in scattered order, convert
        each group once."""
        key = (file_idx, group)
        kept = self._groups.get(key)
        if kept is not None:
            self._groups.move_to_end(key)
            return kept[0]
        table = self._read_group(file_idx, group)
        block = ItemBlock(table, self.plan.label_map)
        self._groups[key] = (block, table.nbytes)
        self._held += table.nbytes
        while len(self._groups) > self.keep_groups and self._held > self.keep_bytes:
            self._held -= self._groups.popitem(last=False)[1][1]
        return block

    def _read_group(self, file_idx: int, group: int) -> pa.Table:
        """One row group's ``ITEM_COLUMNS``, redacted for the plan's access view."""
        path = self.index.files[file_idx]
        location = self.plan.location

        def read() -> pa.Table:
            f = self._file(file_idx)
            present = [c for c in ITEM_COLUMNS if c in f.schema_arrow.names]
            return with_columns(f.read_row_group(group, columns=present), ITEM_COLUMNS)

        with manifest_file_errors(location, [path]):
            return redact(retrying(read, location=location, action="read manifest file",
                                   target=path.rsplit("/", 1)[-1], policy=self.plan.retry), self.plan.access)

    def _by_group(self, positions: np.ndarray) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """``positions`` grouped by row group: (file, group, indices into ``positions``, rows
        within the group), each group once."""
        positions = np.asarray(positions, dtype=np.int64)
        files = self.index.file_of[positions]
        rows = self.index.row_of[positions]
        for f in np.unique(files):
            sel = np.flatnonzero(files == f)
            bounds = self.bounds(int(f))
            groups = np.searchsorted(bounds, rows[sel], side="right") - 1
            for g in np.unique(groups):
                members = sel[groups == g]
                yield int(f), int(g), members, rows[members] - bounds[g]

    def table(self, positions: np.ndarray) -> pa.Table:
        """The rows of ``positions`` as one Arrow table, in that order (redacted), read a row
        group at a time and not kept: what the Ray driver ships inside read tasks."""
        parts: list[pa.Table] = []
        order: list[np.ndarray] = []
        for f, g, members, offsets in self._by_group(positions):
            parts.append(self._read_group(f, g).take(pa.array(offsets)))
            order.append(members)
        if not parts:
            return with_columns(pa.table({}), ITEM_COLUMNS).slice(0, 0)
        table = pa.concat_tables(parts).combine_chunks()
        return table.take(pa.array(np.argsort(np.concatenate(order), kind="stable")))

    def stats(self) -> dict[str, int]:
        """What this reader holds: the row groups of the files it opened (count, largest) and
        the groups it keeps decoded now (count, rows). Memory is bounded by ``keep_bytes`` (or
        ``keep_groups``, if more)."""
        sizes = [int(n) for b in self._bounds.values() for n in (b[1:] - b[:-1])]
        return {"row_groups": len(sizes), "rows_per_group_max": max(sizes, default=0),
                "row_groups_kept": len(self._groups),
                "rows_kept": sum(len(b) for b, _ in self._groups.values())}

    def row(self, position: int) -> ItemRow:
        """The row at ``position``."""
        f = int(self.index.file_of[position])
        group, offset = self.locate(f, int(self.index.row_of[position]))
        return self.group_block(f, group).row(offset)

    def rows(self, positions: np.ndarray) -> list[ItemRow]:
        """The rows of ``positions``, in that order, a row group at a time (each group's block is
        built once while it is kept: converting rows one by one took nearly half of a warm
        pass's main thread)."""
        out: list[ItemRow | None] = [None] * len(positions)
        for f, g, members, offsets in self._by_group(positions):
            block = self.group_block(f, g)
            for i, k in zip(members.tolist(), offsets.tolist(), strict=True):
                out[i] = block.row(k)
        return out  # type: ignore[return-value]


class ShippedRows:
    """Manifest rows read elsewhere (the Ray driver) and handed over with their positions: row
    ``i`` of ``table`` is position ``i``. A read task built on it opens no manifest file, so a
    warm epoch through Ray reads nothing from the store (``adapters.ray``)."""

    def __init__(self, table: pa.Table, label_map: LabelMap) -> None:
        self.block = ItemBlock(table, label_map)

    def row(self, position: int) -> ItemRow:
        return self.block.row(int(position))

    def rows(self, positions: np.ndarray) -> list[ItemRow]:
        return [self.block.row(k) for k in np.asarray(positions, dtype=np.int64).tolist()]
