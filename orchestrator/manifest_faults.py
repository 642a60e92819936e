"""Name what is wrong when a dataset's manifest cannot be read, and what fixes it.

delta-rs reports a garbage or truncated log entry as ``Kernel error: Json error: ...`` and pyarrow
a damaged data file as ``dictionary index out of bounds``: neither names the file. The functions
here run only after such a failure (never on the happy path). They look at the store itself, the
``_delta_log`` listing, then each log entry's text, or each data file's bytes, to find the file at
fault, and build a ``StoreError`` that names the dataset, the file, the versions still readable
and the fix. The fix is always the same: restore the file from object-store versioning or a
backup, because nothing else holds a manifest entry (the log and the data files are the record).

A listing alone already shows a missing entry (the first one, or a gap after the newest
checkpoint): ``listing_damage`` is pure and cheap enough for ``Store.datasets()`` to run on every
dataset. Reading the entries themselves is left to the error path.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.errors import OrchestratorError, StoreError
from orchestrator.storage_errors import storage_errors, translate
from orchestrator.store_location import StoreLocation, filesystem_for

_COMMIT = re.compile(r"^(\d{20})\.json$")
_CHECKPOINT = re.compile(r"^(\d{20})\.checkpoint(?:\.[^/]+)?\.parquet$")
_RESTORE = "restore {name} from object-store versioning or a backup (nothing else can rebuild it)"


def log_entry_name(version: int) -> str:
    """The file name of a version's log entry (``00000000000000000002.json``)."""
    return f"{version:020d}.json"


@dataclass(frozen=True)
class LogListing:
    """What a ``_delta_log`` folder holds: the versions with a commit entry, and checkpoints."""

    commits: frozenset[int]
    checkpoints: frozenset[int]

    @classmethod
    def from_names(cls, names: Iterable[str]) -> LogListing:
        commits, checkpoints = set(), set()
        for name in names:
            if m := _COMMIT.match(name):
                commits.add(int(m.group(1)))
            elif m := _CHECKPOINT.match(name):
                checkpoints.add(int(m.group(1)))
        return cls(frozenset(commits), frozenset(checkpoints))

    @property
    def empty(self) -> bool:
        return not self.commits and not self.checkpoints

    @property
    def latest(self) -> int | None:
        return max(self.commits | self.checkpoints) if not self.empty else None

    def replay_start(self) -> int:
        """The first entry a reader of the latest version replays: after the newest checkpoint,
        else version 0 (entries older than a checkpoint may legitimately have been cleaned up)."""
        return max(self.checkpoints) + 1 if self.checkpoints else 0

    def readable(self, below: int) -> tuple[int, int] | None:
        """(first, last) of the versions before ``below`` that Delta can still load: from
        version 0 if every entry up to ``below - 1`` is there, else from the oldest checkpoint
        with a complete run of entries after it."""
        last = below - 1
        starts = [0] if 0 in self.commits else []
        starts += sorted(c for c in self.checkpoints if c <= last)
        for first in starts:
            after = first + 1 if first in self.checkpoints and first not in self.commits else first
            if all(v in self.commits for v in range(after, last + 1)):
                return (first, last)
        return None


@dataclass(frozen=True)
class LogDamage:
    """The first log entry that stops Delta from loading the versions from it on."""

    version: int
    problem: str  # completes "log entry <file> ...", e.g. "is missing"

    @property
    def file(self) -> str:
        return log_entry_name(self.version)


def listing_damage(listing: LogListing) -> LogDamage | None:
    """A missing log entry that the listing alone shows (pure; no entry is read).

    The first entry is needed unless a checkpoint stands in for it; after the newest checkpoint
    every version up to the latest needs its entry.
    """
    if listing.empty:
        return None
    for version in range(listing.replay_start(), listing.latest + 1):  # type: ignore[operator]
        if version not in listing.commits:
            return LogDamage(version, "is missing")
    return None


