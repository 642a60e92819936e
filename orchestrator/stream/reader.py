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

from orchestrator.errors import ConfigError, ItemError, OrchestratorError
from orchestrator.manifest import LabelMap
from orchestrator.stream.cache import BlobCache, node_cache
from orchestrator.stream.decode import decode_image, make_item
from orchestrator.stream.index import ItemIndex, RowReader

if TYPE_CHECKING:
    from orchestrator.access.policy import ReadView
    from orchestrator.store import BlobStore, Store

log = logging.getLogger(__name__)
OnError = Literal["skip", "raise"]


@dataclass
class StreamOptions:
    """How items are read. ``prefetch``: items fetched ahead of the consumer; ``threads``: fetch
    and decode workers; ``on_error``: ``skip`` a missing or corrupt blob with a warning (and count
    it in ``skipped``) or ``raise`` ``ItemError``; ``cache``: the blob cache (default: this
    process's node cache)."""

    prefetch: int = 16
    threads: int = 8
    on_error: OnError = "skip"
    decode: bool = True
    shuffle_window: int = 4
    cache: BlobCache | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.on_error not in ("skip", "raise"):
            raise ConfigError(f"on_error must be 'skip' or 'raise', got {self.on_error!r}")
        if self.prefetch < 1 or self.threads < 1:
            raise ConfigError("prefetch and threads must be >= 1")

    @property
    def blob_cache(self) -> BlobCache:
        return self.cache if self.cache is not None else node_cache()


def fetch_blob(blobs: "BlobStore", cache: BlobCache, blob: str) -> bytes:
    """The blob's bytes from the node cache, else from the store (then cached)."""
    return cache.get_or_fetch(blob, lambda: blobs.get(blob))


def load_item(
    blobs: "BlobStore", cache: BlobCache, row: dict, label_map: LabelMap, version: int, decode: bool = True
) -> dict:
    """Fetch and decode one manifest row into an item dict; errors name the item."""
    try:
        data = fetch_blob(blobs, cache, row["blob"])
    except ItemError as exc:
        raise ItemError(f"item {row['item_id']!r}: {exc.message}", hint=exc.hint) from None
    except OrchestratorError as exc:
        raise ItemError(f"item {row['item_id']!r}: cannot fetch its blob: {exc.message}") from exc
    image = decode_image(data, row["item_id"]) if decode else None
    return make_item(row, image, label_map, version)


class ItemStream:
    """Reads items of one pinned, indexed slice."""

    def __init__(self, store: "Store", dataset: str, index: ItemIndex, label_map: LabelMap,
                 version: int, options: StreamOptions, access: "ReadView | None" = None) -> None:
        self.store = store
        self.blobs = store.blobs(dataset)
        self.index = index
        self.label_map = label_map
        self.version = version
        self.options = options
        self.rows = RowReader(store, index, keep_groups=max(4, options.shuffle_window * 2),
                              access=access)
        self.skipped = 0

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
        """Items at ``positions`` in that order, fetched ahead on a thread pool."""
        opts = self.options
        cache = opts.blob_cache
        blobs = self.blobs
        pending: deque[tuple[int, Future]] = deque()
        with ThreadPoolExecutor(max_workers=opts.threads, thread_name_prefix="orchestrator-fetch") as pool:
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
                    return
                _, fut = pending.popleft()
                try:
                    item = fut.result()
                except ItemError as exc:
                    if opts.on_error == "raise":
                        for _, f in pending:
                            f.cancel()
                        raise
                    self.skipped += 1
                    warnings.warn(f"skipped: {exc.message}", stacklevel=2)
                    continue
                yield item
