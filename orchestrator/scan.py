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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from orchestrator.access.policy import ReadView
from orchestrator.access.redact import redact
from orchestrator.manifest import FileStats, Manifest, Snapshot, base_field
from orchestrator.manifest_faults import manifest_file_errors
from orchestrator.query.compile import CompiledQuery
from orchestrator.retry import RetryPolicy
from orchestrator.storage_errors import retrying
from orchestrator.store_location import StoreLocation, filesystem_for


def manifest_dataset(
    location: StoreLocation, snapshot: Snapshot, files: Sequence[str] | None = None
) -> pads.Dataset:
    """A pyarrow dataset over the files of ``snapshot`` (or a subset), with its full schema."""
    paths = list(snapshot.files if files is None else files)
    with manifest_file_errors(location, paths, snapshot.dataset):
        return pads.dataset(paths, schema=snapshot.schema, format="parquet",
                            filesystem=filesystem_for(location))


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


#: Columns ``read_rows(..., row_numbers=True)`` adds: the index of the row's file in
#: ``ManifestRows.files`` and the row's number within that file.
FILE_INDEX, ROW_NUMBER = "__file", "__row"


@dataclass(frozen=True)
class ManifestRows:
    """Rows of a slice as one Arrow table, the files they were read from, and what it cost."""

    table: pa.Table
    files: tuple[str, ...]
    stats: ScanStats


def candidate_files(snapshot: Snapshot, query: CompiledQuery | None) -> list[tuple[str, FileStats]]:
    """Files of ``snapshot`` (sorted by path) that the Delta statistics do not rule out."""
    return sorted(
        ((f, st) for f, st in zip(snapshot.files, snapshot.file_stats, strict=True)
         if query is None or query.file_may_match(st)),
        key=lambda pair: pair[0],
    )


def read_rows(
    location: StoreLocation,
    snapshot: Snapshot,
    query: CompiledQuery | None = None,
    columns: Sequence[str] | None = None,
    *,
    files: Sequence[str] | None = None,
    access: ReadView | None = None,
    retry: RetryPolicy | None = None,
    row_numbers: bool = False,
) -> ManifestRows:
    """The one manifest reader: rows of ``snapshot`` matching ``query``, with ``columns``
    (default: all), as the principal's ``access`` view shows them.

    Every read of manifest rows goes through here (``Dataset.manifest_rows``, the item index of
    ``ds[i]`` and iteration, the Ray scan stage, verify): files whose Delta statistics rule out a
    match are never opened (``files`` narrows the candidates further: one Ray read task's file);
    the numeric part of the query is pushed into the Parquet scan (row groups skipped by their
    statistics); only the columns needed are read; null label counts read as 0; the exact
    predicate is applied last, then hidden fields are removed. With ``row_numbers`` each row
    also carries ``FILE_INDEX`` (into ``ManifestRows.files``) and ``ROW_NUMBER`` (in its file);
    row groups are then not skipped, since that would renumber rows. Transient store faults
    are retried under ``retry`` (default: the location's policy); a damaged manifest file is
    named with its fix.
    """
    started = time.perf_counter()
    wanted = list(columns) if columns is not None else list(snapshot.schema.names)
    # A column this version predates (``pack`` in a store written before packs) reads as nulls.
    absent = [c for c in wanted if c not in snapshot.schema.names]
    wanted = [c for c in wanted if c not in absent]
    kept = candidate_files(snapshot, query)
    if files is not None:
        only = set(files)
        kept = [(f, st) for f, st in kept if f in only]
    paths = [f for f, _ in kept]
    read_cols = wanted
    if query is not None:
        read_cols = sorted(set(wanted) | set(query.columns), key=snapshot.schema.names.index)

    def read(some: list[str], pushdown: bool) -> pa.Table:
        dataset = manifest_dataset(location, snapshot, some)
        with manifest_file_errors(location, some, snapshot.dataset):
            return retrying(
                lambda: dataset.to_table(
                    columns=read_cols,
                    filter=query.pushdown if (pushdown and query is not None) else None),
                location=location, action="read the manifest of dataset",
                target=repr(snapshot.dataset), policy=retry)

    extra: list[str] = []
    if not paths:
        table = snapshot.schema.empty_table().select(read_cols)
        if row_numbers:
            table = table.append_column(FILE_INDEX, pa.array([], pa.int32())).append_column(
                ROW_NUMBER, pa.array([], pa.int64()))
    elif row_numbers:
        parts = []
        for i, path in enumerate(paths):
            part = read([path], pushdown=False)
            parts.append(part.append_column(FILE_INDEX, pa.array(np.full(part.num_rows, i, np.int32)))
                         .append_column(ROW_NUMBER, pa.array(np.arange(part.num_rows, dtype=np.int64))))
        table = pa.concat_tables(parts)
    else:
        table = read(paths, pushdown=True)
    if row_numbers:
        extra = [FILE_INDEX, ROW_NUMBER]
    table = fill_label_counts(table)
    rows_read = table.num_rows
    if query is not None:
        table = table.filter(query.evaluate(table))
    stats = ScanStats(
        files_total=len(snapshot.files), files_read=len(paths), rows_total=snapshot.rows,
        rows_in_files_read=sum(st.num_records for _, st in kept),
        rows_after_pushdown=rows_read, rows_matched=table.num_rows, columns=tuple(read_cols),
        seconds=time.perf_counter() - started,
    )
    table = table.select(wanted + extra)
    if absent:
        table = with_columns(table, list(columns or []) + extra)
    return ManifestRows(redact(table, access), tuple(paths), stats)


