"""The policy's home in the store: ``_policy/``, versioned like data.

``_policy/versions`` is a Delta table with one row per version (the YAML text, who set it, when,
why); every ``policy set`` is one commit, so any earlier policy can be read again and a run's
lineage can name the policy version in force. ``_policy/policy.yaml`` is a plain copy of the
latest text for people and tools that browse the bucket; the library reads the table.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import TableNotFoundError

from orchestrator.access.policy import Policy, parse_policy
from orchestrator.errors import VersionNotFound
from orchestrator.storage_errors import storage_errors

if TYPE_CHECKING:
    from orchestrator.handle import StoreHandle

SCHEMA = pa.schema([
    ("text", pa.string()), ("sha256", pa.string()), ("principal", pa.string()),
    ("message", pa.string()), ("set_at", pa.timestamp("us", tz="UTC")),
])


@dataclass(frozen=True)
class PolicyVersion:
    version: int
    policy: Policy
    text: str
    principal: str
    message: str
    set_at: datetime


def _paths(store: StoreHandle) -> tuple[str, str, str]:
    table = store.location.join("_policy", "versions")
    return table, store.location.table_uri(table), store.location.join("_policy", "policy.yaml")


def read_policy(store: StoreHandle, version: int | None = None) -> PolicyVersion | None:
    """The policy in force (or an earlier ``version``); None when the store has none yet."""
    path, uri, _ = _paths(store)
    with storage_errors("read the access policy of", store.uri):
        try:
            table = DeltaTable(uri, storage_options=store.location.delta_storage_options())
        except TableNotFoundError:
            if version is not None:
                raise VersionNotFound(f"{store.uri} has no access policy yet") from None
            return None
        latest = table.version()
        if version is not None:
            if not 0 <= version <= latest:
                raise VersionNotFound(f"policy version {version} does not exist (0..{latest})")
            table.load_as_version(version)
        files = [store.location.fs_path(f if "://" in f or f.startswith("/") else f"{path}/{f}")
                 for f in table.file_uris()]
        rows = pa.concat_tables([pq.read_table(store.fs.open_input_file(f)) for f in files]).to_pylist()
    row = rows[0]
    return PolicyVersion(table.version(), parse_policy(row["text"], f"policy version {table.version()}"),
                         row["text"], row["principal"], row["message"], row["set_at"])


def write_policy(store: StoreHandle, text: str, *, principal: str, message: str = "") -> int:
    """Validate and commit ``text`` as the next policy version; returns the version."""
    parse_policy(text, "the new policy")  # nothing is written unless it is valid
    path, uri, mirror = _paths(store)
    row = pa.table({
        "text": [text], "sha256": [hashlib.sha256(text.encode()).hexdigest()], "principal": [principal],
        "message": [message or "policy set"], "set_at": [datetime.now(UTC)],
    }, schema=SCHEMA)
    with storage_errors("write the access policy of", store.uri):
        write_deltalake(uri, row, mode="overwrite", storage_options=store.location.delta_storage_options(),
                        commit_properties=CommitProperties(custom_metadata={"principal": principal}))
        version = DeltaTable(uri, storage_options=store.location.delta_storage_options()).version()
        with store.fs.open_output_stream(mirror) as out:
            out.write(text.encode())
    return version
