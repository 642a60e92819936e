"""Hidden fields never leave the manifest read: remove hidden keys from the attribute maps of
manifest rows (file ``attributes`` and each instance's ``attributes``)."""

from __future__ import annotations

import pyarrow as pa

from orchestrator.access.policy import ReadView


def redact(table: pa.Table, view: ReadView | None) -> pa.Table:
    """``table`` without the fields ``view`` hides (same schema; a no-op without hidden fields)."""
    if view is None or not view.hidden_fields or table.num_rows == 0:
        return table
    file_keys, inst_keys = view.hidden_attributes, view.hidden_instance_attributes
    if file_keys and "attributes" in table.column_names:
        col = table.column("attributes")
        rows = [None if m is None else [(k, v) for k, v in m if k not in file_keys] for m in col.to_pylist()]
        table = table.set_column(table.column_names.index("attributes"), "attributes",
                                 pa.array(rows, type=col.type))
    if inst_keys and "instances" in table.column_names:
        col = table.column("instances")
        rows = [None if insts is None else [
            {**i, "attributes": None if i.get("attributes") is None
             else [(k, v) for k, v in i["attributes"] if k not in inst_keys]} for i in insts]
            for insts in col.to_pylist()]
        table = table.set_column(table.column_names.index("instances"), "instances",
                                 pa.array(rows, type=col.type))
    return table
