"""The store handle: the small, picklable low-level view of one store that every subsystem takes.

A ``StoreHandle`` is a ``StoreLocation`` (URI, credentials, retry policy) plus the ways in: this
process's filesystem, a dataset's blobs, a dataset's manifest. It holds no access policy and no
principal: whoever records a principal (ingest commits, run lineage) is given it explicitly by
the ``Store`` facade, which resolves it once. That keeps what crosses into Ray tasks and
DataLoader workers small (a frozen dataclass of strings) and keeps the import graph one-way:
subsystems import this module, and only the facade (``orchestrator.store``) imports them.

Layout under the store root (``file:///path`` or ``s3://bucket/prefix``)::

    datasets/<name>/manifest/                        Delta Lake table (see orchestrator.manifest)
    datasets/<name>/packs/<2 hex>/<sha256 of pack>   immutable packs of media bytes (orchestrator.packs)
    datasets/<name>/blobs/sha256/<2 hex>/<sha256>    immutable loose media bytes (orchestrator.blobs)
    datasets/<name>/_incoming/                       blobs being uploaded (leftovers of killed uploads)
    _policy/                                         access policy versions (orchestrator.access)
    runs/<principal>/<run_id>/                       lineage and checkpoints of training runs
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow.fs as pafs

from orchestrator.blobs import BlobStore
from orchestrator.errors import ConfigError
from orchestrator.manifest import Manifest
from orchestrator.packs import PackStore
from orchestrator.retry import RetryPolicy
from orchestrator.store_location import StoreLocation, filesystem_for

_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_dataset_name(name: str) -> str:
    """``name`` if it is a valid dataset name (it becomes a path segment), else ``ConfigError``."""
    if not isinstance(name, str) or not _DATASET_NAME.match(name):
        raise ConfigError(
            f"invalid dataset name {name!r}",
            hint="use letters, digits, '.', '_' or '-' (max 128), starting with a letter or digit",
        )
    return name


@dataclass(frozen=True)
class StoreHandle:
    """One store, low level: location, filesystem, blobs and manifests; picklable and hashable.

    No access checks happen here: the ``Store`` facade checks them before handing a handle (or a
    read plan holding one) to a subsystem, and the storage server enforces them again."""

    location: StoreLocation

    @property
    def uri(self) -> str:
        return self.location.uri

    @property
    def fs(self) -> pafs.FileSystem:
        """This process's filesystem for the store (one per process: see ``filesystem_for``)."""
        return filesystem_for(self.location)

    def blobs(self, dataset: str) -> BlobStore:
        """The blobs of one dataset."""
        return BlobStore(self.location, check_dataset_name(dataset))

    def packs(self, dataset: str) -> PackStore:
        """The packs of one dataset."""
        return PackStore(self.location, check_dataset_name(dataset))

    def manifest(self, dataset: str) -> Manifest:
        """The manifest (Delta table) of one dataset."""
        return Manifest(self.location, check_dataset_name(dataset))

    def with_retry(self, retry: RetryPolicy) -> StoreHandle:
        """The same store under another retry policy."""
        return self if retry == self.location.retry else StoreHandle(self.location.with_retry(retry))

    def __repr__(self) -> str:
        return f"StoreHandle({self.uri!r})"
