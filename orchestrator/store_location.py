"""Where a store lives: parse a store URI into a filesystem, a root path and Delta storage options.

One code path serves `file://` and `s3://`: both become a pyarrow filesystem (for blobs and for
reading manifest Parquet) plus the storage options that deltalake needs for the same place. S3
settings come from the standard AWS environment variables, so AWS S3, MinIO and SeaweedFS all work
by setting `AWS_ENDPOINT_URL` and a key pair.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlparse

import pyarrow.fs as pafs

from orchestrator.errors import StoreError
from orchestrator.fork_safety import ForkSafeLock
from orchestrator.retry import RetryPolicy

#: The AWS C++ SDK inside pyarrow signs uploads with trailing CRC checksums by default; S3-
#: compatible servers such as SeaweedFS reject those parts. Checksums only where the API requires
#: them works everywhere (AWS S3 included). The SDK reads these when S3 first initialises, in
#: every process that unpickles an S3 filesystem, so Ray workers get them too (ray_runtime).
S3_COMPAT_ENV = {
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
}
for _key, _value in S3_COMPAT_ENV.items():
    os.environ.setdefault(_key, _value)

_S3_FIX = (
    "use s3://BUCKET/PREFIX and set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
    "(and AWS_ENDPOINT_URL for MinIO or SeaweedFS)"
)


@dataclass(frozen=True)
class S3Credentials:
    """S3 settings resolved once from the environment (or given explicitly).

    The secret never appears in ``repr`` so that logging a store or an error cannot leak it.
    """

    access_key: str | None
    secret_key: str | None = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    region: str = "us-east-1"
    endpoint_url: str | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> S3Credentials:
        env = dict(os.environ if env is None else env)
        return cls(
            access_key=env.get("AWS_ACCESS_KEY_ID") or None,
            secret_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
        )


@dataclass(frozen=True)
class StoreLocation:
    """A parsed store URI: ``scheme`` is ``file`` or ``s3``; ``root`` is the path inside the fs;
    ``retry`` how long to wait for the store when it does not answer (``?retry_deadline=``,
    ``?request_timeout=``, ``?connect_timeout=`` in the URI; see ``orchestrator.retry``).
    ``uri`` is the store's identity, without those options."""

    uri: str
    scheme: str
    root: str
    credentials: S3Credentials | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def with_retry(self, retry: RetryPolicy) -> StoreLocation:
        """The same store read or written under another retry policy."""
        return dataclasses.replace(self, retry=retry)

    @classmethod
    def parse(cls, uri: str, credentials: S3Credentials | None = None) -> StoreLocation:
        """Validate a store URI; relative local paths are refused so every process agrees."""
        parsed = urlparse(uri)
        retry = RetryPolicy.from_query(parse_qs(parsed.query, keep_blank_values=True), uri)
        if parsed.scheme == "file":
            if parsed.netloc not in ("", "localhost"):
                raise StoreError(
                    f"store URI {uri!r} has a host part {parsed.netloc!r}",
                    hint="write an absolute path with three slashes: file:///abs/path",
                    user_fault=True,
                )
            path = parsed.path.rstrip("/") or "/"
            if not path.startswith("/"):
                raise StoreError(
                    f"store URI {uri!r} is not absolute", hint="use file:///abs/path", user_fault=True
                )
            return cls(uri=f"file://{path}", scheme="file", root=path, retry=retry)
        if parsed.scheme == "s3":
            bucket = parsed.netloc
            if not bucket:
                raise StoreError(f"store URI {uri!r} names no bucket", hint=_S3_FIX, user_fault=True)
            prefix = parsed.path.strip("/")
            root = f"{bucket}/{prefix}" if prefix else bucket
            return cls(
                uri=f"s3://{root}",
                scheme="s3",
                root=root,
                credentials=credentials or S3Credentials.from_env(),
                retry=retry,
            )
        raise StoreError(
            f"unsupported store URI {uri!r}",
            hint="use file:///abs/path for one machine or s3://bucket/prefix for a team store",
            user_fault=True,
        )

    def filesystem(self) -> pafs.FileSystem:
        """A pyarrow filesystem for this location (cheap to build; not cached across pickles)."""
        if self.scheme == "file":
            return pafs.LocalFileSystem()
        creds = self.credentials or S3Credentials.from_env()
        # Every request is bounded in time, and the SDK makes one attempt: retries, with their
        # deadline, are orchestrator.retry's, so that one policy covers every client.
        kwargs: dict = {
            "region": creds.region,
            "connect_timeout": self.retry.connect_timeout_s,
            "request_timeout": self.retry.request_timeout_s,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=1),
        }
        if creds.access_key:
            kwargs.update(access_key=creds.access_key, secret_key=creds.secret_key or "")
            if creds.session_token:
                kwargs["session_token"] = creds.session_token
        if creds.endpoint_url:
            ep = urlparse(creds.endpoint_url)
            kwargs.update(endpoint_override=ep.netloc or ep.path, scheme=ep.scheme or "https")
        try:
            return pafs.S3FileSystem(**kwargs)
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError with C++ text
            raise StoreError(f"cannot configure S3 for {self.uri}: {exc}", hint=_S3_FIX) from exc

    def delta_storage_options(self) -> dict[str, str]:
        """Options for deltalake pointing at the same place and credentials as ``filesystem()``.

        delta-rs 1.x commits to S3 with conditional puts (If-None-Match), so concurrent writers
        are safe on AWS S3, MinIO and SeaweedFS without a lock table.
        """
        if self.scheme == "file":
            return {}
        creds = self.credentials or S3Credentials.from_env()
        opts = {
            "AWS_REGION": creds.region,
            # object_store's own retries stop at our deadline; each request has a timeout.
            "timeout": f"{self.retry.request_timeout_s:g}s",
            "connect_timeout": f"{self.retry.connect_timeout_s:g}s",
            "retry_timeout": f"{self.retry.deadline_s:g}s",
        }
        if creds.access_key:
            opts["AWS_ACCESS_KEY_ID"] = creds.access_key
            opts["AWS_SECRET_ACCESS_KEY"] = creds.secret_key or ""
            if creds.session_token:
                opts["AWS_SESSION_TOKEN"] = creds.session_token
        if creds.endpoint_url:
            opts["AWS_ENDPOINT_URL"] = creds.endpoint_url
            if creds.endpoint_url.startswith("http://"):
                opts["AWS_ALLOW_HTTP"] = "true"
        return opts

    def table_uri(self, path: str) -> str:
        """The URI deltalake wants for a path inside this store's filesystem."""
        return path if self.scheme == "file" else f"s3://{path}"

    def fs_path(self, uri_or_path: str) -> str:
        """Inverse of ``table_uri``: a deltalake file URI back to a path in ``filesystem()``."""
        for prefix in ("s3://", "s3a://", "file://"):
            if uri_or_path.startswith(prefix):
                return uri_or_path[len(prefix):]
        return uri_or_path

    def join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *[p.strip("/") for p in parts]])


