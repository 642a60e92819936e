"""The item manifest: one Delta Lake table per dataset, one row per item, one commit per version.

Schema (the single definition; the README copies it):

==============  ====================================  ==============================================
column          type                                  meaning
==============  ====================================  ==============================================
item_id         string, not null                      stable id: the source path unless given
blob            string, not null                      sha256 hex of the media bytes (the blob key)
media_type      string                                MIME type, e.g. ``image/jpeg``
width, height   int32                                 pixels, after EXIF orientation
size_bytes      int64                                 size of the blob
source_name     string                                file name as it was in the source
instances       list<struct>                          annotations, see ``INSTANCE_TYPE``:
                                                      ``label`` string, ``kind`` box|polygon|tag,
                                                      ``bbox`` [x_min, y_min, x_max, y_max] pixels
                                                      (empty for tags), ``polygon`` flat [x, y, ...]
                                                      (empty unless a polygon), ``attributes``
                                                      map<string,string>
labels          struct<label: int32, ...>             instance count per label; one field per label
                                                      of the dataset, so ``labels.car`` is a real
                                                      column that scans push filters into. A field
                                                      is added when a label first appears (schema
                                                      evolution); a null count reads as 0. The
                                                      field name is the label name with anything
                                                      outside ``[a-z0-9_-]`` percent-encoded
                                                      (``traffic light`` -> ``traffic%20light``).
attributes      map<string,string>                    file-level metadata
tags            list<string>                          file-level tags
ingested_at     timestamp[us, UTC]                    when this row was committed
==============  ====================================  ==============================================

Underneath it is plain Parquet plus a Delta log: pyarrow, DuckDB or Spark read any version without
this package. Label ids (``LabelMap``) are the positions of the ``labels`` fields, which schema
evolution only ever appends to, so an id never changes meaning between versions.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, WriterProperties, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from orchestrator.errors import DatasetNotFound, OrchestratorError, StoreError, VersionNotFound
from orchestrator.manifest_faults import diagnose_log, list_log, log_damage_error
from orchestrator.storage_errors import storage_errors, translate
from orchestrator.store_location import StoreLocation, filesystem_for, require_store

log = logging.getLogger(__name__)

INSTANCE_TYPE = pa.struct(
    [
        pa.field("label", pa.string()),
        pa.field("kind", pa.string()),
        pa.field("bbox", pa.list_(pa.float64())),
        pa.field("polygon", pa.list_(pa.float64())),
        pa.field("attributes", pa.map_(pa.string(), pa.string())),
    ]
)
STRING_MAP = pa.map_(pa.string(), pa.string())

#: The manifest columns in order; ``labels`` is built per dataset by ``labels_type``.
BASE_FIELDS: tuple[pa.Field, ...] = (
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("blob", pa.string(), nullable=False),
    pa.field("media_type", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("size_bytes", pa.int64()),
    pa.field("source_name", pa.string()),
    pa.field("instances", pa.list_(INSTANCE_TYPE)),
    pa.field("attributes", STRING_MAP),
    pa.field("tags", pa.list_(pa.string())),
    pa.field("ingested_at", pa.timestamp("us", tz="UTC")),
    # Where the bytes are: in pack ``pack`` at ``pack_offset`` (``size_bytes`` long), or, when
    # ``pack`` is null, in the loose blob named by ``blob`` (see orchestrator.packs).
    pa.field("pack", pa.string()),
    pa.field("pack_offset", pa.int64()),
)
INSTANCE_KINDS = ("box", "polygon", "tag")
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")
_META = "orchestrator."
_COMMIT_ATTEMPTS = 12
#: Rows per Parquet row group: small enough that ``ds[i]`` and the streaming reader hold a few
#: thousand rows at a time and row-group statistics prune finely, large enough to compress well.
ROW_GROUP_ROWS = 2048


def _writer() -> WriterProperties:
    return WriterProperties(max_row_group_size=ROW_GROUP_ROWS, compression="ZSTD")


def label_field(label: str) -> str:
    """The ``labels`` struct field for a label name: injective, case-safe, legal in Delta."""
    return "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in label)


def label_name(field: str) -> str:
    """Inverse of ``label_field``."""
    return unquote(field)


def with_label_names(table: pa.Table) -> pa.Table:
    """``table`` with its ``labels`` struct's fields named by label (``traffic light``), not by
    their stored field names (``traffic%20light``): what a user reading rows expects."""
    if "labels" not in table.column_names:
        return table
    column = table.column("labels")
    names = [label_name(f.name) for f in column.type]
    renamed = pa.chunked_array([pa.StructArray.from_arrays(chunk.flatten(), names=names, mask=chunk.is_null())
                                for chunk in column.chunks], type=pa.struct([pa.field(n, pa.int32()) for n in names]))
    return table.set_column(table.column_names.index("labels"), "labels", renamed)


def base_field(name: str) -> pa.Field:
    """The manifest column ``name`` (not ``labels``) as this release writes it."""
    for f in BASE_FIELDS:
        if f.name == name:
            return f
    raise KeyError(f"no manifest column {name!r}")


def labels_type(labels: Sequence[str]) -> pa.StructType:
    return pa.struct([pa.field(label_field(name), pa.int32()) for name in labels])


def manifest_schema(labels: Sequence[str]) -> pa.Schema:
    """The full manifest schema for a dataset with these labels (in label-id order)."""
    fields = list(BASE_FIELDS)
    if labels:  # Parquet has no empty struct: the column appears with the first label
        fields.insert(8, pa.field("labels", labels_type(labels)))
    return pa.schema(fields)


@dataclass(frozen=True)
class LabelMap:
    """Stable label ids for a dataset version: id = position in the ``labels`` struct."""

    names: tuple[str, ...]

    @classmethod
    def from_schema(cls, schema: pa.Schema) -> LabelMap:
        if "labels" not in schema.names:
            return cls(())
        struct = schema.field("labels").type
        return cls(tuple(label_name(struct.field(i).name) for i in range(struct.num_fields)))

    def id(self, name: str) -> int:
        return self.names.index(name)

    def __len__(self) -> int:
        return len(self.names)

    def as_dict(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}


@dataclass(frozen=True)
class VersionInfo:
    """One committed dataset version, as ``orchestrator versions`` lists it."""

    version: int
    timestamp: datetime
    operation: str
    items: int
    message: str
    principal: str

    def as_dict(self) -> dict:
        return {
            "version": self.version,
            "time": self.timestamp.isoformat(timespec="seconds"),
            "operation": self.operation,
            "items": self.items,
            "message": self.message,
            "principal": self.principal,
        }


@dataclass(frozen=True)
class ColumnStats:
    min: Any
    max: Any
    null_count: int | None


@dataclass(frozen=True)
class FileStats:
    """One data file's statistics from the Delta log; a column absent from ``columns`` (or with
    a None null count) is unknown and never used to skip the file."""

    num_records: int
    columns: dict[str, ColumnStats]


@dataclass(frozen=True)
class Snapshot:
    """A pinned dataset version: its schema and the Parquet files (fs paths) that hold it."""

    dataset: str
    version: int
    schema: pa.Schema = field(repr=False)
    files: tuple[str, ...]
    rows: int
    file_stats: tuple[FileStats, ...] = field(default=(), repr=False)

    @property
    def label_map(self) -> LabelMap:
        return LabelMap.from_schema(self.schema)


class Manifest:
    """Delta Lake operations on one dataset's manifest table."""

    def __init__(self, location: StoreLocation, dataset: str) -> None:
        self.location = location
        self.dataset = dataset
        self.path = location.join("datasets", dataset, "manifest")
        self.uri = location.table_uri(self.path)
        self._options = location.delta_storage_options()

    # -- reading ---------------------------------------------------------------------------
    def _table(self, version: int | None = None) -> DeltaTable:
        """The table at ``version`` (default: the latest). A version is opened as itself, so the
        versions before a damaged log entry stay readable; a failure to open is explained from
        the log itself (``_open_error``)."""
        if version is not None and version < 0:
            raise self._open_error(version, ValueError(f"negative version {version}"))
        try:
            return DeltaTable(self.uri, storage_options=self._options, version=version)
        except Exception as exc:  # delta-rs: TableNotFoundError, DeltaError, OSError, ...
            raise self._open_error(version, exc) from exc

    def _open_error(self, version: int | None, failure: BaseException) -> OrchestratorError:
        """Why the table did not open at ``version``, in the user's terms: no such store, no such
        dataset, no such version, or the log entry that is damaged (with the fix)."""
        log_dir = f"{self.path}/_delta_log"
        listing, damage = diagnose_log(filesystem_for(self.location), log_dir, self.dataset)
        if listing.empty:
            require_store(self.location)
            return DatasetNotFound(
                f"dataset {self.dataset!r} does not exist in {self.location.uri}",
                hint="run `orchestrator datasets --store URI` to list the datasets",
            )
        latest = listing.latest
        if version is not None and not 0 <= version <= latest:  # type: ignore[operator]
            return VersionNotFound(
                f"dataset {self.dataset!r} has no version {version} (versions 0..{latest} exist)",
                hint="run `orchestrator versions --store URI NAME` to list them",
            )
        if damage is not None and (version is None or version >= damage.version):
            return log_damage_error(self.location, log_dir, self.dataset, listing, damage)
        return translate(failure, "open the manifest of dataset", repr(self.dataset))

    def exists(self) -> bool:
        """True once a version was committed (the log has an entry), even if the log is damaged:
        reading it then names the damage. False in a store that does not exist yet."""
        with storage_errors("look up dataset", repr(self.dataset)):
            return not list_log(filesystem_for(self.location), f"{self.path}/_delta_log").empty

    def snapshot(self, version: int | None = None) -> Snapshot:
        """Pin a version: schema plus file list, read from the Delta log only (no data)."""
        table = self._table(version)
        with storage_errors("read the manifest log of dataset", repr(self.dataset)):
            schema = pa.schema(table.schema().to_arrow())
            actions = pa.table(table.get_add_actions(flatten=True))
        records = actions.to_pylist()
        files = tuple(self.location.fs_path(self._file_uri(r["path"])) for r in records)
        stats = tuple(_file_stats(r) for r in records)
        rows = sum(s.num_records for s in stats)
        return Snapshot(self.dataset, table.version(), schema, files, rows, stats)

    def _file_uri(self, rel: str) -> str:
        if "://" in rel or rel.startswith("/"):
            return rel
        return f"{self.path}/{unquote(rel)}"

    def versions(self) -> list[VersionInfo]:
        """Every version, oldest first, with its exact item count (from the log's file stats)."""
        table = self._table()
        with storage_errors("read the history of dataset", repr(self.dataset)):
            history = sorted(table.history(), key=lambda h: h["version"])
            out = []
            for entry in history:
                v = entry["version"]
                table.load_as_version(v)
                actions = pa.table(table.get_add_actions(flatten=True))
                items = sum(actions.column("num_records").to_pylist()) if actions.num_rows else 0
                out.append(
                    VersionInfo(
                        version=v,
                        timestamp=datetime.fromtimestamp(entry["timestamp"] / 1000, UTC),
                        operation=entry.get(_META + "operation", entry.get("operation", "")),
                        items=items,
                        message=entry.get(_META + "message", ""),
                        principal=entry.get(_META + "principal", ""),
                    )
                )
        return out

    # -- writing ---------------------------------------------------------------------------
    def upsert(self, rows: pa.Table, *, message: str, principal: str, operation: str) -> int:
        """Insert rows, replacing any whose ``item_id`` exists, as exactly one new version.

        Concurrent writers never lose each other's rows: delta-rs commits with a put-if-absent
        of the next log entry, and a conflicting attempt is retried against the new latest
        version. Returns the version this call committed.
        """
        commit_id = uuid.uuid4().hex

        def attempt() -> int:
            props = self._commit_properties(message, principal, operation, commit_id)
            try:
                table = DeltaTable(self.uri, storage_options=self._options)
            except TableNotFoundError:
                write_deltalake(
                    self.uri, rows, mode="error", storage_options=self._options,
                    commit_properties=props, name=self.dataset, writer_properties=_writer(),
                )
                return 0
            write_deltalake(
                table, rows, mode="overwrite", predicate=_in_predicate(rows.column("item_id").to_pylist()),
                schema_mode="merge", writer_properties=_writer(),
                commit_properties=props,
            )
            return table.version()  # the table object advances to the version it committed

        return self._find_commit(commit_id, self._commit_with_retry(attempt, "commit a new version of"))

    def delete(self, item_ids: Sequence[str], *, message: str, principal: str) -> tuple[int, int]:
        """Remove items as one new version. Returns (version, rows deleted)."""
        predicate = _in_predicate(item_ids)
        commit_id = uuid.uuid4().hex
        deleted: dict = {}

        def attempt() -> int:
            table = self._table()
            props = self._commit_properties(message, principal, "delete", commit_id)
            deleted.update(table.delete(predicate, writer_properties=_writer(), commit_properties=props))
            return table.version()

        version = self._find_commit(commit_id, self._commit_with_retry(attempt, "delete items from"))
        return version, int(deleted.get("num_deleted_rows", 0))

    def _commit_properties(
        self, message: str, principal: str, operation: str, commit_id: str
    ) -> CommitProperties:
        meta = {
            _META + "message": message,
            _META + "principal": principal,
            _META + "operation": operation,
            _META + "commit_id": commit_id,
        }
        return CommitProperties(custom_metadata=meta)

    def _commit_with_retry(self, attempt: Callable[[], int], action: str) -> int:
        for n in range(_COMMIT_ATTEMPTS):
            try:
                return attempt()
            except (CommitFailedError, DeltaError) as exc:
                if not isinstance(exc, CommitFailedError) and not _is_conflict(exc):
                    raise self._write_error(exc, action) from exc
                log.info("commit conflict on %s (attempt %d): %s", self.dataset, n + 1, exc)
            except Exception as exc:
                raise self._write_error(exc, action) from exc
            time.sleep(min(2.0, 0.05 * 2**n) * (0.5 + random.random()))
        raise StoreError(
            f"could not {action} dataset {self.dataset!r}: {_COMMIT_ATTEMPTS} attempts "
            "conflicted with concurrent writers",
            hint="retry the command; nothing was committed",
        )

    def _write_error(self, exc: BaseException, action: str) -> OrchestratorError:
        """A failed commit, named: a damaged log entry (which blocks every new version) or the
        storage error."""
        if isinstance(exc, OrchestratorError):
            return exc
        if isinstance(exc, DeltaError):
            log_dir = f"{self.path}/_delta_log"
            listing, damage = diagnose_log(filesystem_for(self.location), log_dir, self.dataset)
            if damage is not None:
                return log_damage_error(self.location, log_dir, self.dataset, listing, damage)
        return translate(exc, action, f"dataset {self.dataset!r}")

    def _find_commit(self, commit_id: str, hint: int) -> int:
        """The version holding our commit: ``hint`` checked against the log itself, then a scan
        of the newest entries (delta-rs's history() can misnumber entries under concurrency)."""
        fs = filesystem_for(self.location)
        log_dir = f"{self.path}/_delta_log"

        def commit_id_of(version: int) -> str | None:
            try:
                with fs.open_input_stream(f"{log_dir}/{version:020d}.json") as f:
                    lines = f.read().decode().splitlines()
            except FileNotFoundError:
                return None
            for line in lines:
                info = json.loads(line).get("commitInfo")
                if info is not None:
                    return info.get(_META + "commit_id")
            return None

        with storage_errors("read the log of dataset", repr(self.dataset)):
            if commit_id_of(hint) == commit_id:
                return hint
            latest = DeltaTable(self.uri, storage_options=self._options).version()
            for version in range(latest, max(-1, latest - 256), -1):
                if commit_id_of(version) == commit_id:
                    return version
        raise StoreError(f"committed to dataset {self.dataset!r} but cannot find the commit")


