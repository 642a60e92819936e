"""The read plan: everything a reader needs to read one slice of one version, as one value.

A ``ReadPlan`` is built by ``Dataset`` after the access check and handed to every read path
(``ds[i]``, iteration, ``to_pytorch``, ``to_tensorflow``, ``to_ray``, training): a pinned
snapshot, the compiled query (the caller's slice ANDed with the principal's row filter), the
principal's access view (fields to hide), the store handle and the stream options. It is
picklable and small (no rows, no clients), so it is what crosses into Ray tasks and DataLoader
workers; readers built from it in another process see exactly the same rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from orchestrator.access.policy import ReadView
from orchestrator.blobs import BlobStore
from orchestrator.errors import ConfigError
from orchestrator.handle import StoreHandle
from orchestrator.machine import usable_cores
from orchestrator.manifest import LabelMap, Snapshot
from orchestrator.packs import PackStore
from orchestrator.query.compile import CompiledQuery
from orchestrator.retry import RetryPolicy
from orchestrator.scan import ManifestRows, candidate_files, read_rows
from orchestrator.store_location import StoreLocation
from orchestrator.stream.cache import BlobCache, node_cache
from orchestrator.stream.decode import image_size_wh

OnError = Literal["skip", "raise"]


@dataclass
class StreamOptions:
    """How items are read.

    SDK paths (``ds[i]``, iteration, ``to_pytorch``, ``to_tensorflow``): ``prefetch`` items are
    fetched ahead of the consumer by ``threads`` fetch threads and ``decode_threads`` decode
    threads (default: this process's usable cores + 1, at most ``threads``: decoding holds a
    core, and more decode threads than cores only contend for the GIL between images; measured
    on 2 cores, 3 decode threads delivered ~20% more items/s than 8). Ray path
    (``to_ray``, training): at most ``ray_fetch_actors`` read tasks at once (None: the cores
    on a local cluster, 8 on an attached one: ``ray_runtime.read_concurrency``), each the SDK reader
    over its adjacent items (so ``prefetch``, ``threads`` and ``decode_threads`` apply within a
    task); how far the pipeline reads ahead of its consumer is Ray Data's
    (``iter_batches(prefetch_batches=...)``). Everywhere: ``on_error`` ``skip``s a missing, corrupt or
    undecodable blob (counted in ``skips``, one summary warning per pass) or ``raise``s
    ``ItemError``; ``cache`` is the blob cache (default: this process's node cache);
    ``retry_deadline`` is how many seconds to wait for a store that does not answer before
    raising ``StoreUnavailable`` (default: the store URI's, 120); ``skip_ledger`` names a shared
    ledger (a Ray actor) in which ``to_ray`` pipelines record skipped items, so that all the
    pipelines of one training run count into one total. ``read_ahead_mb``: how many MB of media an
    iteration plans its requests over at a time (packed items in them are fetched with merged
    range requests; at most two such chunks are held). Shuffled iteration (``stream.order``)
    permutes row groups, then runs of ``shuffle_run`` adjacent items within windows of
    ``shuffle_window`` row groups, then items within buffers of ``shuffle_buffer`` items.
    ``image_size``: deliver images decoded straight to this size (an int: a square side; a pair:
    (width, height)), stretched like ``train.batches.prepare_item`` (aspect ratio not kept), in
    the same step as the fetch (``stream.decode``); boxes and polygons then are in the pixels
    of that size (also with ``decode=False``), ``width``/``height`` stay the source's. None
    (the default): full-size images."""

    prefetch: int = 16
    threads: int = 8
    decode_threads: int | None = None
    on_error: OnError = "skip"
    decode: bool = True
    shuffle_window: int = 4
    shuffle_run: int = 64
    shuffle_buffer: int = 1024
    cache: BlobCache | None = field(default=None, repr=False)
    retry_deadline: float | None = None
    skip_ledger: str | None = None
    ray_fetch_actors: int | None = None
    read_ahead_mb: int = 16
    image_size: int | tuple[int, int] | None = None

    def __post_init__(self) -> None:
        image_size_wh(self.image_size)  # ConfigError naming image_size unless None, n or (w, h) >= 1
        if self.on_error not in ("skip", "raise"):
            raise ConfigError(f"on_error must be 'skip' or 'raise', got {self.on_error!r}")
        if self.decode_threads is not None and self.decode_threads < 1:
            raise ConfigError(f"decode_threads must be >= 1 (or None for the default), got {self.decode_threads}")
        counts = ("prefetch", "threads", "ray_fetch_actors", "read_ahead_mb", "shuffle_window", "shuffle_run",
                  "shuffle_buffer")
        if any(getattr(self, name) is not None and getattr(self, name) < 1 for name in counts):
            raise ConfigError(f"{', '.join(counts)} must be >= 1, got "
                              + ", ".join(str(getattr(self, name)) for name in counts))
        if self.retry_deadline is not None and (
                isinstance(self.retry_deadline, bool) or not isinstance(self.retry_deadline, (int, float))
                or self.retry_deadline < 0):
            raise ConfigError(f"retry_deadline must be a number of seconds >= 0, got {self.retry_deadline!r}")

    @property
    def decoders(self) -> int:
        """Decode threads: ``decode_threads``, else usable cores + 1, at most ``threads``."""
        if self.decode_threads is not None:
            return self.decode_threads
        return min(self.threads, usable_cores() + 1)

    def retry_policy(self, location: StoreLocation) -> RetryPolicy:
        """The store's retry policy with this reader's deadline, if it sets one."""
        return location.retry.with_deadline(self.retry_deadline)

    @property
    def blob_cache(self) -> BlobCache:
        return self.cache if self.cache is not None else node_cache()

    def replace(self, **changes: Any) -> StreamOptions:
        """A copy with ``changes`` (validated like the original)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ReadPlan:
    """One slice of one pinned version, as a reader in any process reads it.

    ``query`` is already the conjunction of the caller's slice and the principal's row filter;
    ``access`` hides fields. The store handle carries the reader's retry policy."""

    handle: StoreHandle
    dataset: str
    snapshot: Snapshot
    query: CompiledQuery | None
    access: ReadView | None
    options: StreamOptions

    @property
    def version(self) -> int:
        return self.snapshot.version

    @property
    def label_map(self) -> LabelMap:
        return self.snapshot.label_map

    @property
    def retry(self) -> RetryPolicy:
        """The retry policy of every store request this plan makes."""
        return self.options.retry_policy(self.handle.location)

    @property
    def location(self) -> StoreLocation:
        """The store location, under this plan's retry policy."""
        return self.handle.location.with_retry(self.retry)

    @property
    def blobs(self) -> BlobStore:
        """The dataset's blobs, read under this plan's retry policy."""
        return BlobStore(self.location, self.dataset)

    @property
    def packs(self) -> PackStore:
        """The dataset's packs, read under this plan's retry policy."""
        return PackStore(self.location, self.dataset)

    @property
    def what(self) -> str:
        """How messages name what this plan reads."""
        return f"dataset {self.dataset!r} version {self.version}"

    def with_options(self, options: StreamOptions) -> ReadPlan:
        return dataclasses.replace(self, options=options)

    def candidate_files(self) -> list[str]:
        """Manifest files (sorted by path) that the Delta statistics do not rule out."""
        return [f for f, _ in candidate_files(self.snapshot, self.query)]

    def rows(self, columns: Sequence[str] | None = None, *, files: Sequence[str] | None = None,
             row_numbers: bool = False) -> ManifestRows:
        """The slice's manifest rows (see ``orchestrator.scan.read_rows``, the one reader)."""
        return read_rows(self.location, self.snapshot, self.query, columns, files=files,
                         access=self.access, retry=self.retry, row_numbers=row_numbers)
