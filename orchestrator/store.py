"""The dataset store: content-addressed blobs plus one versioned manifest per dataset.

Layout under the store root (``file:///path`` or ``s3://bucket/prefix``)::

    datasets/<name>/manifest/                        Delta Lake table (see orchestrator.manifest)
    datasets/<name>/blobs/sha256/<2 hex>/<sha256>    immutable media bytes, written once
    datasets/<name>/_incoming/                       blobs being uploaded (leftovers of killed uploads)
    _policy/                                         access policy versions (orchestrator.access)
    runs/<principal>/<run_id>/                       lineage and checkpoints of training runs

Blobs live under their dataset so that object-storage permissions can follow dataset grants (a
reader's keys cannot fetch another dataset's media); a blob is stored once per dataset, and the
client cache, keyed by hash, still shares it across datasets.

Blob writes are atomic on both backends (written under ``datasets/<name>/_incoming/``, size
checked, then renamed into place; on S3 the rename is a server-side copy), so a killed upload never
leaves a partial blob under its final name. A blob counts as present only with the size the
manifest records; ``orchestrator.verify`` checks sizes and hashes of every blob a version reads.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import numbers
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from orchestrator.errors import ConfigError, DatasetNotFound, IngestError, ItemError, StoreError
from orchestrator.manifest import Manifest, VersionInfo
from orchestrator.manifest_faults import list_log, listing_damage, log_damage_error
from orchestrator.retry import RetryPolicy
from orchestrator.storage_errors import storage_errors, store_call
from orchestrator.store_location import S3Credentials, StoreLocation

if TYPE_CHECKING:
    from orchestrator.access.control import AccessControl
    from orchestrator.access.store_policy import PolicyVersion
    from orchestrator.stream.dataset import Dataset
    from orchestrator.verify import VerifyReport

log = logging.getLogger(__name__)

_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HASH = re.compile(r"^[0-9a-f]{64}$")
_BLOB_METADATA = {"Content-Type": "application/octet-stream"}


def check_dataset_name(name: str) -> str:
    if not isinstance(name, str) or not _DATASET_NAME.match(name):
        raise ConfigError(
            f"invalid dataset name {name!r}",
            hint="use letters, digits, '.', '_' or '-' (max 128), starting with a letter or digit",
        )
    return name


@functools.lru_cache(maxsize=16)
def _filesystem(location: StoreLocation, pid: int) -> pafs.FileSystem:
    """One filesystem per location and process: an S3 client must not cross a fork
    (DataLoader workers), so a forked child builds its own."""
    return location.filesystem()


def filesystem_for(location: StoreLocation) -> pafs.FileSystem:
    """This process's filesystem for a store location."""
    return _filesystem(location, os.getpid())


