"""PyTorch: an IterableDataset that splits a slice across DataLoader workers and ranks.

Shard = rank * num_workers + worker id, out of world_size * num_workers: every item is seen
exactly once per epoch in total, and each shard is whole runs of adjacent items
(``stream.order``), so each worker fetches its own pack ranges. ``set_epoch(n)`` changes the
shuffle, as with DistributedSampler; the epoch is shared memory, so persistent workers see it.

Two ways to batch. Recommended: ``Dataset.dataloader(batch_size=32, num_workers=2)`` (or
``TorchItems(batch_size=...)`` in ``DataLoader(batch_size=None)``): each worker collates its own
items into one batch (``stream.batch``: flat values plus offsets) and ships it to the main
process in one shared-memory buffer (``SharedBatch``). Per item (``batch_size=None``): items cross one at a time, and
``collate_items`` batches them in the main process into the same layout.
"""

from __future__ import annotations

import multiprocessing
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from orchestrator.adapters import segments
from orchestrator.errors import ITEM_ERROR_REASONS, ConfigError
from orchestrator.optional import require
from orchestrator.stream.batch import collate
from orchestrator.stream.order import shard_bounds
from orchestrator.stream.skips import Skips

torch = require("torch")
from torch.utils.data import DataLoader, IterableDataset, get_worker_info  # noqa: E402

if TYPE_CHECKING:
    from orchestrator.stream.reader import ItemStream

#: What ``TorchItems.fetch_stats`` sums over processes: the readers' store requests and bytes
#: (``stream.reader.RequestCounts``) and their blob caches' counters (``stream.cache.CacheStats``).
FETCH_STATS = ("requests", "bytes_requested", "memory_hits", "disk_hits", "misses", "bytes_fetched")

#: Batches each DataLoader worker prepares ahead in ``Dataset.dataloader`` (DataLoader's own
#: default): with 32-item batches and 2 workers, 128 decoded items in flight at most.
DEFAULT_PREFETCH_FACTOR = 2


