"""What a run trained on, kept beside its checkpoints: ``<store>/runs/<principal>/<run_id>/lineage.json``.

The record holds the config as resolved (``version: latest`` replaced by the number read), the
query, the item count and a digest of the item ids per split, the principal, the code revision
and the metrics of every epoch. Re-running the resolved config trains on the identical items,
whatever was committed since. No credentials are ever written here.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from orchestrator.storage_errors import storage_errors

if TYPE_CHECKING:
    from orchestrator.store import Store


def new_run_id(config_name: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def runs_dir(store: "Store") -> str:
    """``runs/<principal>/``: each principal's runs (lineage, checkpoints) under its own prefix,
    so storage permissions can let it write there and nowhere else."""
    return store.location.join("runs", re.sub(r"[^A-Za-z0-9._-]", "_", store.principal))


def write_lineage(store: "Store", lineage: Lineage) -> str:
    path = f"{runs_dir(store)}/{lineage.run_id}/lineage.json"
    fs = store.fs
    with storage_errors("write the lineage of run", lineage.run_id):
        if store.location.scheme == "file":
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as out:
            out.write(json.dumps(lineage.as_dict(), indent=2, default=str).encode())
    return path


def read_lineage(store: "Store", run_id: str) -> Lineage:
    path = f"{runs_dir(store)}/{run_id}/lineage.json"
    with storage_errors("read the lineage of run", run_id):
        with store.fs.open_input_stream(path) as f:
            return Lineage(**json.loads(f.read()))


def list_runs(store: "Store") -> list[Lineage]:
    """Every recorded run in the store, oldest first."""
    fs = store.fs
    with storage_errors("list the runs in", store.uri):
        infos = fs.get_file_info(pafs.FileSelector(runs_dir(store), allow_not_found=True))
    out = []
    for info in infos:
        if info.type == pafs.FileType.Directory:
            try:
                out.append(read_lineage(store, info.base_name))
            except Exception:  # a run directory without a record (e.g. only checkpoints)
                continue
    return sorted(out, key=lambda l: l.started_at)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
