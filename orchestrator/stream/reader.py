"""Turn positions of a slice into item dicts: manifest row → blob (through the cache) → pixels.

The manifest rows are read in order on the calling thread; blob fetch and decode run on a small
thread pool with a bounded look-ahead (``prefetch``), so at most ``prefetch`` images are in
memory beyond the one the consumer holds. Order is preserved.
"""

from __future__ import annotations

import logging
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from orchestrator.errors import ConfigError, ItemError
from orchestrator.manifest import LabelMap
from orchestrator.retry import RetryPolicy
from orchestrator.stream.cache import BlobCache, node_cache
from orchestrator.stream.decode import decode_image, make_item
from orchestrator.stream.index import ItemIndex, RowReader
from orchestrator.stream.skips import Skips

if TYPE_CHECKING:
    from orchestrator.access.policy import ReadView
    from orchestrator.store import BlobStore, Store
    from orchestrator.store_location import StoreLocation

log = logging.getLogger(__name__)
OnError = Literal["skip", "raise"]


@dataclass
class StreamOptions:
    """How items are read. ``prefetch``: items fetched ahead of the consumer; ``threads``: fetch
    and decode workers; ``on_error``: ``skip`` a missing, corrupt or undecodable blob (counted in
    ``skipped``, one summary warning per pass) or ``raise`` ``ItemError``; ``cache``: the blob
    cache (default: this process's node cache); ``retry_deadline``: seconds to wait for a store
    that does not answer before raising ``StoreUnavailable`` (default: the store URI's, 120);
    ``skip_ledger``: the name of a shared ledger (a Ray actor) in which ``to_ray`` pipelines record
    skipped items, so that all the pipelines of one training run count into one total."""

    prefetch: int = 16
    threads: int = 8
    on_error: OnError = "skip"
    decode: bool = True
    shuffle_window: int = 4
    cache: BlobCache | None = field(default=None, repr=False)
    retry_deadline: float | None = None
    skip_ledger: str | None = None

    def __post_init__(self) -> None:
        if self.on_error not in ("skip", "raise"):
            raise ConfigError(f"on_error must be 'skip' or 'raise', got {self.on_error!r}")
        if self.prefetch < 1 or self.threads < 1:
            raise ConfigError("prefetch and threads must be >= 1")
        if self.retry_deadline is not None and (
                isinstance(self.retry_deadline, bool) or not isinstance(self.retry_deadline, (int, float))
                or self.retry_deadline < 0):
            raise ConfigError(f"retry_deadline must be a number of seconds >= 0, got {self.retry_deadline!r}")

    def retry_policy(self, location: StoreLocation) -> RetryPolicy:
        """The store's retry policy with this reader's deadline, if it sets one."""
        return location.retry.with_deadline(self.retry_deadline)

    @property
    def blob_cache(self) -> BlobCache:
        return self.cache if self.cache is not None else node_cache()


def fetch_blob(blobs: BlobStore, cache: BlobCache, blob: str) -> bytes:
    """The blob's bytes from the node cache, else from the store (then cached)."""
    return cache.get_or_fetch(blob, lambda: blobs.get(blob))


def load_item(
    blobs: BlobStore, cache: BlobCache, row: dict, label_map: LabelMap, version: int, decode: bool = True
) -> dict:
    """Fetch and decode one manifest row into an item dict.

    ``ItemError`` (naming the item) only for a missing, corrupt or undecodable blob; a store
    that does not answer raises ``StoreUnavailable`` after the retry deadline, and every other
    store error (access denied) as it is: those are never the item's fault.
    """
    try:
        data = fetch_blob(blobs, cache, row["blob"])
    except ItemError as exc:
        raise ItemError(f"item {row['item_id']!r}: {exc.message}", hint=exc.hint, reason=exc.reason) from None
    image = decode_image(data, row["item_id"]) if decode else None
    return make_item(row, image, label_map, version)


class ItemStream:
    """Reads items of one pinned, indexed slice."""

    def __init__(self, store: Store, dataset: str, index: ItemIndex, label_map: LabelMap,
                 version: int, options: StreamOptions, access: ReadView | None = None) -> None:
        self.store = store
        retry = options.retry_policy(store.location)
        self.blobs = store.blobs(dataset).with_retry(retry)
        self.index = index
        self.label_map = label_map
        self.version = version
        self.options = options
        self.rows = RowReader(store, index, keep_groups=max(4, options.shuffle_window * 2),
                              access=access, retry=retry)
        self.skips = Skips()
        self.what = f"dataset {dataset!r} version {version}"

    @property
    def skipped(self) -> int:
        return self.skips.count

    def item(self, position: int) -> dict:
        """One item; always raises on a bad blob (a caller asked for this exact item)."""
        row = self.rows.row(position)
        return load_item(self.blobs, self.options.blob_cache, row, self.label_map,
                         self.version, self.options.decode)

    def group_keys(self) -> np.ndarray:
        """Row-group key per position (file * 2**20 + group), for block shuffling."""
        keys = np.empty(len(self.index), dtype=np.int64)
        for f in range(len(self.index.files)):
            sel = np.flatnonzero(self.index.file_of == f)
            self.rows.locate(f, 0)
            bounds = self.rows._bounds[f]
            groups = np.searchsorted(bounds, self.index.row_of[sel], side="right") - 1
            keys[sel] = f * (1 << 20) + groups
        return keys

    def iterate(self, positions: np.ndarray) -> Iterator[dict]:
        """Items at ``positions`` in that order, fetched ahead on a thread pool.

        Exactly once or not at all: an item is yielded, or skipped as an ``ItemError`` under
        ``on_error="skip"`` (counted in ``skips``, one summary warning when the pass ends), or
        the pass stops with the error. A store outage past the retry deadline always stops it.
        """
        opts = self.options
        cache = opts.blob_cache
        blobs = self.blobs
        pending: deque[tuple[int, Future]] = deque()
        skipped_here = Skips()
        pool = ThreadPoolExecutor(max_workers=opts.threads, thread_name_prefix="orchestrator-fetch")
        finished = False
        try:
            it = iter(positions)
            exhausted = False
            while True:
                while not exhausted and len(pending) < opts.prefetch:
                    try:
                        pos = int(next(it))
                    except StopIteration:
                        exhausted = True
                        break
                    row = self.rows.row(pos)
                    pending.append((pos, pool.submit(load_item, blobs, cache, row, self.label_map,
                                                     self.version, opts.decode)))
                if not pending:
                    finished = True
                    return
                _, fut = pending.popleft()
                try:
                    item = fut.result()
                except ItemError as exc:
                    if opts.on_error == "raise":
                        raise
                    skipped_here.add(exc)
                    self.skips.add(exc)
                    continue
                yield item
        finally:
            # On an error or an abandoned pass, queued fetches are cancelled and running ones
            # are not waited for (they end on their own within the store's outage deadline),
            # so the error reaches the caller now, not after every in-flight fetch gave up too.
            pool.shutdown(wait=finished, cancel_futures=True)
            if skipped_here.count:
                warnings.warn(skipped_here.summary(self.what), stacklevel=2)
