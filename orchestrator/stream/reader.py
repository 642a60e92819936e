"""The one reader: manifest row → blob (through the cache, verified) → pixels → item, under one
error policy, for every read path.

``ItemLoader`` is the fetch-and-decode step (the SDK's thread pool and the Ray read tasks both
call it), ``apply_error_policy`` the one policy for a bad item, and ``ItemStream`` the SDK reader
of a read plan: the manifest rows are read in order on the calling thread; blob fetch and decode
run on a small thread pool with a bounded look-ahead (``prefetch``), so at most ``prefetch``
images are in memory beyond the one the consumer holds. Order is preserved.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from orchestrator.blobs import BlobStore
from orchestrator.errors import ItemError
from orchestrator.manifest import LabelMap
from orchestrator.packs import plan_reads
from orchestrator.stream.buffers import BufferPool
from orchestrator.stream.cache import BlobCache, node_cache
from orchestrator.stream.decode import decode_image, image_size_wh
from orchestrator.stream.index import ItemIndex, RowReader, ShippedRows, build_index
from orchestrator.stream.item import ItemRow
from orchestrator.stream.memory import limit_arenas, trim_heap
from orchestrator.stream.order import epoch_order
from orchestrator.stream.plan import OnError, ReadPlan, StreamOptions
from orchestrator.stream.skips import Skips

__all__ = ["ItemLoader", "ItemStream", "RequestCounts", "StreamOptions", "apply_error_policy", "fetch_blob"]

log = logging.getLogger(__name__)


def fetch_blob(blobs: BlobStore, cache: BlobCache, blob: str) -> bytes:
    """The blob's bytes from the node cache, else from the store (verified, then cached)."""
    return cache.get_or_fetch(blob, lambda: blobs.get(blob))


@dataclass
class RequestCounts:
    """Media requests one ``ItemLoader`` made to the store and the bytes they returned.

    What reading cost the store: a merged range request also returns the bytes between the
    wanted items (up to ``packs.DEFAULT_MERGE_GAP``), so ``bytes`` can exceed the items' own
    bytes (``CacheStats.bytes_fetched``); two readers of overlapping ranges both count theirs.
    Thread-safe (fetch threads add concurrently); a pickled copy starts at zero."""

    requests: int = 0
    bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.requests += 1
            self.bytes += nbytes

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {"requests": self.requests, "bytes_requested": self.bytes}

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()  # type: ignore[misc]


class ItemLoader:
    """Fetch and decode manifest rows into items: the one fetch-and-decode step.

    A row's bytes come from the cache (by hash), else from its pack (a range of it) or its loose
    blob, and are checked against the hash before they are cached or decoded. ``fetch_many``
    fetches the bytes of many rows with as few requests as their layout allows (packed rows
    coalesced by ``packs.plan_reads``). Raises (or returns) ``ItemError`` naming the item only
    for a missing, corrupt or undecodable blob; a store that does not answer raises
    ``StoreUnavailable`` after the retry deadline, and every other store error (access denied)
    as it is: those are never the item's fault. With ``image_size`` in the plan's options,
    images are decoded straight to that size and geometry scaled to it (``stream.decode``,
    ``stream.item``): every read path gets sized items from here, so no full-size image leaves
    this step. Picklable (the cache is this process's node cache unless the plan's options
    name one)."""

    def __init__(self, plan: ReadPlan) -> None:
        self.blobs = plan.blobs
        self.packs = plan.packs
        self.label_map: LabelMap = plan.label_map
        self.version = plan.version
        self.decode = plan.options.decode
        self.size = image_size_wh(plan.options.image_size)
        self._cache = plan.options.cache
        self.requests = RequestCounts()
        #: Where full-size JPEGs are decoded into (``stream.buffers``): a Ray read worker's pool;
        #: None (every other path) allocates each image.
        self.buffers: BufferPool | None = None

    @property
    def cache(self) -> BlobCache:
        return self._cache if self._cache is not None else node_cache()

    def __call__(self, row: ItemRow) -> dict[str, Any]:
        try:
            return self.item(row, self.media(row))
        except ItemError as exc:
            raise _named(exc, row.item_id) from None

    def media(self, row: ItemRow) -> bytes:
        """One row's bytes: cache, else one request (a pack range or the loose blob)."""
        return self.media_of(row.item_id, row.blob, row.size_bytes, row.pack, row.pack_offset)

    def media_of(self, item_id: str, blob: str, size_bytes: int | None, pack: str | None,
                 pack_offset: int | None) -> bytes:
        """An item's bytes from where its manifest row says they are (``media`` of a row
        that is not at hand as an ``ItemRow``: a browser's thumbnail request names them)."""
        try:
            return self.cache.get_or_fetch(blob, lambda: self._read_at(blob, size_bytes, pack, pack_offset))
        except ItemError as exc:
            raise _named(exc, item_id) from None

    def item(self, row: ItemRow, data: bytes | ItemError) -> dict[str, Any]:
        """The item of a row whose bytes were fetched (or whose fetch failed with ``data``)."""
        if isinstance(data, ItemError):
            raise data
        image = decode_image(data, row.item_id, self.size, self.buffers) if self.decode else None
        return row.item(image, self.version, self.size)

    def _read_at(self, blob: str, size_bytes: int | None, pack: str | None, pack_offset: int | None) -> bytes:
        if pack is None:
            data = self.blobs.get(blob)
        else:
            data = self.packs.get(pack, pack_offset, size_bytes, blob)  # type: ignore[arg-type]
        self.requests.add(len(data))
        return data

    def fetch_many(self, rows: Sequence[ItemRow]) -> list[bytes | ItemError]:
        """The bytes of each row (or the ``ItemError`` that explains why not), in order: cached
        rows from the cache, packed rows by merged range requests, loose ones a GET each."""
        out: list[bytes | ItemError | None] = [self.cache.lookup(r.blob) for r in rows]
        todo = [i for i, data in enumerate(out) if data is None]
        reads = plan_reads([(rows[i].pack, rows[i].pack_offset, rows[i].size_bytes) for i in todo])  # type: ignore[misc]
        for read in reads:
            members = [(todo[j], rel, n) for j, rel, n in read.members]
            if read.pack is None:
                (i, _, _), = members
                try:
                    out[i] = self.media(rows[i])
                except ItemError as exc:
                    out[i] = exc
                continue
            try:
                data = self.packs.read_range(read.pack, read.start, read.end)
                self.requests.add(len(data))
            except ItemError as exc:
                for i, _, _ in members:
                    out[i] = _named(exc, rows[i].item_id)
                continue
            for i, rel, n in members:
                try:
                    row = rows[i]
                    out[i] = self.packs.checked(data[rel:rel + n], row.blob, row.pack, row.pack_offset)  # type: ignore[arg-type]
                    self.cache.store(row.blob, out[i])  # type: ignore[arg-type]
                except ItemError as exc:
                    out[i] = _named(exc, rows[i].item_id)
        return out  # type: ignore[return-value]


