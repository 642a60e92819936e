"""Is every blob a dataset version reads what its name says? Check, report, and repair.

A blob is named by the sha256 of its bytes and the manifest records its size, so both are
checked against the store: each blob is read once, in ``CHUNK``-sized pieces, counted and hashed
(a blob of 10 GB needs no more memory than one of 10 kB: at most ``threads`` chunks are held).
The reads run on a small thread pool (the work is store round trips; hashlib releases the GIL
while it hashes), with at most ``4 * threads`` checks queued, so a version of millions of items
does not queue millions of futures. A store that fails to answer aborts the check with
``StoreError`` rather than reporting a blob as bad that may be fine.

Packed bytes (``orchestrator.packs``, the default ingest layout) are checked by range: each pack
is read in requests of at most ``packs.DEFAULT_MAX_REQUEST`` bytes and each item's slice hashed;
a pack that is gone makes all its items missing.

Repair reads a folder the user names (the source the items were ingested from, or any folder
holding copies): only files whose size equals a bad loose blob's recorded size are hashed, a
file whose hash is a bad blob's name is uploaded over it (``BlobStore.put(replace=True)``, which
refuses bytes that do not hash to the name and lands whole or not at all), and the blob is
checked again. Items whose bytes the folder does not hold are reported for re-ingest.

Repair never touches packed bytes: a pack is immutable and named by the hash of its bytes, so
new bytes cannot be written under its name, and rewriting it would change what every other
item in it (and every earlier version) reads. Packed bad items are listed instead, with what
fixes them: re-ingest where the pack is gone or ends before the item (an ingest re-uses only
packs that still hold the bytes a row points at, so it packs those media again); where the
pack is whole but the item's bytes in it are wrong, a re-ingest alone would point at the same
bytes again, so the items must be deleted first (``orchestrator delete``) and then ingested.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from orchestrator.errors import ConfigError, ItemError
from orchestrator.meter import Meter
from orchestrator.packs import RangeRead, plan_reads
from orchestrator.storage_errors import storage_errors, store_call
from orchestrator.store_location import read_range

if TYPE_CHECKING:
    from orchestrator.blobs import BlobStore
    from orchestrator.packs import PackStore
    from orchestrator.stream.plan import ReadPlan

CHUNK = 1 << 20
DEFAULT_THREADS = 8
MISSING, WRONG_SIZE, WRONG_CONTENT = "missing", "wrong size", "wrong content"

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BadBlob:
    """A blob of the version that is not what its name says, and the items that read it."""

    blob: str
    problem: str  # MISSING, WRONG_SIZE or WRONG_CONTENT
    expected_size: int
    actual_size: int | None  # None: missing
    content_sha256: str | None  # what the stored bytes hash to (another blob's name, if swapped)
    items: tuple[str, ...]
    pack: str | None = None  # the pack holding the bytes (None: a loose blob)

    def as_dict(self) -> dict:
        return {"blob": self.blob, "problem": self.problem, "expected_size": self.expected_size,
                "actual_size": self.actual_size, "content_sha256": self.content_sha256,
                "items": list(self.items), "pack": self.pack}


@dataclass
class VerifyReport:
    """What ``verify`` found in one dataset version and what ``--repair-from`` fixed."""

    dataset: str
    version: int
    blobs_checked: int = 0
    bytes_checked: int = 0
    bad: list[BadBlob] = field(default_factory=list)  # as found, before any repair
    repaired: list[str] = field(default_factory=list)  # blobs re-uploaded and checked again
    repair_source: str | None = None
    seconds: float = 0.0

    @property
    def remaining(self) -> list[BadBlob]:
        """Bad blobs that no repair fixed (``repaired`` names loose blobs only: packed bytes are
        never repaired, even where the same hash is also a repaired loose blob)."""
        return [b for b in self.bad if not self._was_repaired(b)]

    def _was_repaired(self, bad: BadBlob) -> bool:
        return bad.pack is None and bad.blob in self.repaired

    @property
    def packed_reingest(self) -> list[str]:
        """Ids of the items whose packed bytes are gone (or cut short), sorted: an ingest of
        their source packs them again."""
        return sorted({i for b in self.remaining if b.pack is not None and b.problem != WRONG_CONTENT
                       for i in b.items})

    @property
    def packed_delete_first(self) -> list[str]:
        """Ids of the items whose bytes in a whole pack are wrong, sorted: an ingest alone
        would point them at the same bytes again (it re-uses a pack that still holds a row's
        range), so they must be deleted first and then ingested."""
        return sorted({i for b in self.remaining if b.pack is not None and b.problem == WRONG_CONTENT
                       for i in b.items})

    @property
    def reingest(self) -> list[str]:
        """Ids of the items whose bytes are still bad, sorted: they need their source again."""
        return sorted({i for b in self.remaining for i in b.items})

    @property
    def ok(self) -> bool:
        return not self.remaining

    def as_dict(self) -> dict:
        """The JSON the CLI prints with ``--json`` (stable keys)."""
        return {"dataset": self.dataset, "version": self.version, "ok": self.ok,
                "blobs_checked": self.blobs_checked, "bytes_checked": self.bytes_checked,
                "bad": [b.as_dict() for b in self.bad], "repaired": list(self.repaired),
                "repair_source": self.repair_source, "reingest": self.reingest,
                "packed_reingest": self.packed_reingest, "packed_delete_first": self.packed_delete_first,
                "seconds": round(self.seconds, 3)}

    def summary(self) -> str:
        """A few human lines: the outcome first, then each bad blob (capped)."""
        where = f"dataset {self.dataset!r} version {self.version}"
        if not self.bad:
            return (f"{where}: all {self.blobs_checked} blobs verified "
                    f"({self.bytes_checked / 1e6:.1f} MB, {self.seconds:.1f} s)")
        lines = [f"{where}: {len(self.bad)} of {self.blobs_checked} blobs were bad"]
        for b in self.bad[:20]:
            stored = "absent" if b.actual_size is None else f"{b.actual_size:,} bytes stored"
            items = ", ".join(b.items[:3]) + (f" (+{len(b.items) - 3})" if len(b.items) > 3 else "")
            fixed = "  [repaired]" if self._was_repaired(b) else ""
            held = f" in pack {b.pack[:12]}" if b.pack is not None else ""
            lines.append(f"  {b.problem:13s} {b.blob[:16]}{held}  {b.expected_size:,} bytes expected, "
                         f"{stored}; items: {items}{fixed}")
        if len(self.bad) > 20:
            lines.append(f"  ... and {len(self.bad) - 20} more (use --json for all)")
        packed = [b for b in self.bad if b.pack is not None]
        if self.repair_source is not None:
            loose = len(self.bad) - len(packed)
            lines.append(f"repaired {len(self.repaired)} of {loose} loose blobs from {self.repair_source}"
                         + (f"; {len(packed)} packed blobs cannot be repaired in place (packs are immutable)"
                            if packed else ""))
        if self.ok:
            lines.append(f"all {self.blobs_checked} blobs of {where} now verify")
            return "\n".join(lines)
        loose_items = sorted({i for b in self.remaining if b.pack is None for i in b.items})
        for label, ids in (("items to re-ingest", loose_items),
                           ("packed items to re-ingest (their media are packed again)", self.packed_reingest),
                           ("packed items to delete, then re-ingest (a re-ingest alone would point at the "
                            "same damaged bytes)", self.packed_delete_first)):
            if ids:
                lines.append(f"{label} ({len(ids)}): {', '.join(ids[:10])}" + (" ..." if len(ids) > 10 else ""))
        return "\n".join(lines)


def repair_source(repair_from: str | Path | None, threads: int) -> Path | None:
    """Check verify's options before anything is read: ``threads`` >= 1 and ``repair_from``
    (if given) a folder. Returns the folder."""
    if threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    if repair_from is None:
        return None
    source = Path(repair_from)
    if not source.is_dir():
        raise ConfigError(f"repair source {str(source)!r} is not a folder",
                          hint="give the folder holding the items' files (e.g. the COCO images folder)")
    return source


def verify_dataset(
    plan: ReadPlan,
    *,
    repair_from: str | Path | None = None,
    threads: int = DEFAULT_THREADS,
    progress: bool | None = None,
) -> VerifyReport:
    """Check every blob that the read plan's version reads, and with ``repair_from``
    re-upload the bad ones from the files of that folder.

    The plan is the principal's view (the ``Store`` facade checked read access, and write
    access for a repair). Progress goes to stderr through tqdm when ``progress`` (default: when
    stderr is a terminal).
    """
    started = time.monotonic()
    source = repair_source(repair_from, threads)
    dataset = plan.dataset
    rows = plan.rows(["item_id", "blob", "size_bytes", "pack", "pack_offset"]).table.to_pylist()
    # One check per loose blob, and per range request of packed bytes (a pack is read in
    # requests of at most ``packs.DEFAULT_MAX_REQUEST`` bytes, each member hashed on its own).
    loose: dict[str, tuple[int, list[str]]] = {}
    packed: dict[tuple[str, int, str], tuple[int, list[str]]] = {}
    for row in rows:
        if row["pack"] is None:
            loose.setdefault(row["blob"], (row["size_bytes"], []))[1].append(row["item_id"])
        else:
            key = (row["pack"], row["pack_offset"], row["blob"])
            packed.setdefault(key, (row["size_bytes"], []))[1].append(row["item_id"])
    members = sorted(packed)
    reads = plan_reads([(pack, offset, packed[(pack, offset, blob)][0]) for pack, offset, blob in members],
                       merge_gap=0)
    report = VerifyReport(dataset=dataset, version=plan.version,
                          blobs_checked=len(loose) + len({blob for _, _, blob in packed}))
    blobs, packs = plan.blobs, plan.packs

    def check(unit: str | RangeRead) -> tuple[list[BadBlob], int]:
        if isinstance(unit, str):
            size, items = loose[unit]
            bad, nbytes = check_blob(blobs, unit, size, tuple(sorted(items)))
            return ([bad] if bad else []), nbytes
        parts = [(members[i][2], rel, n, tuple(sorted(packed[members[i]][1]))) for i, rel, n in unit.members]
        return check_pack_range(packs, unit, parts)

    units: list[str | RangeRead] = [*sorted(loose), *reads]
    with Meter(f"verify {dataset}", len(units), "check", show=progress, rate_bytes=True) as meter:
        for bad, nbytes in _bounded_map(check, units, threads):
            report.bytes_checked += nbytes
            report.bad.extend(bad)
            meter.update(1, nbytes)
    report.bad.sort(key=lambda b: (b.items, b.blob))
    if source is not None:
        report.repair_source = str(source)
        if report.bad:
            report.repaired = repair_from_folder(blobs, report.bad, source, threads)
    report.seconds = time.monotonic() - started
    return report


def check_blob(
    blobs: BlobStore, blob: str, expected_size: int, items: tuple[str, ...] = ()
) -> tuple[BadBlob | None, int]:
    """(None if the blob's stored bytes have ``expected_size`` and hash to its name, else what
    is wrong; the bytes read). One streamed read of the object, ``CHUNK`` bytes at a time."""
    path = blobs.path(blob)

    def read() -> tuple[str, int] | None:  # repeated whole while the store does not answer
        digest, size = hashlib.sha256(), 0
        try:
            with blobs.fs.open_input_stream(path) as f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            return None
        return digest.hexdigest(), size

    read_back = store_call(read, location=blobs.location, action="verify blob",
                           target=f"{blob[:12]} of dataset {blobs.dataset!r}")
    if read_back is None:
        return BadBlob(blob, MISSING, expected_size, None, None, items), 0
    actual, size = read_back
    if size == expected_size and actual == blob:
        return None, size
    problem = WRONG_SIZE if size != expected_size else WRONG_CONTENT
    return BadBlob(blob, problem, expected_size, size, actual, items), size


def check_pack_range(
    packs: PackStore, read: RangeRead, members: list[tuple[str, int, int, tuple[str, ...]]]
) -> tuple[list[BadBlob], int]:
    """Check the blobs packed in one range of a pack: ``members`` are (blob, offset within the
    range, size, items). One range GET; a pack that is gone or too short makes its members
    missing (``actual_size`` None) or short."""
    def read_back() -> bytes | None:
        with storage_errors("verify pack", read.pack or ""):
            return read_range(packs.location, packs.path(read.pack or ""), read.start, read.end)

    data = store_call(read_back, location=packs.location, action="verify pack",
                      target=f"{(read.pack or '')[:12]} of dataset {packs.dataset!r}")
    bad = []
    for blob, rel, size, items in members:
        part = None if data is None or len(data) <= rel else data[rel:rel + size]
        if part is None:
            bad.append(BadBlob(blob, MISSING, size, None, None, items, pack=read.pack))
            continue
        actual = hashlib.sha256(part).hexdigest()
        if len(part) != size:
            bad.append(BadBlob(blob, WRONG_SIZE, size, len(part), actual, items, pack=read.pack))
        elif actual != blob:
            bad.append(BadBlob(blob, WRONG_CONTENT, size, size, actual, items, pack=read.pack))
    return bad, 0 if data is None else len(data)


def repair_from_folder(blobs: BlobStore, bad: list[BadBlob], folder: Path, threads: int) -> list[str]:
    """Re-upload each bad loose blob whose bytes a file under ``folder`` holds; the blobs
    repaired (uploaded and checked again), sorted. Only files of a size some bad loose blob has
    are hashed; packed ones are skipped (see the module docstring)."""
    by_blob = {b.blob: b for b in bad if b.pack is None}  # packed bytes: never rewritten (see above)
    if not by_blob:
        return []
    sizes = {b.expected_size for b in by_blob.values()}
    candidates = [p for p in _files(folder) if _size(p) in sizes]
    found: dict[str, Path] = {}
    for path, digest in _bounded_map(lambda p: (p, _file_sha256(p)), candidates, threads):
        if digest in by_blob:
            found.setdefault(digest, path)
    repaired = []
    for blob, path in sorted(found.items()):
        try:
            blobs.put(blob, path.read_bytes(), replace=True)
        except (OSError, ItemError):
            continue  # unreadable now, or changed since it was hashed (put refuses the bytes)
        again, _ = check_blob(blobs, blob, by_blob[blob].expected_size)
        if again is None:
            repaired.append(blob)
    return repaired


def _files(folder: Path) -> Iterator[Path]:
    for root, _dirs, names in os.walk(folder):  # does not descend into linked folders
        for name in sorted(names):
            yield Path(root, name)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None  # a dangling link, a file removed meanwhile


def _file_sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def _bounded_map(fn: Callable[[T], R], items: Iterable[T], threads: int) -> Iterator[R]:
    """``fn`` over ``items`` on ``threads`` threads, results as they finish, with at most
    ``4 * threads`` calls queued at a time. An exception in ``fn`` is raised here."""
    items = iter(items)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="verify") as pool:
        pending: set[Future] = set()
        for item in items:
            pending.add(pool.submit(fn, item))
            if len(pending) >= 4 * threads:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield fut.result()
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                yield fut.result()