class TorchItems(IterableDataset):
    """Items of a dataset slice as torch-friendly dicts (image stays HWC uint8, as a tensor), or,
    with ``batch_size``, batches of them (``stream.batch`` layout, as tensors).

    Built on the slice's ``ItemStream`` (its read plan and index), which is what DataLoader
    workers receive. ``size``: the slice's item count if already known (saves an index build
    for ``len``). ``transform`` is applied to each item, or with ``batch_size`` to each batch
    (in the worker, after collation). A worker's last batch may be short (its shard's
    remainder)."""

    def __init__(self, stream: ItemStream, *, shuffle: bool = False, seed: int = 0,
                 transform: Callable[[dict], Any] | None = None,
                 rank: int | None = None, world_size: int | None = None, size: int | None = None,
                 batch_size: int | None = None) -> None:
        super().__init__()
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ConfigError(f"batch_size must be an integer >= 1 (or None: one item at a time), got {batch_size!r}",
                              hint="with batch_size set, use DataLoader(..., batch_size=None): the "
                                   "workers already batch")
        self.stream = stream
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        self.transform = transform
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        #: DataLoader workers this dataset is read by (set by ``dataloader``): with
        #: ``batch_size``, ``len`` counts batches, which depends on it.
        self.loader_workers: int | None = None
        # Shared memory handed to DataLoader workers when they start, so that they see
        # ``set_epoch`` (persistent workers keep the dataset copy they started with) and the
        # caller sees their skips and fetch counters.
        self._epoch = multiprocessing.Value("q", 0)
        self._by_reason = multiprocessing.Array("q", len(ITEM_ERROR_REASONS))
        self._fetched = multiprocessing.Array("q", len(FETCH_STATS))

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch`` of the shuffle from the next ``iter()`` on, in this process and
        in every DataLoader worker (persistent or not). Call it before iterating the loader."""
        self._epoch.value = int(epoch)

    @property
    def skips(self) -> Skips:
        """Items skipped (missing, corrupt or undecodable blob) by every process that iterated
        this dataset, DataLoader workers included, by reason (each worker also warns once per
        epoch, with the first messages)."""
        with self._by_reason.get_lock():
            counts = list(self._by_reason)
        return Skips(by_reason=Counter({r: n for r, n in zip(ITEM_ERROR_REASONS, counts) if n}))

    @property
    def skipped(self) -> int:
        """How many items ``skips`` counts."""
        return self.skips.count

    def fetch_stats(self) -> dict[str, int]:
        """Store requests and bytes, and cache hits and misses, of every pass over this dataset
        that has ended (or been abandoned), summed over the processes that made them,
        DataLoader workers included (``FETCH_STATS``; ``bytes_requested`` counts whole merged
        ranges, ``bytes_fetched`` the items' own bytes). In the main process the counters are
        those of the process's cache and reader during the pass."""
        with self._fetched.get_lock():
            return dict(zip(FETCH_STATS, (int(v) for v in self._fetched), strict=True))

    def _rank_world(self) -> tuple[int, int]:
        if self.rank is not None or self.world_size is not None:
            return self.rank or 0, self.world_size or 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def shard(self) -> tuple[int, int]:
        """(shard id, number of shards) for the calling process and worker."""
        rank, world = self._rank_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world * workers

    def _counters(self) -> Counter:
        counts = Counter(self.stream.load.requests.as_dict())
        counts.update(self.stream.load.cache.stats.as_dict())
        return counts

    def __iter__(self) -> Iterator[Any]:
        shard_id, num_shards = self.shard()
        skips_before = Counter(self.stream.skips.by_reason)
        counts_before = self._counters()
        try:
            items = self.stream.iter_items(shuffle=self.shuffle, seed=self.seed, epoch=self.epoch,
                                           shard_id=shard_id, num_shards=num_shards)
            if self.batch_size is None:
                for item in items:
                    item = to_tensors(item)
                    yield self.transform(item) if self.transform is not None else item
            else:
                in_worker = get_worker_info() is not None
                for batch in _chunks(items, self.batch_size):
                    # Tensors already, also in a worker: DataLoader's default_convert would make
                    # them of the numpy arrays with torch's read-only warning (decoded images
                    # view Pillow's bytes).
                    out = batch_to_torch(collate(batch))
                    if self.transform is not None:
                        out = self.transform(out)
                    # A worker's batch crosses to the main process as one shared buffer.
                    yield SharedBatch(out) if in_worker and isinstance(out, dict) else out
            if get_worker_info() is not None:
                # DataLoader ends its workers with a bounded join, then terminates them: their
                # queued cache writes would be lost (~5% of a cold epoch's blobs, measured), so a
                # worker's shard ends when its blobs are on disk.
                disk = self.stream.load.cache.disk
                if disk is not None:
                    disk.drain()
        finally:
            added = Counter(self.stream.skips.by_reason)
            added.subtract(skips_before)
            if any(n > 0 for n in added.values()):
                with self._by_reason.get_lock():
                    for k, reason in enumerate(ITEM_ERROR_REASONS):
                        self._by_reason[k] += max(0, added[reason])
            counts = self._counters()
            counts.subtract(counts_before)
            with self._fetched.get_lock():
                for k, name in enumerate(FETCH_STATS):
                    self._fetched[k] += max(0, counts[name])

    def __len__(self) -> int:
        """What this rank's workers yield together per epoch (with no skips): items, the rank's
        span of the epoch (``stream.order.shard_bounds``); with ``batch_size``, batches (each
        worker's last one may be short), which needs ``loader_workers`` (``dataloader`` sets
        it; else TypeError, as for an IterableDataset without a length: a guessed number of
        batches would mislead a progress bar or an LR schedule)."""
        rank, world = self._rank_world()
        n = self.size if self.size is not None else len(self.stream)
        if self.batch_size is None:
            return (rank + 1) * n // world - rank * n // world
        if self.loader_workers is None:
            raise TypeError("the number of batches depends on the DataLoader's num_workers: build the "
                            "loader with Dataset.dataloader() (or set loader_workers)")
        workers = max(1, self.loader_workers)
        batches = 0
        for worker in range(workers):
            lo, hi = shard_bounds(n, rank * workers + worker, world * workers)
            batches += -(-(hi - lo) // self.batch_size)
        return batches


def _chunks(items: Iterable[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def dataloader(items: TorchItems, num_workers: int = 2, **options: Any) -> DataLoader:
    """The recommended DataLoader over batching ``items`` (``TorchItems(batch_size=...)``):
    ``batch_size=None`` on the loader (the workers batch), persistent workers when there are
    any (their node caches and read-ahead survive epochs; ``set_epoch`` still reaches them) and
    ``prefetch_factor=DEFAULT_PREFETCH_FACTOR``. ``options`` go to DataLoader as given
    (``pin_memory``, ``multiprocessing_context``, ...) and override those defaults."""
    if items.batch_size is None:
        raise ConfigError("dataloader() takes a batching TorchItems (batch_size set)",
                          hint="use to_pytorch(batch_size=32), or Dataset.dataloader(batch_size=32)")
    if "batch_size" in options and options["batch_size"] is not None:
        raise ConfigError(f"the loader's batch_size must be None, got {options['batch_size']!r}",
                          hint="the workers batch: set the batch size on the dataset instead")
    defaults: dict[str, Any] = {"batch_size": None, "num_workers": num_workers}
    items.loader_workers = num_workers
    if num_workers > 0:
        defaults.update(persistent_workers=True, prefetch_factor=DEFAULT_PREFETCH_FACTOR)
        # Index the slice once, here: the workers get it with the stream (12 bytes an item)
        # instead of each scanning the manifest before its first batch.
        items.stream.index  # noqa: B018 - built on first access
    return DataLoader(items, **{**defaults, **options})


def _tensor(array: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` (no copy), also of a read-only array without torch's warning: a
    decoded image views the bytes Pillow returned, which nothing else holds or reads, so the
    write torch warns about cannot surprise anyone, and a copy would cost ~4% of a decode."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def to_tensors(item: dict) -> dict:
    """An item with ``image``, ``boxes``, ``labels`` and ``polygons`` as tensors (no copies)."""
    out = dict(item)
    if item["image"] is not None:
        out["image"] = _tensor(item["image"])
    out["boxes"] = torch.from_numpy(item["boxes"])
    out["labels"] = torch.from_numpy(item["labels"])
    out["polygons"] = [torch.from_numpy(p) for p in item["polygons"]]
    return out


def batch_to_torch(batch: dict[str, Any]) -> dict[str, Any]:
    """A ``stream.batch`` batch with every numpy array as a tensor sharing its memory
    (``torch.from_numpy``: no copies); a list of images becomes a list of tensors (None kept).
    Lists of strings and dicts stay lists. ``batch_to_numpy`` is the inverse."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, np.ndarray):
            out[key] = _tensor(value)
        elif key == "image":
            out[key] = [None if im is None else _tensor(np.asarray(im)) for im in value]
        else:
            out[key] = value
    return out


def _packable(value: Any) -> bool:
    """A dense CPU tensor without autograd, or a numeric/bool numpy array: raw bytes + dtype."""
    if isinstance(value, torch.Tensor):
        return value.device.type == "cpu" and value.layout == torch.strided and not value.requires_grad
    return isinstance(value, np.ndarray) and value.dtype.kind in "biuf"


class SharedBatch(dict):
    """A worker's batch that reaches the main process as tensors in one shared-memory buffer.

    Why: DataLoader shares each tensor of a batch through its own shared-memory segment and
    passes its file descriptor over a new socket connection (with an HMAC handshake): ~40 per
    batch here (one per image of a list, plus boxes, labels, offsets ...). Profiled on 2 cores
    (3,000 items, batches of 32), that was ~35% of the CPU of the whole loader. Packed, a
    batch is one segment and one descriptor, for one copy of its bytes in the worker.

    Top-level tensors and numpy arrays (numeric), and lists of them (``image``; None kept),
    arrive as tensors viewing the buffer (writable); every other value is pickled as it is.
    The main process receives a plain dict."""

    def __copy__(self) -> SharedBatch:  # DataLoader's default_convert copies mappings
        return SharedBatch(self)

    def __reduce__(self) -> tuple:
        layout: list[tuple[str, int | None, int, torch.dtype, tuple[int, ...]]] = []
        parts: list[tuple[int, np.ndarray]] = []
        rest: dict[str, Any] = {}
        offset = 0

        def add(key: str, index: int | None, value: Any) -> None:
            nonlocal offset
            if isinstance(value, torch.Tensor):  # any dtype (bfloat16 has no numpy twin)
                tensor = value.contiguous()
                dtype, shape = tensor.dtype, tuple(tensor.shape)
                raw = tensor.reshape(-1).view(torch.uint8).numpy()
            else:
                array = np.ascontiguousarray(value)
                dtype, shape = torch.from_numpy(np.empty(0, array.dtype)).dtype, tuple(array.shape)
                raw = array.reshape(-1).view(np.uint8)
            layout.append((key, index, offset, dtype, shape))
            parts.append((offset, raw))
            offset += -(-len(raw) // 16) * 16  # aligned for any dtype's view

        for key, value in self.items():
            if _packable(value):
                add(key, None, value)
            elif (isinstance(value, list) and value
                  and all(v is None or _packable(v) for v in value) and any(v is not None for v in value)):
                rest[key] = [None] * len(value)
                for i, v in enumerate(value):
                    if v is not None:
                        add(key, i, v)
            else:
                rest[key] = value
        lent = segments.lend(max(offset, 1)) if get_worker_info() is not None else None
        if lent is not None:  # a segment of the worker's pool (``adapters.segments``)
            ref, buffer = lent
            for start, data in parts:
                buffer[start:start + len(data)] = data
            return _unpack_lent, (ref, layout, rest, list(self))
        flat = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(max(offset, 1)))
        buffer = flat.numpy()
        for start, data in parts:
            buffer[start:start + len(data)] = data
        return _unpack_batch, (flat, layout, rest, list(self))


def _unpack_lent(ref: segments.SegmentRef, layout: list, rest: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """The batch of a ``SharedBatch`` shipped in a pooled segment: views of it, which keep the
    segment lent until the last of them is gone."""
    return _unpack_batch(torch.from_numpy(segments.receive(ref)), layout, rest, order)


def _unpack_batch(flat: torch.Tensor, layout: list, rest: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """The batch of a ``SharedBatch``: views of ``flat``, keys in their original order."""
    out = dict(rest)
    for key, index, offset, dtype, shape in layout:
        count = int(np.prod(shape, dtype=np.int64))
        view = flat[offset:offset + count * dtype.itemsize].view(dtype).view(shape)
        if index is None:
            out[key] = view
        else:
            out[key][index] = view
    return {key: out[key] for key in order}


def batch_to_numpy(batch: dict[str, Any]) -> dict[str, Any]:
    """A batch of tensors (``batch_to_torch``) back as numpy arrays (CPU tensors: no copies),
    ready for ``stream.batch.uncollate``."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.numpy()
        elif key == "image":
            out[key] = [im.numpy() if isinstance(im, torch.Tensor) else im for im in value]
        else:
            out[key] = value
    return out


def _as_numpy_item(item: dict) -> dict:
    out = dict(item)
    for key in ("image", "boxes", "labels"):
        if isinstance(out.get(key), torch.Tensor):
            out[key] = out[key].numpy()
    if "polygons" in out:
        out["polygons"] = [p.numpy() if isinstance(p, torch.Tensor) else p for p in out["polygons"]]
    return out


def collate_items(items: list[dict]) -> dict:
    """``collate_fn`` for a DataLoader over per-item ``TorchItems``: the items (tensors or
    numpy) as one ``stream.batch`` batch of tensors, the layout the batching path ships.
    Prefer ``Dataset.dataloader``, which batches in the workers."""
    return batch_to_torch(collate([_as_numpy_item(item) for item in items]))