def _named(exc: ItemError, item_id: str) -> ItemError:
    """``exc`` with the item's id in front (once)."""
    if exc.message.startswith(f"item {item_id!r}"):
        return exc
    return ItemError(f"item {item_id!r}: {exc.message}", hint=exc.hint, reason=exc.reason)


def apply_error_policy(exc: ItemError, on_error: OnError, record: Callable[[ItemError], None]) -> None:
    """The one policy for a bad item: ``raise`` re-raises it; ``skip`` records it (every path
    records into a ``Skips`` ledger, so a skip is counted by reason and summarised)."""
    if on_error == "raise":
        raise exc
    record(exc)


class ItemStream:
    """The SDK reader of one read plan: random access, ordered/shuffled/sharded iteration.

    The item index (one scan of the query's columns) is built on first use. ``rows``: the
    index's manifest rows already read (a Ray read task's ``ShippedRows``); else they are read
    from the manifest as needed (``RowReader``)."""

    def __init__(self, plan: ReadPlan, index: ItemIndex | None = None, rows: ShippedRows | None = None) -> None:
        self.plan = plan
        self.options = plan.options
        self.load = ItemLoader(plan)
        self.skips = Skips()
        self._index = index
        self._rows: RowReader | ShippedRows | None = rows

    def __getstate__(self) -> dict:  # a copy in another process starts with no skips of its own
        return {"plan": self.plan, "index": self._index}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def with_options(self, options: StreamOptions) -> ItemStream:
        """The same slice read with ``options`` (e.g. another ``image_size``): it shares this
        stream's item index (no second scan) and its skip ledger, so what it skips counts
        where this stream's skips are counted (``Dataset.skips``)."""
        other = ItemStream(self.plan.with_options(options), self.index)
        other.skips = self.skips
        return other

    @property
    def index(self) -> ItemIndex:
        if self._index is None:
            self._index = build_index(self.plan)
        return self._index

    @property
    def rows(self) -> RowReader | ShippedRows:
        if self._rows is None:
            # A shuffled pass reads rows from the ``shuffle_window`` row groups of its window;
            # one more covers a block straddling two windows. More would only hold memory.
            self._rows = RowReader(self.plan, self.index, keep_groups=self.options.shuffle_window + 1)
        return self._rows

    @property
    def row_reader(self) -> RowReader:
        """The manifest reader (a stream on shipped rows has none: it cannot block-shuffle)."""
        rows = self.rows
        if not isinstance(rows, RowReader):
            raise TypeError("a stream on shipped rows reads them in the order given")
        return rows

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
            groups = np.searchsorted(self.row_reader.bounds(f), index.row_of[sel], side="right") - 1
            keys[sel] = f * (1 << 20) + groups
        return keys

    def positions(self, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                  shard_id: int = 0, num_shards: int = 1) -> np.ndarray:
        """The positions one reader visits in one epoch (see ``orchestrator.stream.order``):
        shard ``shard_id`` of ``num_shards`` is whole runs of adjacent items (at most its first
        and last run cut), so readers of different shards never request the same pack bytes."""
        keys = self.group_keys() if shuffle else np.arange(len(self.index))
        opts = self.options
        return epoch_order(keys, shuffle=shuffle, seed=seed, epoch=epoch, window=opts.shuffle_window,
                           run=opts.shuffle_run, buffer=opts.shuffle_buffer, shard_id=shard_id,
                           num_shards=num_shards)

    def iter_items(self, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                   shard_id: int = 0, num_shards: int = 1) -> Iterator[dict]:
        """Items in stable order, or a deterministic block shuffle for (seed, epoch); optionally
        one shard of ``num_shards`` (shards are disjoint and cover the slice exactly once)."""
        return self.iterate(self.positions(shuffle=shuffle, seed=seed, epoch=epoch,
                                           shard_id=shard_id, num_shards=num_shards))

    def iterate(self, positions: np.ndarray) -> Iterator[dict]:
        """Items at ``positions`` in that order, fetched ahead on thread pools.

        Positions are taken in chunks of about ``read_ahead_mb`` of media (at most two chunks are
        fetched or held at a time); within a chunk, packed items are fetched by merged range
        requests (``packs.plan_reads``), so a sequential pass makes about one request per
        ``max_request`` bytes; ``prefetch`` items are decoded ahead of the consumer.

        Exactly once or not at all: an item is yielded, or skipped as an ``ItemError`` under
        ``on_error="skip"`` (counted in ``skips``, one summary warning when the pass ends), or
        the pass stops with the error. A store outage past the retry deadline always stops it.
        """
        opts = self.options
        skipped_here = Skips()

        def record(exc: ItemError) -> None:
            skipped_here.add(exc)
            self.skips.add(exc)

        limit_arenas()  # before the threads below take arenas of their own (stream.memory)
        fetch_pool = ThreadPoolExecutor(max_workers=opts.threads, thread_name_prefix="orchestrator-fetch")
        decode_pool = ThreadPoolExecutor(max_workers=opts.decoders, thread_name_prefix="orchestrator-decode")
        chunks = self._chunks(positions, opts.read_ahead_mb << 20)
        planned: deque[tuple[ItemRow, Future, int]] = deque()
        pending: deque[Future] = deque()
        last_chunk = 0
        more = True
        finished = False

        def plan_next() -> bool:
            nonlocal last_chunk
            chunk = next(chunks, None)
            if chunk is None:
                return False
            trim_heap()  # the previous chunk's request buffers are freed by now (stream.memory)
            planned.extend(self._submit_fetches(fetch_pool, chunk))
            last_chunk = len(chunk)
            return True

        try:
            more = plan_next()
            while True:
                if more and len(planned) <= last_chunk:  # into the newest chunk: fetch the next
                    more = plan_next()
                while len(pending) < opts.prefetch and planned:
                    row, fut, k = planned.popleft()
                    pending.append(decode_pool.submit(self._decode_member, row, fut, k))
                if not pending:
                    finished = True
                    return
                try:
                    item = pending.popleft().result()
                except ItemError as exc:
                    apply_error_policy(exc, opts.on_error, record)
                    continue
                yield item
        finally:
            # On an error or an abandoned pass, queued work is cancelled and running work is
            # not waited for (it ends on its own within the store's outage deadline), so the
            # error reaches the caller now, not after every in-flight fetch gave up too.
            decode_pool.shutdown(wait=finished, cancel_futures=True)
            fetch_pool.shutdown(wait=finished, cancel_futures=True)
            if skipped_here.count:
                warnings.warn(skipped_here.summary(self.plan.what), stacklevel=2)

    def _chunks(self, positions: np.ndarray, budget: int) -> Iterator[list[ItemRow]]:
        """Manifest rows of ``positions`` in order, cut into chunks of about ``budget`` bytes of
        media (at most 4,096 rows)."""
        chunk: list[ItemRow] = []
        size = 0
        for start in range(0, len(positions), 256):
            for row in self.rows.rows(positions[start:start + 256]):
                chunk.append(row)
                size += row.size_bytes or 0
                if size >= budget or len(chunk) >= 4096:
                    yield chunk
                    chunk, size = [], 0
        if chunk:
            yield chunk

    def _submit_fetches(self, pool: ThreadPoolExecutor, rows: list[ItemRow]) -> list[tuple[ItemRow, Future, int]]:
        """One fetch task per planned request of ``rows``; per row (in order): the row, the
        future of its request's bytes and its index in that result."""
        reads = plan_reads([(r.pack, r.pack_offset, r.size_bytes) for r in rows])  # type: ignore[misc]
        reads.sort(key=lambda read: min(i for i, _, _ in read.members))  # the consumer's order
        where: list[tuple[Future, int] | None] = [None] * len(rows)
        for read in reads:
            members = [i for i, _, _ in read.members]
            fut = pool.submit(self.load.fetch_many, [rows[i] for i in members])
            for k, i in enumerate(members):
                where[i] = (fut, k)
        return [(row, *w) for row, w in zip(rows, where, strict=True)]  # type: ignore[misc]

    def _decode_member(self, row: ItemRow, fut: Future, k: int) -> dict[str, Any]:
        return self.load.item(row, fut.result()[k])
