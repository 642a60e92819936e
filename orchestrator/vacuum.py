"""``vacuum``: delete the packs and loose blobs of a dataset that no retained version reads.

Retained: the latest version always; the last ``keep_versions`` versions, or the versions
committed within ``older_than`` of now; and every version that a running training run has pinned
(its lineage says ``running``, whichever principal started it; a run whose driver died keeps
its version until its record says otherwise: deleting is the one thing never done on a guess).
What the retained versions read is collected from their manifests (blob and pack columns); every
object under ``datasets/<name>/packs/`` and ``.../blobs/`` that none of them reads is deleted,
and so are leftovers of killed uploads under ``_incoming/``, but only objects older than
``min_age`` (default an hour): an ingest uploads before it commits, so a young object nothing
reads yet may be about to be read. With ``dry_run`` nothing is deleted; the report lists what
would be, first. Versions that are not retained keep their manifest rows (``versions`` still
lists them) but reading their items may then fail with ``ItemError`` (missing).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pyarrow.fs as pafs

from orchestrator.errors import ConfigError
from orchestrator.handle import StoreHandle
from orchestrator.scan import read_table
from orchestrator.storage_errors import storage_errors, store_call

DEFAULT_MIN_AGE = timedelta(hours=1)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``12h``, ``7d``, ``2w`` as a ``timedelta``; ``ConfigError`` otherwise."""
    match = _DURATION.match(str(text))
    if not match:
        raise ConfigError(f"cannot read {text!r} as a duration",
                          hint="write a number and a unit: 90s, 30m, 12h, 7d, 2w")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


@dataclass
class VacuumReport:
    """What ``vacuum`` kept and deleted (or, with ``dry_run``, would delete)."""

    dataset: str
    retained_versions: list[int]
    pinned_by_runs: list[int]
    dry_run: bool
    deleted: list[tuple[str, int]] = field(default_factory=list)  # (path, bytes)
    kept_young: int = 0  # unread objects younger than min_age, left alone

    @property
    def bytes_deleted(self) -> int:
        return sum(n for _, n in self.deleted)

    def as_dict(self) -> dict:
        return {"dataset": self.dataset, "retained_versions": self.retained_versions,
                "pinned_by_runs": self.pinned_by_runs, "dry_run": self.dry_run,
                "deleted": [{"path": p, "bytes": n} for p, n in self.deleted],
                "bytes_deleted": self.bytes_deleted, "kept_young": self.kept_young}

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        lines = [f"dataset {self.dataset!r}: retained versions {self.retained_versions}"
                 + (f" (pinned by running runs: {self.pinned_by_runs})" if self.pinned_by_runs else "")]
        lines += [f"  {verb} {path} ({n:,} bytes)" for path, n in self.deleted[:50]]
        if len(self.deleted) > 50:
            lines.append(f"  ... and {len(self.deleted) - 50} more (use --json for all)")
        lines.append(f"{verb} {len(self.deleted)} objects, {self.bytes_deleted / 1e6:.1f} MB"
                     + (f"; {self.kept_young} unread objects younger than the minimum age kept"
                        if self.kept_young else ""))
        return "\n".join(lines)


def vacuum_dataset(
    handle: StoreHandle, dataset: str, *, keep_versions: int | None = None,
    older_than: timedelta | None = None, dry_run: bool = False, min_age: timedelta = DEFAULT_MIN_AGE,
) -> VacuumReport:
    """Delete what no retained version of ``dataset`` reads (see the module doc)."""
    if (keep_versions is None) == (older_than is None):
        raise ConfigError("give exactly one of keep_versions (--keep-versions K) or older_than "
                          "(--older-than DURATION)")
    if keep_versions is not None and (isinstance(keep_versions, bool) or keep_versions < 1):
        raise ConfigError(f"keep_versions must be >= 1 (the latest version is always kept), got {keep_versions!r}")
    manifest = handle.manifest(dataset)
    versions = store_call(manifest.versions, location=handle.location, action="list the versions of",
                          target=repr(dataset))
    now = datetime.now(UTC)
    if keep_versions is not None:
        retained = {v.version for v in versions[-keep_versions:]}
    else:
        assert older_than is not None
        retained = {v.version for v in versions if now - v.timestamp <= older_than}
    retained.add(versions[-1].version)
    pinned = running_versions(handle, dataset) & {v.version for v in versions}
    retained |= pinned
    report = VacuumReport(dataset, sorted(retained), sorted(pinned), dry_run)

    read_packs: set[str] = set()
    read_blobs: set[str] = set()
    for version in sorted(retained):
        snapshot = manifest.snapshot(version)
        table = read_table(handle.location, snapshot, ["blob", "pack"])
        for blob, pack in zip(table.column("blob").to_pylist(), table.column("pack").to_pylist(), strict=True):
            if pack is None:
                read_blobs.add(blob)
            else:
                read_packs.add(pack)

    fs = handle.fs
    base = handle.location.join("datasets", dataset)
    for kind in ("packs", "blobs", "_incoming"):
        with storage_errors("list the media of dataset", repr(dataset)):
            infos = fs.get_file_info(pafs.FileSelector(f"{base}/{kind}", recursive=True, allow_not_found=True))
        for info in sorted(infos, key=lambda i: i.path):
            if info.type != pafs.FileType.File:
                continue
            name = info.base_name
            read = (kind == "packs" and name in read_packs) or (kind == "blobs" and name in read_blobs)
            if read:
                continue
            if info.mtime is not None and now - info.mtime.astimezone(UTC) < min_age:
                report.kept_young += 1
                continue
            report.deleted.append((info.path, info.size or 0))
    if not dry_run:
        for path, _ in report.deleted:
            store_call(lambda p=path: fs.delete_file(p), location=handle.location, action="delete",
                       target=path.rsplit("/", 1)[-1])
    return report


def running_versions(handle: StoreHandle, dataset: str) -> set[int]:
    """Versions of ``dataset`` pinned by training runs whose lineage says ``running`` (any
    principal's runs under ``runs/``)."""
    fs = handle.fs
    with storage_errors("list the runs in", handle.uri):
        infos = fs.get_file_info(pafs.FileSelector(handle.location.join("runs"), recursive=True,
                                                   allow_not_found=True))
    out = set()
    for info in infos:
        if info.type != pafs.FileType.File or info.base_name != "lineage.json":
            continue
        try:
            with fs.open_input_stream(info.path) as f:
                record = json.loads(f.read())
        except (OSError, ValueError):
            continue
        if record.get("status") == "running" and record.get("dataset") == dataset:
            out.add(int(record["version"]))
    return out