@functools.lru_cache(maxsize=16)
def _filesystem(location: StoreLocation, pid: int) -> pafs.FileSystem:
    """One filesystem per location and process: an S3 client must not cross a fork
    (DataLoader workers), so a forked child builds its own."""
    return location.filesystem()


def filesystem_for(location: StoreLocation) -> pafs.FileSystem:
    """This process's filesystem for a store location."""
    return _filesystem(location, os.getpid())


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
        raise no_store_error(location)


def _store_anchor(location: StoreLocation) -> str:
    return location.root if location.scheme == "file" else location.root.split("/", 1)[0]


def no_store_error(location: StoreLocation) -> StoreError:
    """The error for a store that does not exist, naming its folder or bucket and the fix."""
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


#: Open S3 files of this process, by (location, path, pid): a pack's size is learnt once (one
#: HEAD), then every range of it is one GET.
_OPEN_FILES: OrderedDict[tuple[StoreLocation, str, int], Any] = OrderedDict()
_OPEN_FILES_LOCK = ForkSafeLock()
_OPEN_FILES_MAX = 256


def _open_file(location: StoreLocation, path: str) -> Any | None:
    key = (location, path, os.getpid())
    with _OPEN_FILES_LOCK:
        f = _OPEN_FILES.get(key)
        if f is not None:
            _OPEN_FILES.move_to_end(key)
            return f
    try:
        f = filesystem_for(location).open_input_file(path)  # one HEAD
    except FileNotFoundError:
        return None
    with _OPEN_FILES_LOCK:
        _OPEN_FILES[key] = f
        while len(_OPEN_FILES) > _OPEN_FILES_MAX:
            _OPEN_FILES.popitem(last=False)
    return f


def _forget_file(location: StoreLocation, path: str) -> None:
    with _OPEN_FILES_LOCK:
        _OPEN_FILES.pop((location, path, os.getpid()), None)


def read_range(location: StoreLocation, path: str, start: int, end: int) -> bytes | None:
    """Bytes ``[start, end)`` of the object at ``path`` (a path in ``filesystem_for``'s terms);
    None if the object does not exist. Fewer bytes come back when the object is shorter. Errors
    are the clients' own (the caller translates and retries them).

    On S3 the object is opened once per process (pyarrow's C++ client: one HEAD, kept in a
    small LRU of open files), then each range is one GET with the GIL released. boto3 makes
    one GET without the HEAD but spends ~1.2 ms of CPU under the GIL on each, against ~0.3 ms
    here: measured, that was most of ``ds[i]``'s time after the server's. Immutable objects
    (packs) only: a cached size would be stale for an object that is rewritten. A read that
    fails on an open file forgets it and opens the object again once, so an object deleted
    since it was opened reads as missing."""
    if location.scheme == "file":
        try:
            with open(path, "rb") as local:
                local.seek(start)
                return local.read(end - start)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
    for attempt in (1, 2):
        remote = _open_file(location, path)
        if remote is None:
            return None
        size = remote.size()
        if start >= size:
            return b""
        try:
            return remote.read_at(min(end, size) - start, start)
        except OSError:
            # Opened earlier, failing now: the object may be gone since (then the fresh open
            # says so); any other failure is the caller's to translate and retry.
            _forget_file(location, path)
            if attempt == 2:
                raise
    raise AssertionError("unreachable")
