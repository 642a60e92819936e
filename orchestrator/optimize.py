"""``optimize``: pack a dataset's loose blobs, and rewrite packs that are mostly dead bytes, as one
new version whose items are identical.

Rows keep every field (id, hash, size, labels, attributes, ingest time); only ``pack`` and
``pack_offset`` change, so every reader delivers the same items, checked against the same
hashes. Bytes are read from where the latest version has them (verified against their hash
before they are packed again), packed in manifest order into content-named packs (a rerun after
a crash re-uses what it wrote), and the rows are committed in one Delta commit: a killed optimize
leaves the dataset as it was (plus packs nothing reads, for ``vacuum``). Old packs and blobs stay
in the store while earlier versions read them.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa

from orchestrator.errors import ItemError, StoreError
from orchestrator.handle import StoreHandle
from orchestrator.manifest import base_field
from orchestrator.packs import DEFAULT_PACK_BYTES, group_into_packs
from orchestrator.scan import read_table
from orchestrator.storage_errors import store_call

#: A pack whose bytes the latest version reads make up less than this share is rewritten.
DEFAULT_REWRITE_BELOW = 0.5


@dataclass
class OptimizeReport:
    """What ``optimize`` did: the version it committed (None: nothing to do) and the work."""

    dataset: str
    base_version: int
    version: int | None = None
    items_moved: int = 0
    loose_blobs_packed: int = 0
    packs_rewritten: int = 0
    packs_written: int = 0
    bytes_written: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def summary(self) -> str:
        if self.version is None:
            return (f"dataset {self.dataset!r} version {self.base_version}: nothing to optimize "
                    "(no loose blobs, no pack mostly unread)")
        return (f"dataset {self.dataset!r}: version {self.version} (from {self.base_version}) moved "
                f"{self.items_moved} items into {self.packs_written} packs "
                f"({self.bytes_written / 1e6:.1f} MB): {self.loose_blobs_packed} loose blobs packed, "
                f"{self.packs_rewritten} sparse packs rewritten ({self.seconds:.1f} s)")


def optimize_dataset(
    handle: StoreHandle, dataset: str, *, principal: str, pack_bytes: int = DEFAULT_PACK_BYTES,
    rewrite_below: float = DEFAULT_REWRITE_BELOW, threads: int = 8,
) -> OptimizeReport:
    """Pack the loose blobs of the latest version, and the live bytes of packs of which it reads
    less than ``rewrite_below``, into new packs of about ``pack_bytes``; commit the moved rows as
    one new version (``operation="optimize"``) recorded for ``principal``."""
    started = time.monotonic()
    manifest = handle.manifest(dataset)
    snapshot = store_call(manifest.snapshot, location=handle.location, action="open dataset",
                          target=repr(dataset))
    report = OptimizeReport(dataset, snapshot.version)
    table = store_call(lambda: read_table(handle.location, snapshot), location=handle.location,
                       action="read the manifest of dataset", target=repr(dataset))
    for name in ("pack", "pack_offset"):  # a version written before packs
        if name not in table.column_names:
            table = table.append_column(base_field(name), pa.nulls(table.num_rows, base_field(name).type))
    rows = table.to_pylist()
    packs = handle.packs(dataset)
    live: dict[str, dict[str, int]] = {}  # pack -> blob -> size (each blob counted once)
    for r in rows:
        if r["pack"] is not None:
            live.setdefault(r["pack"], {})[r["blob"]] = r["size_bytes"]
    sparse = set()
    for pack, blobs in live.items():
        stored = packs.size(pack)
        if stored is not None and sum(blobs.values()) < rewrite_below * stored:
            sparse.add(pack)
    moving = [r for r in rows if r["pack"] is None or r["pack"] in sparse]
    if not moving:
        report.seconds = time.monotonic() - started
        return report
    source: dict[str, dict] = {}  # blob -> a row that says where its bytes are now
    for r in moving:
        source.setdefault(r["blob"], r)
    groups = group_into_packs(((b, r["size_bytes"]) for b, r in source.items()), pack_bytes)

    def write(group: list[str]) -> tuple[dict[str, tuple[str, int]], bool, int]:
        parts = [_read_verified(handle, dataset, source[b]) for b in group]
        pack, uploaded = packs.put(b"".join(parts))
        offsets, at = {}, 0
        for blob, data in zip(group, parts, strict=True):
            offsets[blob] = (pack, at)
            at += len(data)
        return offsets, uploaded, at

    where: dict[str, tuple[str, int]] = {}
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="optimize") as pool:
        for offsets, uploaded, nbytes in pool.map(write, groups):
            where.update(offsets)
            report.packs_written += 1
            report.bytes_written += nbytes if uploaded else 0
    report.loose_blobs_packed = len({r["blob"] for r in moving if r["pack"] is None})
    for r in moving:
        r["pack"], r["pack_offset"] = where[r["blob"]]
    latest = manifest.snapshot().version
    if latest != snapshot.version:
        raise StoreError(f"dataset {dataset!r} changed while it was being optimized (version {latest} "
                         f"appeared after {snapshot.version}); nothing was committed",
                         hint="run optimize again", user_fault=True)
    moved = pa.Table.from_pylist(moving, schema=table.schema)
    report.version = manifest.upsert(moved, message=f"optimize: {len(moving)} items into packs",
                                     principal=principal, operation="optimize")
    report.items_moved = len(moving)
    report.packs_rewritten = len(sparse)
    report.seconds = time.monotonic() - started
    return report


def _read_verified(handle: StoreHandle, dataset: str, row: dict) -> bytes:
    """A blob's bytes from where ``row`` says they are, checked against its hash (a bad one
    stops the optimize before anything is committed)."""
    try:
        if row["pack"] is None:
            return handle.blobs(dataset).get(row["blob"])
        return handle.packs(dataset).get(row["pack"], row["pack_offset"], row["size_bytes"], row["blob"])
    except ItemError as exc:
        raise ItemError(f"item {row['item_id']!r}: {exc.message}; nothing was committed", reason=exc.reason,
                        hint="run `orchestrator verify` and re-ingest the items it lists, then optimize") from None
