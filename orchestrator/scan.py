"""Read a pinned manifest version with pyarrow, straight from its Parquet files.

The Delta log says which files make up a version; pyarrow reads them through the store's own
filesystem, so filters and column projection push down into the Parquet scan (row groups are
skipped by their statistics). deltalake's own pyarrow bridge is not used: its Rust-backed file
handles can abort the interpreter at exit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from orchestrator.manifest import Snapshot
from orchestrator.storage_errors import storage_errors

if TYPE_CHECKING:
    from orchestrator.store import Store


def manifest_dataset(store: "Store", snapshot: Snapshot) -> pads.Dataset:
    """A pyarrow dataset over exactly the files of ``snapshot``, with its full schema."""
    with storage_errors("open the manifest files of dataset", repr(snapshot.dataset)):
        return pads.dataset(
            list(snapshot.files), schema=snapshot.schema, format="parquet",
            filesystem=store.blobs.fs,
        )


def fill_label_counts(table: pa.Table) -> pa.Table:
    """Null label counts (labels added after the row was written) read as 0."""
    if "labels" not in table.column_names:
        return table
    col = table.column("labels").combine_chunks()
    struct_type = col.type
    children = [pc.fill_null(col.field(i), 0) for i in range(struct_type.num_fields)]
    filled = pa.StructArray.from_arrays(children, fields=list(struct_type))
    return table.set_column(table.column_names.index("labels"), "labels", filled)


def read_table(
    store: "Store",
    snapshot: Snapshot,
    columns: Sequence[str] | None = None,
    filter: pc.Expression | None = None,
) -> pa.Table:
    """Read the rows of a version (optionally filtered and projected) into memory."""
    dataset = manifest_dataset(store, snapshot)
    with storage_errors("read the manifest of dataset", repr(snapshot.dataset)):
        table = dataset.to_table(columns=list(columns) if columns else None, filter=filter)
    return fill_label_counts(table)


def existing_item_ids(store: "Store", dataset: str, item_ids: Sequence[str]) -> set[str]:
    """Which of ``item_ids`` are in the latest version (reads only the item_id column).

    The membership test runs after the read: delta-rs rewrites files with ``string_view``
    columns, and pyarrow 26 cannot push a string filter into a mix of string and string_view
    files ("no kernel matching input types (string, string_view)").
    """
    snapshot = store.manifest(dataset).snapshot()
    ids = read_table(store, snapshot, ["item_id"]).column("item_id")
    mask = pc.is_in(ids, value_set=pa.array(list(item_ids), pa.string()))
    return set(ids.filter(mask).to_pylist())


def label_totals(store: "Store", snapshot: Snapshot) -> dict[str, int]:
    """Instances per label over a whole version, in label-id order (reads one column)."""
    names = snapshot.label_map.names
    if not names:
        return {}
    table = read_table(store, snapshot, ["labels"])
    col = table.column("labels").combine_chunks()
    return {name: int(pc.sum(col.field(i)).as_py() or 0) for i, name in enumerate(names)}
