"""What a run trained on, kept beside its checkpoints: ``<store>/runs/<principal>/<run_id>/lineage.json``.

The record holds the config as resolved (``version: latest`` replaced by the number read), the
query, the item count and a digest of the item ids per split, the principal, the code revision
and the metrics of every epoch. Re-running the resolved config trains on the identical items,
whatever was committed since. No credentials are ever written here.

A run ends honestly: ``status`` is ``running`` while its driver lives, then ``finished``,
``failed`` or ``interrupted`` (Ctrl-C / SIGTERM; the metrics of the epochs that finished are
kept, since they are appended as each epoch reports). A driver that dies without a word (SIGKILL,
a lost node) cannot write, so the record carries what readers need to tell: the driver's host,
pid and process start, and a ``heartbeat_at`` the driver refreshes every ``HEARTBEAT_S``.
:func:`observed_status` calls a ``running`` record ``lost`` when that process is gone (same
host) or its heartbeat is older than ``STALE_AFTER_S`` (another host). ``lost`` is never
written: it is what a reader concludes, and a reader may not have write access.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from orchestrator.storage_errors import storage_errors, store_call

if TYPE_CHECKING:
    from orchestrator.handle import StoreHandle


def new_run_id(config_name: str) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"{config_name}-{stamp}-{uuid.uuid4().hex[:6]}"


def ids_digest(item_ids: list[str]) -> str:
    """sha256 over the sorted ids: equal digests mean the same item set."""
    h = hashlib.sha256()
    for i in sorted(item_ids):
        h.update(i.encode())
        h.update(b"\n")
    return h.hexdigest()


def code_revision() -> str:
    """The git commit of the code being run (with '+dirty' if modified), or 'unknown'."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev + ("+dirty" if dirty else "")) if rev else "unknown"


@dataclass
class Lineage:
    run_id: str
    config: dict[str, Any]
    dataset: str
    version: int
    query: str | None
    items: dict[str, int]
    items_digest: dict[str, str]
    principal: str
    code_revision: str
    started_at: str
    status: str = "running"
    finished_at: str | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: str | None = None
    error: str | None = None
    policy_version: int | None = None  # the store's access policy version in force (None: none)
    driver: dict[str, Any] | None = None  # {host, pid, process_start}: see driver_identity()
    heartbeat_at: str | None = None  # refreshed by the live driver every HEARTBEAT_S
    # Items left out because their blob was missing, corrupt or undecodable (the run's
    # on_error="skip"), summed over every worker's pipeline and epoch: count, by_reason, examples.
    skipped_items: int = 0
    skipped: dict[str, Any] | None = None
    # The latest mid-epoch checkpoint of the epoch in progress ({epoch, step}; checkpoint.every_steps),
    # where a resume continues; None once that epoch finished.
    position: dict[str, Any] | None = None

    # New fields go above with a default, so records written before them still load.

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Lineage:
        """A record as read from ``lineage.json``; keys this code does not know (written by a
        newer version) are ignored rather than refused."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})


HEARTBEAT_S = 30.0  # how often a live driver refreshes heartbeat_at
STALE_AFTER_S = 180.0  # a heartbeat older than this, from another host, means the driver is gone


def merge_epoch_metrics(history: list[dict[str, Any]], reported: dict[str, Any]) -> list[dict[str, Any]]:
    """``history`` with one epoch's report appended. A worker group restarted from an older
    checkpoint reports epochs again: the new report replaces that epoch and drops any later
    ones, so the history always reads 0, 1, 2, ... with the values that led to the model."""
    epoch = reported.get("epoch")
    kept = [m for m in history if epoch is None or m.get("epoch") is None or m["epoch"] < epoch]
    return [*kept, dict(reported)]


def _process_start(pid: int) -> str | None:
    """An id of the process ``pid`` that a reused pid does not share: the boot id and the start
    time in clock ticks from ``/proc`` (Linux); None where there is no ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        return None
    # Field 22 (starttime) counted after the command name, which is in parentheses and may
    # itself hold spaces or parentheses.
    return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"