class BlobStore:
    """Content-addressed blobs of one dataset; picklable (location and dataset name only)."""

    def __init__(self, location: StoreLocation, dataset: str) -> None:
        self.location = location
        self.dataset = dataset

    @property
    def fs(self) -> pafs.FileSystem:
        return filesystem_for(self.location)

    def with_retry(self, retry: RetryPolicy) -> BlobStore:
        """The same blobs, read and written under another retry policy."""
        return self if retry == self.location.retry else BlobStore(self.location.with_retry(retry), self.dataset)

    def path(self, blob: str) -> str:
        if not _HASH.match(blob):
            raise ItemError(f"{blob!r} is not a sha256 hex digest")
        return self.location.join("datasets", self.dataset, "blobs", "sha256", blob[:2], blob)

    def size(self, blob: str) -> int | None:
        """Bytes stored under the blob's name (one HEAD on S3); None if nothing is there."""
        with storage_errors("look up blob", blob[:12]):
            info = self.fs.get_file_info(self.path(blob))
        return info.size if info.type == pafs.FileType.File else None

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
        The name only ever receives a whole object: the bytes go to a temporary name under
        ``datasets/<name>/_incoming/``, whose size is checked, and are then renamed (moved:
        S3 CopyObject, which lands whole or not at all) to the final name. Writing straight
        to the final name on S3 is not safe: pyarrow completes the multipart upload of an
        output stream whenever the stream is closed, so an exception (a worker's SIGTERM,
        which Ray turns into SystemExit) between opening and writing stores 0 bytes under the
        name, and a partial write stores a partial object. A killed upload leaves at most a
        temporary object, never read. Raises ``ItemError`` if ``data`` does not hash to ``blob``.
        """
        if hashlib.sha256(data).hexdigest() != blob:
            raise ItemError(f"refusing to store {len(data):,} bytes under blob {blob}: they do not "
                            "hash to its name")
        if not replace and self.exists(blob, len(data)):
            return False
        path = self.path(blob)
        tmp = self.location.join("datasets", self.dataset, "_incoming", f"{blob}.{uuid.uuid4().hex}")
        with storage_errors("upload blob", blob[:12]):
            if self.location.scheme == "file":
                self.fs.create_dir(tmp.rsplit("/", 1)[0], recursive=True)
                self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(tmp, compression=None, metadata=_BLOB_METADATA) as out:
                out.write(data)
            written = self.fs.get_file_info(tmp).size
            if written != len(data):
                self.fs.delete_file(tmp)
                raise StoreError(f"upload of blob {blob[:12]} stored {written} of {len(data)} bytes",
                                 hint="retry the ingest; nothing was stored under the blob's name")
            self.fs.move(tmp, path)
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


class Store:
    """A dataset store. Create with ``orchestrator.connect(uri)``."""

    def __init__(self, location: StoreLocation) -> None:
        self.location = location
        self._access: AccessControl | None = None

    @property
    def access(self) -> AccessControl:
        """The policy in force and the principal behind this store's credentials (read once;
        ``refresh_access()`` re-reads)."""
        if self._access is None:
            from orchestrator.access.control import resolve

            self._access = resolve(self)
        return self._access

    def refresh_access(self) -> None:
        self._access = None

    @property
    def principal(self) -> str:
        """Who is acting (see ``orchestrator.access.control``)."""
        return self.access.name

    @property
    def fs(self) -> pafs.FileSystem:
        """This process's filesystem for the store (see ``_filesystem``)."""
        return filesystem_for(self.location)

    def blobs(self, dataset: str) -> BlobStore:
        """The blobs of one dataset."""
        return BlobStore(self.location, check_dataset_name(dataset))

    @property
    def uri(self) -> str:
        return self.location.uri

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def manifest(self, name: str) -> Manifest:
        return Manifest(self.location, check_dataset_name(name))

    def datasets(self) -> list[str]:
        """Names of the datasets in this store that this principal may read, sorted. A dataset
        whose manifest log visibly lacks an entry is left out: ``damaged_datasets`` names it.
        Raises ``StoreError`` if the store does not exist (rather than listing nothing)."""
        logs = store_call(self._dataset_logs, location=self.location, action="list datasets in",
                          target=self.uri)
        return sorted(name for name, damage in logs.items() if damage is None)

    def damaged_datasets(self) -> dict[str, StoreError]:
        """Datasets (that this principal may read) whose manifest log lacks an entry, such as
        the first one: name -> the error reading it raises, naming the entry and the fix. Only
        the listing is checked (one LIST per dataset); damage inside an entry shows on read."""
        return {name: damage for name, damage in sorted(self._dataset_logs().items())
                if damage is not None}

    def _dataset_logs(self) -> dict[str, StoreError | None]:
        """Every dataset with a committed version that this principal may read -> None, or the
        damage its log listing shows."""
        base = self.location.join("datasets")
        with storage_errors("list datasets in", self.uri):
            try:
                infos = self.fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
            except OSError as exc:
                if "ACCESS_DENIED" not in str(exc) or self.access.policy is None:
                    raise
                # The server lets this principal list its own datasets' prefixes only: name
                # the datasets its grants name exactly (globs cannot be enumerated).
                names = self._granted_dataset_names()
            else:
                if not infos:  # an empty store, or none at all (a typo in the URI)?
                    require_store(self.location)
                names = [i.base_name for i in infos if i.type == pafs.FileType.Directory]
            out: dict[str, StoreError | None] = {}
            for name in names:
                if not self.access.allows("read", name):
                    continue  # a dataset the principal may not read is neither opened nor listed
                log_dir = f"{base}/{name}/manifest/_delta_log"
                listing = list_log(self.fs, log_dir)
                if listing.empty:
                    continue  # no version committed (an interrupted first ingest)
                damage = listing_damage(listing)
                out[name] = None if damage is None else log_damage_error(
                    self.location, log_dir, name, listing, damage)
        return out

    def _granted_dataset_names(self) -> list[str]:
        grants = self.access.policy.policy.grants_for(self.access.principal or "")  # type: ignore[union-attr]
        return sorted({d for g in grants for d in g.datasets if not d.endswith("*")})

    def dataset(self, name: str, version: int | None = None, **options: Any) -> Dataset:
        """Open a dataset at ``version`` (default: the latest, pinned now). ``options`` are
        ``StreamOptions``: prefetch, threads, on_error ('skip' or 'raise'), cache."""
        from orchestrator.stream.dataset import Dataset
        from orchestrator.stream.reader import StreamOptions

        check_dataset_name(name)
        if version is not None:
            if isinstance(version, bool) or not isinstance(version, numbers.Integral):
                raise ConfigError(
                    f"version must be a version number (an int) or None, got {version!r}",
                    hint=f"e.g. store.dataset({name!r}, version=0); store.versions({name!r}) lists them",
                )
            version = int(version)
        view = self.access.read_view(name)  # AccessDenied unless the principal may read it
        return Dataset(self, name, version, options=StreamOptions(**options), _access=view)

    def versions(self, name: str) -> list[VersionInfo]:
        """Every committed version of a dataset, oldest first."""
        self.access.check("read", check_dataset_name(name))
        manifest = self.manifest(name)
        return store_call(manifest.versions, location=self.location, action="list the versions of",
                          target=repr(name))

    def verify(
        self, name: str, version: int | None = None, *, repair_from: str | Path | None = None,
        threads: int = 8, progress: bool | None = None,
    ) -> VerifyReport:
        """Check the size and sha256 of every blob that a version (default: latest) reads;
        with ``repair_from`` (a folder) re-upload bad blobs whose bytes a file there holds.
        The report names each bad blob with its items; see ``orchestrator.verify``."""
        from orchestrator.verify import verify_dataset

        return verify_dataset(self, check_dataset_name(name), version, repair_from=repair_from,
                              threads=threads, progress=progress)

    def ingest(
        self,
        dataset: str,
        *,
        coco: str | Path | None = None,
        images: str | Path | None = None,
        jsonl: str | Path | None = None,
        message: str = "",
        strict: bool = False,
        allow_roots: Sequence[str | Path] = (),
    ):
        """Ingest a COCO or JSONL source as one new version; see ``orchestrator.ingest``.

        Only files inside ``images`` (COCO; for JSONL, ``images`` or else the JSONL file's
        folder) are read; absolute paths and links are read only under an ``allow_roots`` folder.
        """
        from orchestrator.ingest.pipeline import ingest_source
        from orchestrator.ingest.sources import read_coco, read_jsonl

        check_dataset_name(dataset)
        self.access.check("write", dataset)  # before anything is read or uploaded
        if (coco is None) == (jsonl is None):
            raise IngestError("give exactly one source: coco=FILE (with images=DIR) or jsonl=FILE")
        if isinstance(allow_roots, (str, Path)):
            allow_roots = [allow_roots]
        if coco is not None:
            if images is None:
                raise IngestError("a COCO source needs images=DIR (the folder its file_names are in)")
            source = read_coco(Path(coco), Path(images), allowed_roots=allow_roots)
            label = f"COCO {Path(coco).name}"
        else:
            assert jsonl is not None  # exactly one source, checked above
            base = None if images is None else Path(images)
            source = read_jsonl(Path(jsonl), base=base, allowed_roots=allow_roots)
            label = f"JSONL {Path(jsonl).name}"
        return ingest_source(
            self, dataset, source, message=message or f"ingest {label}", strict=strict
        )

    def policy(self, version: int | None = None) -> PolicyVersion | None:
        """The access policy in force (or an earlier version); None if the store has none."""
        from orchestrator.access.store_policy import read_policy

        return read_policy(self, version)

    def set_policy(self, text: str, *, message: str = "") -> int:
        """Commit a new policy version (needs admin on '*' under the policy in force; on a
        store without a policy, whoever can write the storage sets the first one). Refused if
        the new policy would leave the caller without admin rights."""
        from orchestrator.access.control import identify
        from orchestrator.access.policy import parse_policy
        from orchestrator.access.store_policy import write_policy

        self.refresh_access()
        self.access.check_admin()
        new = parse_policy(text, "the new policy")
        principal, identity = identify(self, new)
        if principal is None or not new.allows(principal, "admin", "*"):
            raise ConfigError(
                f"the new policy gives {identity} no admin on datasets '*': "
                "you would lock yourself out", hint="add your principal to an admin role")
        version = write_policy(self, text, principal=principal, message=message)
        self.refresh_access()
        return version

    def delete(self, dataset: str, item_ids: Sequence[str], *, message: str = "") -> tuple[int, int]:
        """Remove items as one new version; unknown ids are an error and nothing changes."""
        from orchestrator.scan import existing_item_ids

        self.access.check("write", check_dataset_name(dataset))
        if not item_ids:
            raise IngestError("no item ids given to delete")
        manifest = self.manifest(dataset)
        present = existing_item_ids(self, dataset, item_ids)
        missing = [i for i in item_ids if i not in present]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:10])
            raise DatasetNotFound(
                f"dataset {dataset!r} has no item {shown}"
                + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""),
                hint="nothing was deleted; check the ids with `orchestrator slice --ids`",
            )
        return manifest.delete(
            list(dict.fromkeys(item_ids)),
            message=message or f"delete {len(item_ids)} items",
            principal=self.principal,
        )


