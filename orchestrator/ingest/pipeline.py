"""Ingest as Ray Data stages: probe files → store each new blob once → one Delta commit.

Stage 1 reads, hashes and fully decodes every file in parallel (bytes do not travel back to the
driver, only the probe). The driver then builds the manifest rows, applies the bad-input policy
and de-duplicates blobs. Stage 2 stores each distinct blob that the dataset does not hold yet:
by default packed (one Ray task per pack of about ``pack_bytes``, ``pack_batch``), or with
``pack=False`` one loose object each (``upload_batch``). Only then is the manifest committed,
in exactly one Delta commit: a killed ingest leaves at most some uploaded packs or blobs (which
a rerun re-uses) and never a partial version.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from orchestrator.diff import COLUMNS as DIFF_COLUMNS
from orchestrator.diff import unchanged_rows
from orchestrator.errors import IngestError, StoreError
from orchestrator.ingest.probe import Probe, probe_file, sha256_hex
from orchestrator.ingest.records import build_row
from orchestrator.ingest.report import IngestReport
from orchestrator.ingest.sources import Rejection, Source
from orchestrator.manifest import conform, label_field, now_utc
from orchestrator.meter import Meter
from orchestrator.packs import DEFAULT_PACK_BYTES, group_into_packs
from orchestrator.ray_runtime import ensure_ray, orchestrator_error_in
from orchestrator.scan import read_table
from orchestrator.storage_errors import store_call

if TYPE_CHECKING:
    from orchestrator.blobs import BlobStore
    from orchestrator.handle import StoreHandle
    from orchestrator.packs import PackStore

log = logging.getLogger(__name__)

_PROBE_FIELDS = ("blob", "size_bytes", "width", "height", "media_type", "error")


class IngestRejected(IngestError):
    """``strict=True`` and some input was rejected: nothing was uploaded or committed."""

    def __init__(self, message: str, *, hint: str | None = None, report: IngestReport | None = None):
        super().__init__(message, hint=hint)
        self.report = report


def _blocks(n: int) -> int:
    return max(1, min(n, max(8, n // 64)))


def probe_batch(batch: pa.Table) -> pa.Table:
    """Ray Data stage: probe each path of the batch (runs on any node with the source files)."""
    probes = [probe_file(p) for p in batch.column("path").to_pylist()]
    cols = {"idx": batch.column("idx")}
    for name in _PROBE_FIELDS:
        cols[name] = [getattr(p, name) for p in probes]
    return pa.table(cols)


def upload_batch(batch: pa.Table, blobs: BlobStore) -> pa.Table:
    """Ray Data stage: upload each blob the store lacks; re-hash so a file that changed since
    it was probed is refused rather than stored under the wrong key. A blob counts as present
    only with the probed size: an empty or truncated object under its name (left by an older
    release's killed upload, say) is uploaded again, not re-used."""
    uploaded, sizes = [], []
    columns = (batch.column(c).to_pylist() for c in ("blob", "path", "size"))
    for blob, path, size in zip(*columns):
        # Look-up and upload are repeated as a whole while the store does not answer (up to
        # the store's retry deadline, then StoreUnavailable ends the ingest, nothing committed).
        # The lambda is called (and retried) within this iteration, so it sees this item.
        flag, nbytes = store_call(lambda: _upload_one(blobs, blob, path, size),  # noqa: B023
                                  location=blobs.location, action="upload blob", target=f"{blob[:12]} ({path})")
        uploaded.append(flag)
        sizes.append(nbytes)
    return pa.table({"blob": batch.column("blob"), "uploaded": uploaded, "bytes": sizes})


def _upload_one(blobs: BlobStore, blob: str, path: str, size: int) -> tuple[bool, int]:
    """(uploaded?, bytes) for one blob; safe to repeat (a whole object lands once)."""
    if blobs.exists(blob, size):
        return False, 0
    with open(path, "rb") as f:
        data = f.read()
    if sha256_hex(data) != blob:
        raise IngestError(
            f"{path} changed while it was being ingested",
            hint="re-run the ingest once the files are no longer being written",
        )
    return blobs.put(blob, data, replace=True), len(data)  # absent or wrong size: looked up above


def pack_batch(batch: pa.Table, packs: PackStore) -> pa.Table:
    """Ray Data stage: write one pack per row of the batch (a group of blobs, in manifest order,
    with a path holding each); re-hash so a file that changed since it was probed is refused.
    Returns each blob's (pack, offset) and whether its pack was uploaded (a pack of the same
    bytes already there, left by a killed run, is re-used whole)."""
    out: dict[str, list] = {"blob": [], "pack": [], "offset": [], "uploaded": [], "bytes": []}
    for members in batch.column("members").to_pylist():
        parts, offsets, at = [], [], 0
        for m in members:
            with open(m["path"], "rb") as f:
                data = f.read()
            if sha256_hex(data) != m["blob"]:
                raise IngestError(
                    f"{m['path']} changed while it was being ingested",
                    hint="re-run the ingest once the files are no longer being written",
                )
            parts.append(data)
            offsets.append(at)
            at += len(data)
        pack, uploaded = packs.put(b"".join(parts))
        for m, offset, data in zip(members, offsets, parts, strict=True):
            out["blob"].append(m["blob"])
            out["pack"].append(pack)
            out["offset"].append(offset)
            out["uploaded"].append(uploaded)
            out["bytes"].append(len(data) if uploaded else 0)
    return pa.table(out)


def _run_pack(store: StoreHandle, dataset: str, unique: dict[str, tuple[str, int]],
              pack_bytes: int) -> tuple[dict[str, tuple[str, int]], int, int, int]:
    """Pack the ``unique`` blobs (in their order) into packs of about ``pack_bytes``: returns
    blob -> (pack, offset), and blobs uploaded, re-used, bytes uploaded."""
    import ray.data

    if not unique:
        return {}, 0, 0, 0
    groups = group_into_packs(((b, n) for b, (_, n) in unique.items()), pack_bytes)
    records = [{"members": [{"blob": b, "path": unique[b][0]} for b in g]} for g in groups]
    ds = ray.data.from_items(records, override_num_blocks=len(records)).map_batches(
        pack_batch, batch_format="pyarrow", batch_size=1,
        fn_kwargs={"packs": store.packs(dataset)}, num_cpus=0.5)
    where: dict[str, tuple[str, int]] = {}
    uploaded = reused = nbytes = 0
    try:
        with Meter("packing media", len(unique), "blob", rate_bytes=True) as meter:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                rows = batch.to_pylist()
                for row in rows:
                    where[row["blob"]] = (row["pack"], row["offset"])
                    uploaded += bool(row["uploaded"])
                    reused += not row["uploaded"]
                    nbytes += row["bytes"]
                meter.update(len(rows), sum(row["bytes"] for row in rows))
    except Exception as exc:  # a stage's error arrives wrapped in Ray's report: raise ours
        raise _from_stage(exc) from None
    if len(where) != len(unique):
        raise IngestError(f"the pack stage lost {len(unique) - len(where)} blobs; nothing was committed")
    return where, uploaded, reused, nbytes


#: The latest version's columns an ingest compares with (``diff``) and re-uses bytes from: read once.
_LATEST_COLUMNS = list(dict.fromkeys([*DIFF_COLUMNS, "pack", "pack_offset", "size_bytes"]))


def _latest_rows(store: StoreHandle, dataset: str) -> tuple[pa.Table, int] | None:
    """The dataset's latest rows (``_LATEST_COLUMNS``) and version number; None for a new dataset."""
    manifest = store.manifest(dataset)
    if not manifest.exists():
        return None
    snapshot = manifest.snapshot()
    return read_table(store.location, snapshot, _LATEST_COLUMNS), snapshot.version


def _known_locations(store: StoreHandle, dataset: str,
                     latest: pa.Table | None) -> dict[str, tuple[str | None, int | None]]:
    """Blob -> (pack, offset) for every blob the dataset's latest version reads (pack None: a
    loose blob): what an ingest re-uses instead of storing the bytes again."""
    if latest is None:
        return {}
    table = latest.select(["blob", "pack", "pack_offset", "size_bytes"])
    known = {b: (p, o, n) for b, p, o, n in zip(*(table.column(c).to_pylist() for c in table.column_names),
                                                strict=True)}
    # A pack that is gone, or shorter than a row says, holds nothing to re-use: its blobs are
    # packed again (so re-ingesting the items `verify` lists repairs them). One HEAD per pack.
    packs = store.packs(dataset)
    sizes = {p: packs.size(p) for p in {p for p, _, _ in known.values() if p is not None}}
    return {b: (p, o) for b, (p, o, n) in known.items()
            if p is None or (sizes[p] is not None and o + n <= sizes[p])}


def _without_damaged_loose(store: StoreHandle, dataset: str, known: dict[str, tuple[str | None, int | None]],
                           unique: dict[str, tuple[str, int]]) -> dict[str, tuple[str | None, int | None]]:
    """``known`` less the loose blobs of this source whose object is gone or of the wrong size
    (an empty or cut object left by an older release's killed upload, say): their media are
    packed again instead of re-used, as a loose ingest uploads them again (``upload_batch``).
    One HEAD per loose blob the source re-uses, which is what a loose ingest makes, on a small
    thread pool (the work is store round trips)."""
    loose = [b for b in unique if b in known and known[b][0] is None]
    if not loose:
        return known
    blobs = store.blobs(dataset)

    def whole(blob: str) -> bool:
        return store_call(lambda: blobs.exists(blob, unique[blob][1]), location=store.location,
                          action="look up blob", target=f"{blob[:12]} of dataset {dataset!r}")

    with ThreadPoolExecutor(max_workers=16, thread_name_prefix="ingest-lookup") as pool:
        damaged = {b for b, ok in zip(loose, pool.map(whole, loose)) if not ok}
    if damaged:
        log.info("%d loose blobs are gone or of the wrong size: packing their media again", len(damaged))
    return {b: where for b, where in known.items() if b not in damaged}


def _run_probe(items: list) -> list[Probe]:
    import ray.data

    if not items:
        return []
    records = [{"idx": i, "path": item.path} for i, item in enumerate(items)]
    ds = ray.data.from_items(records, override_num_blocks=_blocks(len(records)))
    ds = ds.map_batches(probe_batch, batch_format="pyarrow", batch_size=32)
    probes: list[Probe | None] = [None] * len(items)
    with Meter("probing files", len(items), "file") as meter:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for row in batch.to_pylist():
                probes[row["idx"]] = Probe(**{k: row[k] for k in _PROBE_FIELDS})
            meter.update(batch.num_rows)
    missing = [i for i, p in enumerate(probes) if p is None]
    if missing:
        raise IngestError(f"the probe stage lost {len(missing)} items; nothing was committed")
    return probes  # type: ignore[return-value]


def _run_upload(
    store: StoreHandle, dataset: str, unique: dict[str, tuple[str, int]]
) -> tuple[int, int, int]:
    import ray.data

    if not unique:
        return 0, 0, 0
    records = [{"blob": b, "path": p, "size": n} for b, (p, n) in unique.items()]
    ds = ray.data.from_items(records, override_num_blocks=_blocks(len(records)))
    ds = ds.map_batches(
        upload_batch, batch_format="pyarrow", batch_size=16,
        fn_kwargs={"blobs": store.blobs(dataset)}, num_cpus=0.5,
    )
    uploaded = reused = nbytes = 0
    try:
        with Meter("uploading media", len(records), "blob", rate_bytes=True) as meter:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                sizes = batch.column("bytes").to_pylist()
                for flag, size in zip(batch.column("uploaded").to_pylist(), sizes):
                    uploaded += bool(flag)
                    reused += not flag
                    nbytes += size
                meter.update(batch.num_rows, sum(sizes))
    except Exception as exc:  # a stage's error arrives wrapped in Ray's report: raise ours
        raise _from_stage(exc) from None
    return uploaded, reused, nbytes


def _from_stage(exc: Exception) -> Exception:
    """The orchestrator error a Ray stage raised (one clear line for the CLI), else ``exc``."""
    found = orchestrator_error_in(exc)
    if found is None:
        return exc
    if isinstance(found, StoreError):
        found.message = f"{found.message}; the ingest stopped and nothing was committed"
        found.args = (f"{found.message}\n  fix: {found.hint}" if found.hint else found.message,)
    return found


def ingest_source(
    store: StoreHandle, dataset: str, source: Source, *, message: str, strict: bool, principal: str,
    pack: bool = True, pack_bytes: int = DEFAULT_PACK_BYTES,
) -> IngestReport:
    """Probe, upload and commit ``source`` into ``dataset`` as exactly one new version.

    With ``strict``, any rejection raises ``IngestRejected`` before anything is uploaded. With
    ``pack`` (the default), media the dataset's latest version does not already hold are
    written into packs of about ``pack_bytes`` (in manifest order, see ``orchestrator.packs``);
    with ``pack=False``, as one loose blob each. Rows whose bytes the dataset already holds
    point at them either way.
    """

    started = time.monotonic()
    report = IngestReport(dataset=dataset, rejected=list(source.rejected), warnings=list(source.warnings))
    manifest = store.manifest(dataset)
    existing = store_call(
        lambda: manifest.snapshot().label_map.names if manifest.exists() else (),
        location=store.location, action="read the labels of dataset", target=repr(dataset))
    labels = list(existing) + [l for l in source.labels if l not in existing]
    for item in source.items:  # labels used by instances but absent from the vocabulary
        for inst in item.instances:
            if inst.label not in labels:
                labels.append(inst.label)
    _check_label_fields(labels)

    ensure_ray()
    log.info("probing %d files", len(source.items))
    probes = _run_probe(source.items)

    ingested_at = now_utc()
    rows: list[dict] = []
    holders: list[tuple[str, int]] = []  # per row: a path holding its bytes, their size
    for item, probe in zip(source.items, probes):
        if probe.error:
            report.rejected.append(Rejection(item.source_name, probe.error))
            continue
        result = build_row(item, probe, labels, ingested_at)
        report.boxes_clipped += result.boxes_clipped
        report.instances_dropped += result.instances_dropped
        report.warnings += result.warnings
        rows.append(result.row)
        holders.append((item.path, probe.size_bytes))
    report.items = len(rows)

    if strict and report.rejected:
        report.seconds = time.monotonic() - started
        raise IngestRejected(
            f"--strict: {len(report.rejected)} input(s) rejected; nothing was uploaded or committed "
            f"(first: {report.rejected[0].file}: {report.rejected[0].reason})",
            hint="fix or remove the rejected inputs, or ingest without --strict",
            report=report,
        )
    if not rows:
        report.seconds = time.monotonic() - started
        return report
    # Rows identical to the latest version's are not written again: an ingest that changes
    # nothing commits nothing (the history holds no empty versions) and keeps their ingested_at.
    # Their media are still checked as before, so re-ingesting a source restores what `verify`
    # found lost: an unchanged row whose pack is gone is packed again and committed ("restored").
    same = np.zeros(len(rows), dtype=bool)
    latest = store_call(lambda: _latest_rows(store, dataset), location=store.location,
                        action="read the latest version of dataset", target=repr(dataset))
    if latest is not None:
        report.version = latest[1]
        same = unchanged_rows(latest[0].select(list(DIFF_COLUMNS)), conform(rows, labels).select(list(DIFF_COLUMNS)))
    unique: dict[str, tuple[str, int]] = {}  # blob -> (a path holding it, its size)
    for row, holder in zip(rows, holders):
        unique.setdefault(row["blob"], holder)

    if pack:
        latest_rows = latest[0] if latest is not None else None
        known = store_call(lambda: _known_locations(store, dataset, latest_rows), location=store.location,
                           action="read the blobs of dataset", target=repr(dataset))
        known = _without_damaged_loose(store, dataset, known, unique)
        restore = same & np.array([r["blob"] not in known for r in rows], dtype=bool)
        keep = ~same | restore
        rows = [r for r, k in zip(rows, keep) if k]
        needed = {r["blob"] for r in rows}
        new = {b: v for b, v in unique.items() if b not in known and b in needed}
        log.info("packing %d new blobs (%d already in the dataset)", len(new), len(unique) - len(new))
        packed, report.blobs_uploaded, reused, report.bytes_uploaded = _run_pack(store, dataset, new, pack_bytes)
        report.blobs_reused = reused + len(unique) - len(new)
        where = {**known, **packed}
        for row in rows:
            row["pack"], row["pack_offset"] = where[row["blob"]]
    else:  # loose: a lost or damaged blob is uploaded again under its name; its row stays as it is
        log.info("uploading %d distinct blobs", len(unique))
        report.blobs_uploaded, report.blobs_reused, report.bytes_uploaded = _run_upload(store, dataset, unique)
        restore = np.zeros(len(rows), dtype=bool)
        rows = [r for r, s in zip(rows, same) if not s]
    report.unchanged = int(same.sum())
    report.restored = int(restore.sum())
    report.changed = report.items - report.unchanged
    if not rows:
        log.info("all %d items are identical to version %s: nothing to commit", report.items, report.version)
        report.seconds = time.monotonic() - started
        return report
    table = conform(rows, labels)
    report.version = manifest.upsert(
        table, message=message, principal=principal, operation="ingest"
    )
    report.committed = True
    report.seconds = time.monotonic() - started
    return report


def _check_label_fields(labels: list[str]) -> None:
    fields = [label_field(l) for l in labels]
    if len(set(f.lower() for f in fields)) != len(fields):
        raise IngestError(f"labels {labels} collide as manifest columns")
    empty = [l for l in labels if not l]
    if empty:
        raise IngestError("a label name is empty", hint="give every category/instance a label name")
