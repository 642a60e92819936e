"""The one reader: manifest row → blob (through the cache, verified) → pixels → item, under one
error policy, for every read path.

``ItemLoader`` is the fetch-and-decode step (the SDK's thread pool and the Ray fetch actors both
call it), ``apply_error_policy`` the one policy for a bad item, and ``ItemStream`` the SDK reader
of a read plan: the manifest rows are read in order on the calling thread; blob fetch and decode
run on a small thread pool with a bounded look-ahead (``prefetch``), so at most ``prefetch``
images are in memory beyond the one the consumer holds. Order is preserved.
"""

from __future__ import annotations

import logging
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from orchestrator.blobs import BlobStore
from orchestrator.errors import ItemError
from orchestrator.manifest import LabelMap
from orchestrator.stream.cache import BlobCache, node_cache
from orchestrator.stream.decode import decode_image
from orchestrator.stream.index import ItemIndex, RowReader, build_index
from orchestrator.stream.item import make_item
from orchestrator.stream.order import epoch_order, shard
from orchestrator.stream.plan import OnError, ReadPlan, StreamOptions
from orchestrator.stream.skips import Skips

__all__ = ["ItemLoader", "ItemStream", "StreamOptions", "apply_error_policy", "fetch_blob"]

log = logging.getLogger(__name__)


def fetch_blob(blobs: BlobStore, cache: BlobCache, blob: str) -> bytes:
    """The blob's bytes from the node cache, else from the store (verified, then cached)."""
    return cache.get_or_fetch(blob, lambda: blobs.get(blob))


class ItemLoader:
    """Fetch and decode one manifest row into an item: the one fetch-and-decode step.

    Raises ``ItemError`` naming the item only for a missing, corrupt or undecodable blob; a
    store that does not answer raises ``StoreUnavailable`` after the retry deadline, and every
    other store error (access denied) as it is: those are never the item's fault. Picklable
    (the cache is this process's node cache unless the plan's options name one)."""

    def __init__(self, plan: ReadPlan) -> None:
        self.blobs = plan.blobs
        self.label_map: LabelMap = plan.label_map
        self.version = plan.version
        self.decode = plan.options.decode
        self._cache = plan.options.cache

    @property
    def cache(self) -> BlobCache:
        return self._cache if self._cache is not None else node_cache()

    def __call__(self, row: dict) -> dict[str, Any]:
        try:
            data = fetch_blob(self.blobs, self.cache, row["blob"])
            image = decode_image(data, row["item_id"]) if self.decode else None
        except ItemError as exc:
            if exc.message.startswith(f"item {row['item_id']!r}"):
                raise
            raise ItemError(f"item {row['item_id']!r}: {exc.message}", hint=exc.hint,
                            reason=exc.reason) from None
        return make_item(row, image, self.label_map, self.version)


def apply_error_policy(exc: ItemError, on_error: OnError, record: Callable[[ItemError], None]) -> None:
    """The one policy for a bad item: ``raise`` re-raises it; ``skip`` records it (every path
    records into a ``Skips`` ledger, so a skip is counted by reason and summarised)."""
    if on_error == "raise":
        raise exc
    record(exc)


class ItemStream:
    """The SDK reader of one read plan: random access, ordered/shuffled/sharded iteration.

    The item index (one scan of the query's columns) is built on first use."""

    def __init__(self, plan: ReadPlan, index: ItemIndex | None = None) -> None:
        self.plan = plan
        self.options = plan.options
        self.load = ItemLoader(plan)
        self.skips = Skips()
        self._index = index
        self._rows: RowReader | None = None

    def __getstate__(self) -> dict:  # a copy in another process starts with no skips of its own
        return {"plan": self.plan, "index": self._index}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)  # type: ignore[misc]

    @property
    def index(self) -> ItemIndex:
        if self._index is None:
            self._index = build_index(self.plan)
        return self._index

    @property
    def rows(self) -> RowReader:
        if self._rows is None:
            self._rows = RowReader(self.plan, self.index,
                                   keep_groups=max(4, self.options.shuffle_window * 2))
        return self._rows

    def __len__(self) -> int:
        return len(self.index)

    @property
    def skipped(self) -> int:
        return self.skips.count

    def item(self, position: int) -> dict:
        """One item; always raises on a bad blob (a caller asked for this exact item)."""
        return self.load(self.rows.row(position))

    def group_keys(self) -> np.ndarray:
        """Row-group key per position (file * 2**20 + group), for block shuffling."""
        index = self.index
        keys = np.empty(len(index), dtype=np.int64)
        for f in range(len(index.files)):
            sel = np.flatnonzero(index.file_of == f)
            groups = np.searchsorted(self.rows.bounds(f), index.row_of[sel], side="right") - 1
            keys[sel] = f * (1 << 20) + groups
        return keys

    def positions(self, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                  shard_id: int = 0, num_shards: int = 1) -> np.ndarray:
        """The positions one reader visits in one epoch (see ``orchestrator.stream.order``)."""
        keys = self.group_keys() if shuffle else np.arange(len(self.index))
        order = epoch_order(keys, shuffle=shuffle, seed=seed, epoch=epoch,
                            window=self.options.shuffle_window)
        return shard(order, shard_id, num_shards)

    def iter_items(self, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                   shard_id: int = 0, num_shards: int = 1) -> Iterator[dict]:
        """Items in stable order, or a deterministic block shuffle for (seed, epoch); optionally
        one shard of ``num_shards`` (shards are disjoint and cover the slice exactly once)."""
        return self.iterate(self.positions(shuffle=shuffle, seed=seed, epoch=epoch,
                                           shard_id=shard_id, num_shards=num_shards))

    def iterate(self, positions: np.ndarray) -> Iterator[dict]:
        """Items at ``positions`` in that order, fetched ahead on a thread pool.

        Exactly once or not at all: an item is yielded, or skipped as an ``ItemError`` under
        ``on_error="skip"`` (counted in ``skips``, one summary warning when the pass ends), or
        the pass stops with the error. A store outage past the retry deadline always stops it.
        """
        opts = self.options
        pending: deque[tuple[int, Future]] = deque()
        skipped_here = Skips()

        def record(exc: ItemError) -> None:
            skipped_here.add(exc)
            self.skips.add(exc)

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
                    pending.append((pos, pool.submit(self.load, self.rows.row(pos))))
                if not pending:
                    finished = True
                    return
                _, fut = pending.popleft()
                try:
                    item = fut.result()
                except ItemError as exc:
                    apply_error_policy(exc, opts.on_error, record)
                    continue
                yield item
        finally:
            # On an error or an abandoned pass, queued fetches are cancelled and running ones
            # are not waited for (they end on their own within the store's outage deadline),
            # so the error reaches the caller now, not after every in-flight fetch gave up too.
            pool.shutdown(wait=finished, cancel_futures=True)
            if skipped_here.count:
                warnings.warn(skipped_here.summary(self.plan.what), stacklevel=2)