def connect(uri: str, *, credentials: S3Credentials | None = None, must_exist: bool = False) -> Store:
    """Open a store by URI: ``file:///abs/path`` or ``s3://bucket/prefix``.

    S3 credentials and endpoint come from the standard AWS environment variables unless given.
    The connection is checked now, so a wrong endpoint or key fails here with a clear message,
    and so does a bucket that does not exist. A ``file://`` root that does not exist is a new
    store (the first ingest creates it) unless ``must_exist``: commands that only read pass it,
    so a typo in the path is an error rather than an empty store.
    """
    if isinstance(uri, Path):
        uri = f"file://{uri.resolve()}"
    location = StoreLocation.parse(str(uri), credentials)
    store = Store(location)
    if location.scheme == "s3":  # a local root is created by the first write
        # A listing (not a HEAD) so that wrong keys are told apart from a missing grant; of
        # _policy/, which every principal may list when the server enforces the policy.
        def probe() -> list:
            with storage_errors("open the store", location.uri):
                return store.fs.get_file_info(
                    pafs.FileSelector(location.join("_policy"), allow_not_found=True, recursive=False)
                )

        try:  # a store that does not answer is waited for, like every other read
            found = store_call(probe, location=location, action="open the store", target=location.uri)
        except StoreError as exc:
            if "NoSuchBucket" in str(exc.__cause__):  # AWS S3 refuses to list a missing bucket
                raise _no_store(location) from None
            raise
        if not found:  # nothing there: an empty store, or no bucket (SeaweedFS lists it as empty)
            require_store(location)
    elif must_exist:
        require_store(location)
    return store


def require_store(location: StoreLocation) -> None:
    """Raise ``StoreError`` (a user fault) unless the store exists: its root folder for
    ``file://``, its bucket for ``s3://``. An S3 check that fails other than by "not found"
    (denied, say) passes: the next request reports that in its own words."""
    fs = filesystem_for(location)
    try:
        info = fs.get_file_info(_store_anchor(location))
    except Exception:
        return
    if info.type == pafs.FileType.NotFound or (
        location.scheme == "file" and info.type != pafs.FileType.Directory
    ):
        raise _no_store(location)


def _store_anchor(location: StoreLocation) -> str:
    return location.root if location.scheme == "file" else location.root.split("/", 1)[0]


def _no_store(location: StoreLocation) -> StoreError:
    anchor = _store_anchor(location)
    if location.scheme == "file":
        return StoreError(
            f"store {location.uri} does not exist (no folder {anchor})",
            hint="check the path in the store URI; a new store is created by its first "
            "`orchestrator ingest`",
            user_fault=True,
        )
    return StoreError(
        f"store {location.uri} does not exist (no bucket {anchor!r})",
        hint="check the bucket name in the store URI, or create the bucket first",
        user_fault=True,
    )