def driver_identity() -> dict[str, Any]:
    """Who is driving this run: host name, pid and process start (see :func:`_process_start`)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid())}


def process_alive(pid: int, process_start: str | None) -> bool:
    """Whether process ``pid`` on this host is still the one that recorded ``process_start``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    if process_start is None:
        return True
    current = _process_start(pid)
    return current is None or current == process_start


def observed_status(lineage: Lineage, *, now: datetime | None = None, host: str | None = None,
                    alive: Callable[[int, str | None], bool] = process_alive,
                    stale_after_s: float = STALE_AFTER_S) -> str:
    """The status a reader should show: the recorded one, except ``lost`` for a ``running``
    record whose driver is gone. On the driver's own host that is exact (the process is
    checked); elsewhere, a heartbeat (or, for records without one, the start) older than
    ``stale_after_s``. Pure given ``now``, ``host`` and ``alive``."""
    if lineage.status != "running":
        return lineage.status
    driver = lineage.driver or {}
    if driver.get("host") and driver.get("pid") and driver["host"] == (host or socket.gethostname()):
        return "running" if alive(int(driver["pid"]), driver.get("process_start")) else "lost"
    last = _parse_time(lineage.heartbeat_at or lineage.started_at)
    if last is None:
        return "running"
    age = ((now or datetime.now(UTC)) - last).total_seconds()
    return "lost" if age > stale_after_s else "running"


def _parse_time(text: str | None) -> datetime | None:
    try:
        t = datetime.fromisoformat(text) if text else None
    except ValueError:
        return None
    if t is not None and t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t


@dataclass(frozen=True)
class RunHome:
    """Where one principal's runs live in a store: ``runs/<principal>/``. The ``Store`` facade
    builds it (``store.runs``) with the principal it resolved; picklable."""

    handle: StoreHandle
    principal: str

    @property
    def dir(self) -> str:
        """``runs/<principal>/`` as a path in the store's filesystem."""
        return self.handle.location.join("runs", re.sub(r"[^A-Za-z0-9._-]", "_", self.principal))


def runs_dir(home: RunHome) -> str:
    """``runs/<principal>/``: each principal's runs (lineage, checkpoints) under its own prefix,
    so storage permissions can let it write there and nowhere else."""
    return home.dir


def lineage_uri(home: RunHome, run_id: str) -> str:
    """Where a run's record is, as a URI to show people."""
    relative = home.dir[len(home.handle.location.root.rstrip("/")):]
    return f"{home.handle.uri.rstrip('/')}{relative}/{run_id}/lineage.json"


def write_lineage(home: RunHome, lineage: Lineage) -> str:
    """Replace the record in one piece: readers (``orchestrator runs``, a watcher) never see a
    half-written file. An S3 PUT is atomic; a local file is written aside and renamed."""
    path = f"{home.dir}/{lineage.run_id}/lineage.json"
    location = home.handle.location
    fs = home.handle.fs
    data = json.dumps(lineage.as_dict(), indent=2, default=str).encode()

    def write() -> None:  # repeated whole while the store does not answer (orchestrator.retry)
        with storage_errors("write the lineage of run", lineage.run_id):
            if location.scheme == "file":
                fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
                aside = f"{path}.{os.getpid()}.tmp"
                with fs.open_output_stream(aside) as out:
                    out.write(data)
                fs.move(aside, path)
            else:
                with fs.open_output_stream(path) as out:
                    out.write(data)

    store_call(write, location=location, action="write the lineage of run", target=lineage.run_id)
    return path


def read_lineage(home: RunHome, run_id: str) -> Lineage:
    path = f"{home.dir}/{run_id}/lineage.json"
    with storage_errors("read the lineage of run", run_id):
        with home.handle.fs.open_input_stream(path) as f:
            return Lineage.from_dict(json.loads(f.read()))


def list_runs(home: RunHome) -> list[Lineage]:
    """Every recorded run of the principal in the store, oldest first."""
    fs = home.handle.fs
    with storage_errors("list the runs in", home.handle.uri):
        infos = fs.get_file_info(pafs.FileSelector(home.dir, allow_not_found=True))
    out = []
    for info in infos:
        if info.type == pafs.FileType.Directory:
            try:
                out.append(read_lineage(home, info.base_name))
            except Exception:  # a run directory without a record (e.g. only checkpoints)
                continue
    return sorted(out, key=lambda l: l.started_at)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