def entry_problem(text: bytes) -> str | None:
    """Why a log entry's bytes are not a Delta commit (None if they parse): every line must be
    one JSON object, and an entry always holds at least one (its commitInfo)."""
    if not text.strip():
        return "is empty"
    for number, line in enumerate(text.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            action = json.loads(line)
        except json.JSONDecodeError as exc:
            return f"is not valid JSON (line {number}: {exc.msg}; truncated or overwritten?)"
        if not isinstance(action, dict):
            return f"is not a Delta log entry (line {number} is not a JSON object)"
    return None


def list_log(fs: pafs.FileSystem, log_dir: str) -> LogListing:
    """The ``_delta_log`` listing (one LIST request on S3)."""
    infos = fs.get_file_info(pafs.FileSelector(log_dir, allow_not_found=True))
    return LogListing.from_names(i.base_name for i in infos if i.type == pafs.FileType.File)


def diagnose_log(fs: pafs.FileSystem, log_dir: str, dataset: str) -> tuple[LogListing, LogDamage | None]:
    """The listing and the first damaged entry: a missing one (from the listing), else the first
    entry from the replay start on whose text is not a commit. Reads every entry it checks, so
    it is for the error path only."""
    with storage_errors("read the manifest log of dataset", repr(dataset)):
        listing = list_log(fs, log_dir)
        damage = listing_damage(listing)
        if damage is not None or listing.empty:
            return listing, damage
        for version in range(listing.replay_start(), listing.latest + 1):  # type: ignore[operator]
            with fs.open_input_stream(f"{log_dir}/{log_entry_name(version)}") as f:
                problem = entry_problem(f.read())
            if problem is not None:
                return listing, LogDamage(version, problem)
    return listing, None


def log_damage_error(
    location: StoreLocation, log_dir: str, dataset: str, listing: LogListing, damage: LogDamage
) -> StoreError:
    """The error for a damaged log: the dataset, the entry's full URI, what survives, the fix."""
    readable = listing.readable(damage.version)
    if readable is None:
        meanwhile = "until then no version of it can be read"
    else:
        first, last = readable
        span = f"version {last}" if first == last else f"versions {first}..{last}"
        meanwhile = f"until then {span} can still be read (e.g. --version {last})"
    return StoreError(
        f"dataset {dataset!r} is damaged: its manifest log entry "
        f"{location.scheme}://{log_dir}/{damage.file} {damage.problem}",
        hint=f"{_RESTORE.format(name=damage.file)}; {meanwhile}",
    )


# -- data files -------------------------------------------------------------------------------
def data_file_problem(fs: pafs.FileSystem, path: str) -> str | None:
    """Why a manifest Parquet file cannot be decoded (None if it can). The bytes are fetched
    first and decoded from memory, so a decoding failure is the file's fault, never the
    network's; a storage failure while fetching (other than the file being absent) is raised."""
    try:
        with fs.open_input_file(path) as f:
            data = f.read()
    except FileNotFoundError:
        return "is missing"
    try:
        for _ in pq.ParquetFile(pa.BufferReader(data)).iter_batches():
            pass
    except Exception as exc:  # pyarrow raises ArrowInvalid or OSError with decoder text
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        return f"is not readable Parquet ({first_line})"
    return None


@contextlib.contextmanager
def manifest_file_errors(
    location: StoreLocation, files: Sequence[str], dataset: str | None = None
) -> Iterator[None]:
    """Around a read of manifest data files: a failure that one of ``files`` explains (missing,
    not Parquet, undecodable) becomes a ``StoreError`` naming the dataset, that file and the fix;
    any other failure is translated as ``storage_errors`` would. ``dataset`` defaults to the
    one the first file lies under (``datasets/<name>/manifest/...``)."""
    try:
        yield
    except OrchestratorError:
        raise
    except Exception as exc:
        name = dataset or _dataset_of(location, files[0] if files else "")
        raise damaged_file_error(location, name, files, exc) from exc


def _dataset_of(location: StoreLocation, path: str) -> str:
    prefix = location.join("datasets") + "/"
    return path[len(prefix):].split("/", 1)[0] if path.startswith(prefix) else "?"


def damaged_file_error(
    location: StoreLocation, dataset: str, files: Sequence[str], exc: BaseException
) -> OrchestratorError:
    """The first of ``files`` that is damaged, as an error; else ``exc`` translated."""
    for path in files:
        try:
            problem = data_file_problem(filesystem_for(location), path)
        except Exception:  # the storage is failing (unreachable, denied): the original error says so
            break
        if problem is not None:
            name = path.rsplit("/", 1)[-1]
            return StoreError(
                f"dataset {dataset!r} is damaged: its manifest data file "
                f"{location.scheme}://{path} {problem}",
                hint=f"{_RESTORE.format(name=name)}; versions that do not include this file "
                "can still be read",
            )
    return translate(exc, "read the manifest of dataset", repr(dataset))
