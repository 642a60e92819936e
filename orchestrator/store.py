"""The ``Store`` facade: what ``orchestrator.connect(uri)`` returns, on top of every subsystem.

It resolves the access policy and the acting principal once, checks them before anything is
read or written, and hands the subsystems what they need below it: the picklable
``StoreHandle`` (``orchestrator.handle``), a read plan (``Dataset.plan``) and the principal,
explicitly, where one is recorded (ingest commits, run lineage). Nothing below imports this
module; see the layer list in the README. The store layout is in ``orchestrator.handle``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow.fs as pafs

from orchestrator.access.control import AccessControl, identify, resolve
from orchestrator.access.policy import parse_policy
from orchestrator.access.store_policy import PolicyVersion, read_policy, write_policy
from orchestrator.blobs import BlobStore
from orchestrator.dataset import Dataset
from orchestrator.errors import ConfigError, DatasetNotFound, IngestError, StoreError
from orchestrator.handle import StoreHandle, check_dataset_name
from orchestrator.ingest.pipeline import ingest_source
from orchestrator.ingest.report import IngestReport
from orchestrator.ingest.sources import read_coco, read_jsonl
from orchestrator.manifest import Manifest, VersionInfo
from orchestrator.manifest_faults import list_log, listing_damage, log_damage_error
from orchestrator.optimize import OptimizeReport, optimize_dataset
from orchestrator.packs import DEFAULT_PACK_BYTES
from orchestrator.scan import existing_item_ids
from orchestrator.storage_errors import storage_errors, store_call
from orchestrator.store_location import S3Credentials, StoreLocation, no_store_error, require_store
from orchestrator.stream.plan import StreamOptions
from orchestrator.train.lineage import RunHome
from orchestrator.vacuum import DEFAULT_MIN_AGE, VacuumReport, parse_duration, vacuum_dataset
from orchestrator.verify import VerifyReport, repair_source, verify_dataset

__all__ = ["Store", "connect", "check_dataset_name", "require_store"]


class Store:
    """A dataset store. Create with ``orchestrator.connect(uri)``."""

    def __init__(self, location: StoreLocation) -> None:
        self.handle = StoreHandle(location)
        self._access: AccessControl | None = None

    @property
    def location(self) -> StoreLocation:
        return self.handle.location

    @property
    def access(self) -> AccessControl:
        """The policy in force and the principal behind this store's credentials (read once;
        ``refresh_access()`` re-reads)."""
        if self._access is None:
            self._access = resolve(self.handle)
        return self._access

    def refresh_access(self) -> None:
        self._access = None

    @property
    def principal(self) -> str:
        """Who is acting (see ``orchestrator.access.control``)."""
        return self.access.name

    @property
    def runs(self) -> RunHome:
        """Where this principal's training runs (lineage, checkpoints) live in the store."""
        return RunHome(self.handle, self.principal)

    @property
    def fs(self) -> pafs.FileSystem:
        """This process's filesystem for the store (see ``StoreHandle.fs``)."""
        return self.handle.fs

    def blobs(self, dataset: str) -> BlobStore:
        """The blobs of one dataset."""
        return self.handle.blobs(dataset)

    @property
    def uri(self) -> str:
        return self.location.uri

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def manifest(self, name: str) -> Manifest:
        return self.handle.manifest(name)

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
        ``StreamOptions``: prefetch, threads, decode_threads, on_error ('skip' or 'raise'), cache,
        retry_deadline, ray_fetch_actors, read_ahead_mb, shuffle_window, shuffle_run, shuffle_buffer,
        image_size."""
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
        with ``repair_from`` (a folder) re-upload bad loose blobs whose bytes a file there holds
        (packs are immutable: their bad items are listed with what fixes them, never rewritten).
        The report names each bad blob with its items; see ``orchestrator.verify``.
        Only the items this principal may read are checked; repair needs write access."""
        check_dataset_name(name)
        if repair_source(repair_from, threads) is not None:
            self.access.check("write", name)
        ds = self.dataset(name, version)  # pins the version; AccessDenied unless readable
        return verify_dataset(ds.plan, repair_from=repair_from, threads=threads, progress=progress)

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
        pack: bool = True,
        pack_mb: int = DEFAULT_PACK_BYTES >> 20,
    ) -> IngestReport:
        """Ingest a COCO or JSONL source as one new version; see ``orchestrator.ingest``.

        Only files inside ``images`` (COCO; for JSONL, ``images`` or else the JSONL file's
        folder) are read; absolute paths and links are read only under an ``allow_roots`` folder.
        New media go into packs of about ``pack_mb`` MB (see ``orchestrator.packs``), because a
        cold read then makes one request per run of items instead of one per item.
        ``pack=False`` writes one loose blob per item instead: the layout of stores written
        before packs, for tools that want one object per image (``pack_mb`` is then unused).
        """
        check_dataset_name(dataset)
        self.access.check("write", dataset)  # before anything is read or uploaded
        if (coco is None) == (jsonl is None):
            raise IngestError("give exactly one source: coco=FILE (with images=DIR) or jsonl=FILE")
        if isinstance(allow_roots, (str, Path)):
            allow_roots = [allow_roots]
        if images is not None and not Path(images).is_dir():  # before Ray starts or a file is probed
            raise IngestError(f"images folder {str(images)!r} " + ("is not a folder" if Path(images).exists()
                                                                   else "does not exist"),
                              hint="pass the folder the source's file names are relative to")
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
            self.handle, dataset, source, message=message or f"ingest {label}", strict=strict,
            principal=self.principal, pack=pack, pack_bytes=_pack_bytes(pack_mb),
        )

    def optimize(self, name: str, *, pack_mb: int = DEFAULT_PACK_BYTES >> 20) -> OptimizeReport:
        """Pack the latest version's loose blobs, and rewrite packs it reads less than half of,
        as one new version with identical items (see ``orchestrator.optimize``). Needs write
        access."""
        self.access.check("write", check_dataset_name(name))
        return optimize_dataset(self.handle, name, principal=self.principal, pack_bytes=_pack_bytes(pack_mb))

    def vacuum(self, name: str, *, keep_versions: int | None = None, older_than: str | timedelta | None = None,
               dry_run: bool = False, min_age: timedelta = DEFAULT_MIN_AGE) -> VacuumReport:
        """Delete the packs and loose blobs that no retained version reads: the last
        ``keep_versions`` versions, or those committed within ``older_than`` (``"7d"``), plus
        the latest and every version a running training run pinned (see ``orchestrator.vacuum``).
        Needs admin on the dataset: it removes what earlier versions read."""
        self.access.check("admin", check_dataset_name(name))
        if isinstance(older_than, str):
            older_than = parse_duration(older_than)
        return vacuum_dataset(self.handle, name, keep_versions=keep_versions, older_than=older_than,
                              dry_run=dry_run, min_age=min_age)

    def policy(self, version: int | None = None) -> PolicyVersion | None:
        """The access policy in force (or an earlier version); None if the store has none."""
        return read_policy(self.handle, version)

    def set_policy(self, text: str, *, message: str = "") -> int:
        """Commit a new policy version (needs admin on '*' under the policy in force; on a
        store without a policy, whoever can write the storage sets the first one). Refused if
        the new policy would leave the caller without admin rights."""
        self.refresh_access()
        self.access.check_admin()
        new = parse_policy(text, "the new policy")
        principal, identity = identify(self.handle, new)
        if principal is None or not new.allows(principal, "admin", "*"):
            raise ConfigError(
                f"the new policy gives {identity} no admin on datasets '*': "
                "you would lock yourself out", hint="add your principal to an admin role")
        version = write_policy(self.handle, text, principal=principal, message=message)
        self.refresh_access()
        return version

    def delete(self, dataset: str, item_ids: Sequence[str], *, message: str = "") -> Deleted:
        """Remove items as one new version; unknown ids are an error and nothing changes.
        Returns ``Deleted(version, deleted)`` (a named tuple: ``version, n = store.delete(...)``
        still unpacks)."""
        self.access.check("write", check_dataset_name(dataset))
        if not item_ids:
            raise IngestError("no item ids given to delete")
        manifest = self.manifest(dataset)
        present = existing_item_ids(self.location, dataset, item_ids)
        missing = [i for i in item_ids if i not in present]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:10])
            raise DatasetNotFound(
                f"dataset {dataset!r} has no item {shown}"
                + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""),
                hint="nothing was deleted; check the ids with `orchestrator slice --ids`",
            )
        version, deleted = manifest.delete(
            list(dict.fromkeys(item_ids)),
            message=message or f"delete {len(item_ids)} items",
            principal=self.principal,
        )
        return Deleted(version, deleted)


class Deleted(NamedTuple):
    """What ``Store.delete`` did: the version it committed and how many items it removed."""

    version: int
    deleted: int

    def as_dict(self) -> dict[str, int]:
        return self._asdict()


def _pack_bytes(pack_mb: int) -> int:
    if isinstance(pack_mb, bool) or not isinstance(pack_mb, int) or not 1 <= pack_mb <= 4096:
        raise ConfigError(f"pack_mb must be a whole number of MB from 1 to 4096, got {pack_mb!r}")
    return pack_mb << 20


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
                raise no_store_error(location) from None
            raise
        if not found:  # nothing there: an empty store, or no bucket (SeaweedFS lists it as empty)
            require_store(location)
    elif must_exist:
        require_store(location)
    return store
