"""Packs: a dataset's media concatenated into large immutable objects, read by byte range.

One object per item costs one request per item on every cold read (latency and a per-request
charge on S3, server CPU everywhere). Ingest therefore writes the new media of a dataset into
packs, ``datasets/<name>/packs/<pack id>``, of about ``DEFAULT_PACK_BYTES`` each, in manifest
order; each manifest row records ``pack`` and ``pack_offset`` next to ``blob`` (the sha256, still
the item's identity: dedup, cache key and verification are by hash) and ``size_bytes``. Rows
with no ``pack`` are loose blobs (``orchestrator.blobs``): stores written before packs (read as
before), and ingests that opt out with ``pack=False`` (``orchestrator ingest --loose``) for tools
that want one object per image.

A pack's id is the sha256 of its bytes, so a pack is written whole or not at all (through
``_incoming/`` and a move, like a blob), a rerun of a killed ingest that packs the same media
re-uses it, and ``verify`` can check a pack like any blob. Packs live under the dataset's prefix,
so storage permissions keep following dataset grants.

``plan_reads`` turns the rows a reader must deliver into range requests: rows of one pack sorted
by offset, neighbours merged when the gap between them is at most ``merge_gap`` bytes and the
request stays within ``max_request`` bytes. ``read_range`` issues one range GET (a process opens
each pack once, one HEAD: ``store_location.read_range``), under the store's retry policy.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from orchestrator.blobs import DatasetObjects, stored_size, write_whole
from orchestrator.errors import ItemError
from orchestrator.storage_errors import storage_errors, store_call
from orchestrator.store_location import read_range

__all__ = ["DEFAULT_PACK_BYTES", "PackStore", "RangeRead", "group_into_packs", "plan_reads"]

#: Target pack size: tens of MB keep requests few and large, and a pack still small enough that
#: rewriting one (``optimize``) is cheap.
DEFAULT_PACK_BYTES = 32 << 20
#: Bytes between two wanted ranges that a reader fetches rather than starting a new request.
DEFAULT_MERGE_GAP = 256 << 10
#: The largest single range request a reader makes.
DEFAULT_MAX_REQUEST = 8 << 20

_ID = re.compile(r"^[0-9a-f]{64}$")


class PackStore(DatasetObjects):
    """The packs of one dataset."""

    def path(self, pack: str) -> str:
        if not _ID.match(pack):
            raise ItemError(f"{pack!r} is not a pack id (a sha256 hex digest)", reason="missing")
        return self.location.join("datasets", self.dataset, "packs", pack[:2], pack)

    def size(self, pack: str) -> int | None:
        """Bytes stored under the pack's name; None if nothing is there."""
        return stored_size(self.fs, self.path(pack), f"pack {pack[:12]}")

    def put(self, data: bytes) -> tuple[str, bool]:
        """Store ``data`` as a pack; returns (pack id, whether it uploaded). A whole pack of
        the same bytes already there is re-used; the name only ever receives a whole object."""
        pack = hashlib.sha256(data).hexdigest()

        def write() -> bool:
            if self.size(pack) == len(data):
                return False
            write_whole(self.fs, self.location, self.dataset, self.path(pack), data, f"pack {pack[:12]}")
            return True

        uploaded = store_call(write, location=self.location, action="upload pack", target=pack[:12])
        return pack, uploaded

    def read_range(self, pack: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a pack: one range GET, retried while the store does not
        answer. ``ItemError`` (reason ``missing``) if the pack is gone or shorter than ``end``."""
        path = self.path(pack)
        length = end - start

        def read() -> bytes | None:
            with storage_errors("read pack", pack[:12]):
                return read_range(self.location, path, start, end)

        data = store_call(read, location=self.location, action="read pack",
                          target=f"{pack[:12]} bytes {start}-{end}")
        if data is None or len(data) != length:
            got = "is missing" if data is None else f"ends before byte {end} (read {len(data)} of {length})"
            raise ItemError(f"pack {pack} of dataset {self.dataset!r} in {self.location.uri} {got}",
                            reason="missing",
                            hint="run `orchestrator verify` to list the items it held, and re-ingest them")
        return data


    def checked(self, data: bytes, blob: str, pack: str, offset: int) -> bytes:
        """``data`` if it hashes to ``blob`` (the bytes a row says are at ``offset`` of ``pack``);
        else ``ItemError`` (reason ``corrupt``)."""
        if hashlib.sha256(data).hexdigest() != blob:
            raise ItemError(
                f"its bytes in pack {pack} of {self.location.uri} are corrupt: the {len(data):,} "
                f"bytes at offset {offset} do not hash to blob {blob}",
                reason="corrupt", hint="run `orchestrator verify NAME` to list the items it affects, "
                "and re-ingest them")
        return data

    def get(self, pack: str, offset: int, size: int, blob: str) -> bytes:
        """One packed blob's bytes (one range GET), checked against its hash."""
        return self.checked(self.read_range(pack, offset, offset + size), blob, pack, offset)


@dataclass(frozen=True)
class RangeRead:
    """One request: bytes ``[start, end)`` of ``pack`` (None: a loose blob, one item), and the
    members it serves as (index into the caller's rows, offset within the request, length)."""

    pack: str | None
    start: int
    end: int
    members: tuple[tuple[int, int, int], ...]


def plan_reads(
    locations: Sequence[tuple[str | None, int | None, int]],
    *, merge_gap: int = DEFAULT_MERGE_GAP, max_request: int = DEFAULT_MAX_REQUEST,
) -> list[RangeRead]:
    """Requests that fetch every location ``(pack, offset, length)`` (pack None: a loose blob),
    each exactly once: per pack, sorted by offset, neighbours merged while the gap is at most
    ``merge_gap`` and the request at most ``max_request`` bytes (one larger item is a request of
    its own). Loose blobs are one request each. Requests come in pack order, then offset."""
    reads: list[RangeRead] = []
    by_pack: dict[str, list[tuple[int, int, int]]] = {}
    for i, (pack, offset, length) in enumerate(locations):
        if pack is None or offset is None:
            reads.append(RangeRead(None, 0, length, ((i, 0, length),)))
        else:
            by_pack.setdefault(pack, []).append((offset, length, i))
    for pack in sorted(by_pack):
        spans = sorted(by_pack[pack])
        start, end, members = spans[0][0], spans[0][0] + spans[0][1], [spans[0]]
        for offset, length, i in spans[1:]:
            if offset - end <= merge_gap and max(end, offset + length) - start <= max_request:
                end = max(end, offset + length)
                members.append((offset, length, i))
                continue
            reads.append(RangeRead(pack, start, end, tuple((j, o - start, n) for o, n, j in members)))
            start, end, members = offset, offset + length, [(offset, length, i)]
        reads.append(RangeRead(pack, start, end, tuple((j, o - start, n) for o, n, j in members)))
    return reads


def group_into_packs(sizes: Iterable[tuple[str, int]], target: int = DEFAULT_PACK_BYTES) -> list[list[str]]:
    """Blobs (in the given order) cut into consecutive groups of about ``target`` bytes each;
    a blob larger than ``target`` is a group of its own."""
    groups: list[list[str]] = []
    current: list[str] = []
    total = 0
    for blob, size in sizes:
        if current and total + size > target:
            groups.append(current)
            current, total = [], 0
        current.append(blob)
        total += size
    if current:
        groups.append(current)
    return groups
