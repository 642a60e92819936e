"""Content-addressed media of one dataset: ``datasets/<name>/blobs/sha256/<2 hex>/<sha256>``.

Blobs live under their dataset so that object-storage permissions can follow dataset grants (a
reader's keys cannot fetch another dataset's media); a blob is stored once per dataset, and the
client cache, keyed by hash, still shares it across datasets.

Blob writes are atomic on both backends (written under ``datasets/<name>/_incoming/``, size
checked, then renamed into place; on S3 the rename is a server-side copy), so a killed upload never
leaves a partial blob under its final name. A blob counts as present only with the size the
manifest records; ``orchestrator.verify`` checks sizes and hashes of every blob a version reads.
"""

from __future__ import annotations

import hashlib
import re
import uuid

import pyarrow.fs as pafs

from orchestrator.errors import ItemError, StoreError
from orchestrator.retry import RetryPolicy
from orchestrator.storage_errors import storage_errors, store_call
from orchestrator.store_location import StoreLocation, filesystem_for

_HASH = re.compile(r"^[0-9a-f]{64}$")
_METADATA = {"Content-Type": "application/octet-stream"}


def stored_size(fs: pafs.FileSystem, path: str, what: str) -> int | None:
    """Bytes stored at ``path`` (one HEAD on S3); None if nothing is there."""
    with storage_errors("look up", what):
        info = fs.get_file_info(path)
    return info.size if info.type == pafs.FileType.File else None


def write_whole(fs: pafs.FileSystem, location: StoreLocation, dataset: str, path: str, data: bytes,
                what: str) -> None:
    """Write ``data`` to ``path`` so that the name only ever receives a whole object: the bytes
    go to a temporary name under ``datasets/<dataset>/_incoming/``, whose size is checked, and
    are then renamed (moved: S3 CopyObject, which lands whole or not at all) to ``path``.
    Writing straight to the final name on S3 is not safe: pyarrow completes the multipart
    upload of an output stream whenever the stream is closed, so an exception (a worker's
    SIGTERM, which Ray turns into SystemExit) between opening and writing stores 0 bytes under
    the name, and a partial write stores a partial object. A killed upload leaves at most a
    temporary object, never read (``vacuum`` removes it). ``fs`` is ``location``'s filesystem."""
    tmp = location.join("datasets", dataset, "_incoming", f"{path.rsplit('/', 1)[-1]}.{uuid.uuid4().hex}")
    with storage_errors("upload", what):
        if location.scheme == "file":
            fs.create_dir(tmp.rsplit("/", 1)[0], recursive=True)
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(tmp, compression=None, metadata=_METADATA) as out:
            out.write(data)
        written = fs.get_file_info(tmp).size
        if written != len(data):
            fs.delete_file(tmp)
            raise StoreError(f"upload of {what} stored {written} of {len(data)} bytes",
                             hint="retry; nothing was stored under its name")
        fs.move(tmp, path)


class DatasetObjects:
    """Immutable objects of one dataset in one store (its blobs, its packs); picklable
    (location and dataset name only)."""

    def __init__(self, location: StoreLocation, dataset: str) -> None:
        self.location = location
        self.dataset = dataset

    @property
    def fs(self) -> pafs.FileSystem:
        return filesystem_for(self.location)


class BlobStore(DatasetObjects):
    """Content-addressed blobs of one dataset."""

    def with_retry(self, retry: RetryPolicy) -> BlobStore:
        """The same blobs, read and written under another retry policy."""
        return self if retry == self.location.retry else BlobStore(self.location.with_retry(retry), self.dataset)

    def path(self, blob: str) -> str:
        if not _HASH.match(blob):
            raise ItemError(f"{blob!r} is not a sha256 hex digest")
        return self.location.join("datasets", self.dataset, "blobs", "sha256", blob[:2], blob)

    def size(self, blob: str) -> int | None:
        """Bytes stored under the blob's name (one HEAD on S3); None if nothing is there."""
        return stored_size(self.fs, self.path(blob), f"blob {blob[:12]}")

    def exists(self, blob: str, size: int | None = None) -> bool:
        """True if the blob is stored, and given ``size``, stored with exactly that many bytes:
        an empty or truncated object under the name is not the blob. (The hash is not checked
        here: that needs the bytes; ``orchestrator.verify`` reads them.)"""
        stored = self.size(blob)
        return stored is not None and (size is None or stored == size)

    def put(self, blob: str, data: bytes, *, replace: bool = False) -> bool:
        """Store ``data`` under its hash unless a whole copy is there; True if it uploaded.

        An object of the wrong size under the name is overwritten, and with ``replace`` so is
        one of the right size (``verify --repair-from``: bytes that do not hash to the name).
        The name only ever receives a whole object (``write_whole``). Raises ``ItemError`` if
        ``data`` does not hash to ``blob``.
        """
        if hashlib.sha256(data).hexdigest() != blob:
            raise ItemError(f"refusing to store {len(data):,} bytes under blob {blob}: they do not "
                            "hash to its name")
        if not replace and self.exists(blob, len(data)):
            return False
        write_whole(self.fs, self.location, self.dataset, self.path(blob), data, f"blob {blob[:12]}")
        return True

    def get(self, blob: str, *, verify: bool = True) -> bytes:
        """The blob's bytes, checked against its name.

        Only two answers make this an ``ItemError`` (an item a reader may skip): the store said
        the object does not exist (``reason="missing"``), or its bytes do not hash to the name
        (``reason="corrupt"``: truncated, zeroed, overwritten by another blob). A store that does
        not answer is retried under the location's retry policy and then raises
        ``StoreUnavailable``; access denied is raised at once. sha256 runs at ~1.5 GB/s here,
        about 2% of decoding the same image (benchmarks/faults.py measures it).
        """
        path = self.path(blob)

        # pyarrow's C++ client (a HEAD and a GET, with the GIL released), not one boto3 GET:
        # boto3 spends over 1 ms of CPU under the GIL per request, which capped a pass over
        # loose blobs at 352 items/s against 466 (benchmarks/peers.py, ours-loose). Packs are
        # opened once and then read one GET per range (``store_location.read_range``).
        def read() -> bytes | None:
            try:
                with self.fs.open_input_stream(path) as f:
                    return f.read()
            except FileNotFoundError:
                return None

        data = store_call(read, location=self.location, action="read blob", target=blob[:12])
        if data is None:
            raise ItemError(f"blob {blob} is missing from the store {self.location.uri}", reason="missing",
                            hint="run `orchestrator verify` to list every missing blob, and re-ingest the items")
        if verify and hashlib.sha256(data).hexdigest() != blob:
            raise ItemError(
                f"blob {blob} in {self.location.uri} is corrupt: its {len(data):,} bytes do not hash "
                "to its name", reason="corrupt",
                hint="run `orchestrator verify NAME --repair-from SOURCE` to restore it from the source files")
        return data