def _is_conflict(exc: BaseException) -> bool:
    """delta-rs reports a lost race (table created meanwhile, version taken) as DeltaError."""
    text = str(exc).lower()
    return any(s in text for s in ("already exists", "version mismatch", "conflict", "concurrent"))


def _file_stats(action: dict) -> FileStats:
    """Group a flattened add action's ``min.x`` / ``max.x`` / ``null_count.x`` keys by column."""
    columns: dict[str, ColumnStats] = {}
    for key in action:
        if key.startswith("null_count."):
            name = key[len("null_count."):]
            columns[name] = ColumnStats(
                action.get(f"min.{name}"), action.get(f"max.{name}"), action[key]
            )
    return FileStats(int(action.get("num_records") or 0), columns)


def _in_predicate(item_ids: Sequence[str]) -> str:
    """SQL ``item_id IN (...)`` for delta-rs, with quotes escaped."""
    return "item_id IN (" + ", ".join("'" + i.replace("'", "''") + "'" for i in item_ids) + ")"


def conform(rows: Iterable[dict], labels: Sequence[str]) -> pa.Table:
    """Build a manifest table (schema for ``labels``) from row dicts; used by ingest."""
    schema = manifest_schema(labels)
    return pa.Table.from_pylist(list(rows), schema=schema)


def now_utc() -> datetime:
    return datetime.now(UTC)