def with_columns(table: pa.Table, columns: Sequence[str]) -> pa.Table:
    """``table`` with exactly ``columns``, in that order; a manifest column that the rows were
    written before (``pack`` in a store older than packs) is added as nulls of its type, and
    ``labels`` of a dataset that has no label yet as an empty struct."""
    for name in columns:
        if name not in table.column_names:
            field = pa.field("labels", pa.struct([])) if name == "labels" else base_field(name)
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(list(columns))


def scan(
    location: StoreLocation,
    snapshot: Snapshot,
    query: CompiledQuery | None = None,
    columns: Sequence[str] | None = None,
    *,
    access: ReadView | None = None,
    retry: RetryPolicy | None = None,
) -> tuple[pa.Table, ScanStats]:
    """``read_rows`` as (table, stats)."""
    rows = read_rows(location, snapshot, query, columns, access=access, retry=retry)
    return rows.table, rows.stats


def fill_label_counts(table: pa.Table) -> pa.Table:
    """Null label counts (labels added after the row was written) read as 0."""
    if "labels" not in table.column_names:
        return table
    col = table.column("labels").combine_chunks()
    struct_type = col.type
    children = [pc.fill_null(col.field(i), 0) for i in range(struct_type.num_fields)]
    filled = pa.StructArray.from_arrays(children, fields=list(struct_type))
    return table.set_column(table.column_names.index("labels"), "labels", filled)


def read_table(location: StoreLocation, snapshot: Snapshot, columns: Sequence[str] | None = None) -> pa.Table:
    """Every row of a version (optionally only some columns) in memory."""
    return read_rows(location, snapshot, None, columns).table


def existing_item_ids(location: StoreLocation, dataset: str, item_ids: Sequence[str]) -> set[str]:
    """Which of ``item_ids`` are in the latest version (reads only the item_id column).

    The membership test runs after the read: delta-rs rewrites files with ``string_view``
    columns, and pyarrow 26 cannot push a string filter into a mix of string and string_view
    files ("no kernel matching input types (string, string_view)").
    """
    snapshot = Manifest(location, dataset).snapshot()
    ids = read_table(location, snapshot, ["item_id"]).column("item_id")
    mask = pc.is_in(ids, value_set=pa.array(list(item_ids), pa.string()))
    return set(ids.filter(mask).to_pylist())


def sum_labels(table: pa.Table, names: Sequence[str]) -> dict[str, int]:
    """Instances per label over the ``labels`` column of ``table``, in label-id order."""
    if not names or table.num_rows == 0:
        return {name: 0 for name in names}
    col = table.column("labels").combine_chunks()
    return {name: int(pc.sum(col.field(i)).as_py() or 0) for i, name in enumerate(names)}


def label_totals(location: StoreLocation, snapshot: Snapshot) -> dict[str, int]:
    """Instances per label over a whole version (reads one column)."""
    names = snapshot.label_map.names
    return sum_labels(read_table(location, snapshot, ["labels"]) if names else pa.table({}), names)
