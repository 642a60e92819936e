"""Read a pinned manifest version with pyarrow, straight from its Parquet files.

The Delta log says which files make up a version; pyarrow reads them through the store's own
filesystem: files are skipped by the Delta log's statistics, numeric filters and column
projection push down into the Parquet scan (row groups skipped by their statistics), and the
exact predicate runs on what is left. Text predicates are not pushed down: delta-rs rewrites files
with ``string_view`` columns and pyarrow 26 cannot compare those with ``string`` statistics.
deltalake's own pyarrow bridge is not used: its Rust-backed file handles can abort the
interpreter at exit.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from orchestrator.manifest import FileStats, Snapshot
from orchestrator.manifest_faults import manifest_file_errors
from orchestrator.query.compile import CompiledQuery
from orchestrator.storage_errors import retrying

if TYPE_CHECKING:
    from orchestrator.store import Store


def manifest_dataset(
    store: Store, snapshot: Snapshot, files: Sequence[str] | None = None
) -> pads.Dataset:
    """A pyarrow dataset over the files of ``snapshot`` (or a subset), with its full schema."""
    paths = list(snapshot.files if files is None else files)
    with manifest_file_errors(store, paths, snapshot.dataset):
        return pads.dataset(paths, schema=snapshot.schema, format="parquet", filesystem=store.fs)


@dataclass(frozen=True)
class ScanStats:
    """What a scan touched: how much the Delta statistics and the Parquet pushdown saved."""

    files_total: int
    files_read: int  # files not ruled out by their Delta statistics
    rows_total: int
    rows_in_files_read: int  # rows of the files opened (before row-group and row filtering)
    rows_after_pushdown: int  # rows the Parquet scan returned with the numeric pushdown
    rows_matched: int
    columns: tuple[str, ...]
    seconds: float

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def candidate_files(snapshot: Snapshot, query: CompiledQuery | None) -> list[tuple[str, FileStats]]:
    """Files of ``snapshot`` (sorted by path) that the Delta statistics do not rule out."""
    return sorted(
        ((f, st) for f, st in zip(snapshot.files, snapshot.file_stats, strict=True)
         if query is None or query.file_may_match(st)),
        key=lambda pair: pair[0],
    )


def scan(
    store: Store,
    snapshot: Snapshot,
    query: CompiledQuery | None = None,
    columns: Sequence[str] | None = None,
) -> tuple[pa.Table, ScanStats]:
    """Rows of ``snapshot`` matching ``query``, with ``columns`` (default: all).

    Files whose Delta statistics rule out a match are never opened; the numeric part of the
    query is pushed into the Parquet scan (row groups skipped by their statistics); only the
    columns needed are read; the exact predicate is applied last.
    """
    started = time.perf_counter()
    wanted = list(columns) if columns is not None else list(snapshot.schema.names)
    kept = candidate_files(snapshot, query)
    files = [f for f, _ in kept]
    read_cols = wanted
    if query is not None:
        read_cols = sorted(set(wanted) | set(query.columns), key=snapshot.schema.names.index)
    if files:
        dataset = manifest_dataset(store, snapshot, files)
        with manifest_file_errors(store, files, snapshot.dataset):
            table = retrying(
                lambda: dataset.to_table(
                    columns=read_cols, filter=query.pushdown if query is not None else None),
                location=store.location, action="read the manifest of dataset",
                target=repr(snapshot.dataset))
        table = fill_label_counts(table)
    else:
        table = snapshot.schema.empty_table().select(read_cols)
    rows_read = table.num_rows
    if query is not None:
        table = table.filter(query.evaluate(table))
    stats = ScanStats(
        files_total=len(snapshot.files), files_read=len(files), rows_total=snapshot.rows,
        rows_in_files_read=sum(st.num_records for _, st in kept),
        rows_after_pushdown=rows_read, rows_matched=table.num_rows, columns=tuple(read_cols),
        seconds=time.perf_counter() - started,
    )
    return table.select(wanted), stats


def fill_label_counts(table: pa.Table) -> pa.Table:
    """Null label counts (labels added after the row was written) read as 0."""
    if "labels" not in table.column_names:
        return table
    col = table.column("labels").combine_chunks()
    struct_type = col.type
    children = [pc.fill_null(col.field(i), 0) for i in range(struct_type.num_fields)]
    filled = pa.StructArray.from_arrays(children, fields=list(struct_type))
    return table.set_column(table.column_names.index("labels"), "labels", filled)


def read_table(store: Store, snapshot: Snapshot, columns: Sequence[str] | None = None) -> pa.Table:
    """Every row of a version (optionally only some columns) in memory."""
    return scan(store, snapshot, None, columns)[0]


def existing_item_ids(store: Store, dataset: str, item_ids: Sequence[str]) -> set[str]:
    """Which of ``item_ids`` are in the latest version (reads only the item_id column).

    The membership test runs after the read: delta-rs rewrites files with ``string_view``
    columns, and pyarrow 26 cannot push a string filter into a mix of string and string_view
    files ("no kernel matching input types (string, string_view)").
    """
    snapshot = store.manifest(dataset).snapshot()
    ids = read_table(store, snapshot, ["item_id"]).column("item_id")
    mask = pc.is_in(ids, value_set=pa.array(list(item_ids), pa.string()))
    return set(ids.filter(mask).to_pylist())


def sum_labels(table: pa.Table, names: Sequence[str]) -> dict[str, int]:
    """Instances per label over the ``labels`` column of ``table``, in label-id order."""
    if not names or table.num_rows == 0:
        return {name: 0 for name in names}
    col = table.column("labels").combine_chunks()
    return {name: int(pc.sum(col.field(i)).as_py() or 0) for i, name in enumerate(names)}


def label_totals(store: Store, snapshot: Snapshot) -> dict[str, int]:
    """Instances per label over a whole version (reads one column)."""
    names = snapshot.label_map.names
    return sum_labels(read_table(store, snapshot, ["labels"]) if names else pa.table({}), names)
