"""A dataset version as a Python object: pinned on open, so every read sees the same rows."""

from __future__ import annotations

import builtins
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from orchestrator.access.policy import ReadView
from orchestrator.errors import DatasetNotFound, QueryError
from orchestrator.manifest import LabelMap, Snapshot, VersionInfo, with_label_names
from orchestrator.query.compile import (
    CompiledQuery,
    QueryContext,
    combine,
    compile_query,
    named_fields,
    named_labels,
    unknown_attribute_error,
)
from orchestrator.query.parse import Compare, Field, to_text
from orchestrator.scan import ScanStats, read_rows, sum_labels
from orchestrator.storage_errors import store_call
from orchestrator.stream.plan import ReadPlan, StreamOptions
from orchestrator.stream.reader import ItemStream
from orchestrator.stream.skips import Skips
from orchestrator.stream.split import HashSplit

if TYPE_CHECKING:
    import ray.data
    import tensorflow as tf
    import torch.utils.data

    from orchestrator.adapters.ray import SkipLedger
    from orchestrator.adapters.torch import TorchItems
    from orchestrator.diff import DatasetDiff
    from orchestrator.export import ExportReport
    from orchestrator.stats import DatasetStats
    from orchestrator.store import Store
    from orchestrator.store_location import StoreLocation


class Dataset:
    """One version of a dataset, optionally sliced by a query.

    ``store.dataset(name)`` pins the latest version at open time; later commits do not change
    what this object reads. ``slice`` is lazy: it type-checks the query at once (a bad query
    fails before anything is read) and scans only when rows are needed.

    Under an access policy the principal's row filter is ANDed into every scan and hidden
    fields are removed from every row read, whatever the path (``ds[i]``, iteration, slices,
    framework adapters, Ray stages); queries may not name hidden fields.
    """

    def __init__(
        self, store: Store, name: str, version: int | None = None, *,
        options: StreamOptions | None = None,
        _snapshot: Snapshot | None = None, _queries: tuple[str, ...] = (),
        _access: ReadView | None = None,
    ) -> None:
        self.store = store
        self.name = name
        self.options = options or StreamOptions()
        self._snapshot: Snapshot = _snapshot or store_call(
            lambda: store.manifest(name).snapshot(version), location=store.location,
            action="open dataset", target=repr(name), policy=self.options.retry_policy(store.location))
        self._queries = _queries
        self._access = _access
        labels = self._snapshot.label_map.names
        hidden = _access.hidden_attributes if _access else frozenset()
        if _access is not None and _access.row_filter:  # the policy's filter may
            everything = (_access.row_filter, *_queries)
        else:
            everything = _queries
        later = self._labels_of_later_versions(everything, labels)
        for q in _queries:  # the caller's queries may not name hidden fields, nor keys no item has
            compile_query(q, QueryContext(labels, hidden, later))
            self._check_attribute_keys(q)
        self._query: CompiledQuery | None = (
            compile_query(combine(list(everything)), QueryContext(labels, absent_labels=later))
            if everything else None
        )
        self._len: int | None = None if everything else self._snapshot.rows  # a row filter too
        self.last_scan: ScanStats | None = None
        self._stream: ItemStream | None = None
        self._ray_ledgers: dict[str, SkipLedger] = {}  # name -> ledger of this object's to_ray pipelines
        self._plan = ReadPlan(store.handle, name, self._snapshot, self._query, _access, self.options)

    def _labels_of_later_versions(self, queries: tuple[str, ...], labels: tuple[str, ...]) -> frozenset[str]:
        """Labels the latest version knows and this one does not, when a query names a label
        this version does not know: they count 0 in every row here (labels are only ever added,
        so the latest version knows every label any version had). The latest version is read
        only when a query needs it."""
        named: set[str] = set()
        for q in queries:
            try:
                named |= named_labels(q)
            except QueryError:
                return frozenset()  # compile_query reports it, with its caret
        unknown = named - set(labels)
        if not unknown:
            return frozenset()
        latest = store_call(lambda: self.store.manifest(self.name).snapshot().label_map.names,
                            location=self.store.location, action="read the labels of dataset", target=repr(self.name))
        return frozenset(set(latest) - set(labels))  # all of them: a misspelt one gets suggestions

    def attribute_keys(self) -> list[str]:
        """The file-level attribute keys the items of this version have (that this principal
        may see), sorted; read from the manifest once per version."""
        return list(_attribute_keys(self.store.location, self._snapshot, self._access))

    def _check_attribute_keys(self, query: str) -> None:
        fields = named_fields(query, "attributes")
        if fields:
            keys = self.attribute_keys()
            for field in fields:
                if field.name not in keys:
                    raise unknown_attribute_error(query, field, keys)

    @property
    def plan(self) -> ReadPlan:
        """What every reader of this slice reads: the pinned snapshot, the compiled query (with
        the principal's row filter), the access view and the options; picklable, and what the
        framework adapters and Ray tasks receive."""
        return self._plan

    @property
    def version(self) -> int:
        return self._snapshot.version

    @property
    def query(self) -> str | None:
        """The slice as one query text (chained slices joined with ``and``), or None."""
        return combine(list(self._queries)) if self._queries else None

    @property
    def label_map(self) -> LabelMap:
        """Stable label ids: the same name has the same id in every version."""
        return self._snapshot.label_map

    def slice(self, query: str) -> Dataset:
        """Items of this dataset (and of any earlier slice) that match ``query``.

        ``ds.slice(a).slice(b)`` means both. Raises ``QueryError`` with a caret at once.
        """
        return Dataset(
            self.store, self.name, options=self.options, _snapshot=self._snapshot,
            _queries=(*self._queries, query), _access=self._access,
        )

    def with_options(self, **changes: Any) -> Dataset:
        """The same slice read with other ``StreamOptions`` (prefetch, threads, on_error, cache,
        image_size, ...)."""
        opts = self.options.replace(**changes)
        return Dataset(self.store, self.name, options=opts, _snapshot=self._snapshot,
                       _queries=self._queries, _access=self._access)

    def manifest_rows(self, columns: list[str] | None = None) -> pa.Table:
        """The manifest rows of this slice (only ``columns`` if given), as this principal may
        see them, with the ``labels`` counts named by label (``traffic light``, not the stored
        ``traffic%20light``); records ``last_scan``."""
        return with_label_names(self._rows(columns))

    def _rows(self, columns: list[str] | None) -> pa.Table:
        """The rows as stored (label fields encoded: what ``diff`` and ``stats`` decode)."""
        rows = self.plan.rows(columns)
        self.last_scan = rows.stats
        self._len = rows.table.num_rows
        return rows.table

    def item_ids(self) -> list[str]:
        """Ids of the items in this slice in position order: ``ds[i]["id"] == ds.item_ids()[i]``.

        That order (manifest file path, then row; see ``ItemIndex``) is the one ``ds[i]`` and
        unshuffled iteration use: ``scan`` reads the same files in the same order. It is stable
        for a pinned version but not sorted; sort the list for a canonical order.
        """
        return self._rows(["item_id"]).column("item_id").to_pylist()

    def get(self, item_id: str) -> dict[str, Any]:
        """The item with this id (in this slice, under this principal's row filter), read as
        ``ds[i]`` reads it. Only the manifest files whose statistics admit the id are scanned.
        Raises ``DatasetNotFound`` (a ``KeyError``) if the slice has no such item."""
        if not isinstance(item_id, str):
            raise TypeError(f"item ids are strings, not {type(item_id).__name__}")
        match = self.slice(to_text(Compare(Field("file", "item_id", 0), "=", item_id, 0)))
        if len(match.stream.index) == 0:
            where = f" matching {self.query!r}" if self.query else ""
            raise DatasetNotFound(
                f"dataset {self.name!r} version {self.version} has no item {item_id!r}{where}",
                hint="list the ids with ds.item_ids() or `orchestrator slice --ids`",
            )
        return match.stream.item(0)

    def __len__(self) -> int:
        """Item count: from the Delta log for a whole version; for a slice, a scan of the
        manifest columns the query needs (no blob is fetched)."""
        if self._len is None:
            if self._stream is not None:
                self._len = len(self._stream)
            else:
                self._rows(["item_id"])
        assert self._len is not None
        return self._len

    # -- streaming -------------------------------------------------------------------------
    @property
    def stream(self) -> ItemStream:
        """The indexed reader (built on first use: one scan of the query's columns)."""
        if self._stream is None:
            self._stream = ItemStream(self.plan)
            self._len = len(self._stream)
        return self._stream

    @overload
    def __getitem__(self, i: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, i: builtins.slice | Sequence[int] | np.ndarray) -> list[dict[str, Any]]: ...

    def __getitem__(self, i: Any) -> dict[str, Any] | list[dict[str, Any]]:
        """Item ``i`` (negative counts from the end): one manifest row group and one blob read.
        ``ds[i:j]`` (any slice) and ``ds[[i, j, k]]`` (a list or an integer array) give a list
        of items, in that order, as a notebook expects."""
        n = len(self.stream.index)
        if isinstance(i, builtins.slice):
            return [self.stream.item(k) for k in range(*i.indices(n))]
        if isinstance(i, (list, tuple, np.ndarray)):
            picked = np.asarray(i)
            if picked.size and not np.issubdtype(picked.dtype, np.integer):
                raise TypeError(f"dataset indices are integers, not {picked.dtype}")
            return [self[int(k)] for k in picked.reshape(-1)]
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
            raise TypeError(f"dataset indices are integers, slices or lists of integers, not {type(i).__name__}")
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} items")
        return self.stream.item(int(i) % n)

    def positions(self, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                  shard_id: int = 0, num_shards: int = 1) -> np.ndarray:
        """The positions one reader visits in one epoch (see ``orchestrator.stream.order``)."""
        return self.stream.positions(shuffle=shuffle, seed=seed, epoch=epoch, shard_id=shard_id,
                                     num_shards=num_shards)

    def iter_items(self, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                   shard_id: int = 0, num_shards: int = 1) -> Iterator[dict[str, Any]]:
        """Items in stable order, or a deterministic block shuffle for (seed, epoch); optionally
        one shard of ``num_shards`` (shards are disjoint and cover the slice exactly once)."""
        return self.stream.iter_items(shuffle=shuffle, seed=seed, epoch=epoch,
                                      shard_id=shard_id, num_shards=num_shards)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.iter_items()

    @property
    def skipped(self) -> int:
        """Items skipped so far by this object's reads (iteration, ``to_tensorflow``, ``to_ray``)
        because their blob was missing, corrupt or undecodable (on_error='skip'). A store
        outage is never counted here: it raises ``StoreUnavailable``."""
        return self.skips.count

    @property
    def skips(self) -> Skips:
        """The skip ledger: counts by reason and the first messages (see ``stream.skips``)."""
        total = Skips()
        if self._stream is not None:
            total.merge(self._stream.skips)
        for ledger in self._ray_ledgers.values():
            total.merge(ledger.read())
        return total

    def ray_skip_ledger(self) -> SkipLedger:
        """The ledger a ``to_ray`` pipeline of this object records its skips in (counted by
        ``skips``): the one named by ``StreamOptions.skip_ledger`` (a training run shares one
        across its workers' pipelines), else a new one that ends with this object."""
        from orchestrator.adapters.ray import SkipLedger

        ledger = SkipLedger.new(self.options.skip_ledger)
        if ledger.name not in self._ray_ledgers:
            self._ray_ledgers[ledger.name] = ledger
            if self.options.skip_ledger is None:
                weakref.finalize(self, ledger.close)
        return self._ray_ledgers[ledger.name]

    def cache_stats(self) -> dict[str, int]:
        """Hits, misses and bytes fetched from the store by this process's blob cache."""
        return self.options.blob_cache.stats.as_dict()

    def _sized_options(self, image_size: int | tuple[int, int] | None) -> StreamOptions:
        """This object's options, with ``image_size`` if one is given (validated)."""
        return self.options if image_size is None else self.options.replace(image_size=image_size)

    def _sized_stream(self, image_size: int | tuple[int, int] | None) -> ItemStream:
        """The indexed reader, or one reading at ``image_size`` (same index, same skip ledger)."""
        if image_size is None:
            return self.stream
        return self.stream.with_options(self._sized_options(image_size))

    def to_pytorch(self, shuffle: bool = False, seed: int = 0, transform: Any = None, *,
                   rank: int | None = None, world_size: int | None = None,
                   batch_size: int | None = None, image_size: int | tuple[int, int] | None = None) -> TorchItems:
        """A ``torch.utils.data.IterableDataset`` over this slice; see adapters.torch. With
        ``batch_size`` it yields batches (``stream.batch`` layout, collated in the DataLoader
        worker): use it with ``DataLoader(..., batch_size=None)``, or use ``dataloader``.
        ``image_size`` (int or (width, height)): images decoded straight to that size, boxes
        and polygons in its pixels (``StreamOptions.image_size``; default: this object's)."""
        from orchestrator.adapters.torch import TorchItems

        return TorchItems(self._sized_stream(image_size), shuffle=shuffle, seed=seed, transform=transform,
                          rank=rank, world_size=world_size, size=self._len, batch_size=batch_size)

    def dataloader(self, batch_size: int = 32, num_workers: int = 2, *, shuffle: bool = False, seed: int = 0,
                   transform: Any = None, rank: int | None = None, world_size: int | None = None,
                   image_size: int | tuple[int, int] | None = None,
                   **loader_options: Any) -> torch.utils.data.DataLoader:
        """The recommended PyTorch loader: a ``DataLoader`` whose ``num_workers`` workers each
        read whole runs of their own shard and ship collated batches of ``batch_size`` items
        (``stream.batch`` layout, as tensors), with persistent workers. Each epoch yields every
        item of this rank's share exactly once; call ``loader.dataset.set_epoch(n)`` before
        epoch ``n`` to reshuffle. ``transform`` is applied to each batch in the worker;
        ``image_size``: as for ``to_pytorch`` (with it, images stack into one tensor);
        ``loader_options`` go to DataLoader (see ``adapters.torch.dataloader``)."""
        from orchestrator.adapters.torch import dataloader

        items = self.to_pytorch(shuffle, seed, transform, rank=rank, world_size=world_size, batch_size=batch_size,
                                image_size=image_size)
        return dataloader(items, num_workers, **loader_options)

    def to_tensorflow(self, shuffle: bool = False, seed: int = 0, *,
                      image_size: int | tuple[int, int] | None = None) -> tf.data.Dataset:
        """A ``tf.data.Dataset`` over this slice; see adapters.tensorflow. ``image_size``: as
        for ``to_pytorch``."""
        from orchestrator.adapters.tensorflow import to_tf_dataset

        return to_tf_dataset(self._sized_stream(image_size), shuffle=shuffle, seed=seed)

    def to_ray(self, split: HashSplit | None = None, *, item_ids: frozenset[str] | None = None,
               node_id: str | None = None, image_size: int | tuple[int, int] | None = None) -> ray.data.Dataset:
        """A ``ray.data.Dataset`` of items built as stages; see adapters.ray. ``split``: a
        ``HashSplit`` keeping one side of a train/validation split; ``item_ids``: keep only
        these items (a worker's shard); ``node_id``: run the stages on that Ray node;
        ``image_size``: as for ``to_pytorch`` (decoded to size in the fetch stage, so no
        full-size image enters the object store)."""
        from orchestrator.adapters.ray import arena_warm_up, to_ray_dataset
        from orchestrator.ray_runtime import ensure_ray

        plan = self.plan if image_size is None else self.plan.with_options(self._sized_options(image_size))
        ensure_ray(arena_warm_up())  # the skip ledger is homed on this process's Ray node
        return to_ray_dataset(plan, self.ray_skip_ledger(), split, item_ids=item_ids, node_id=node_id)

    def versions(self) -> list[VersionInfo]:
        """Every committed version of this dataset, oldest first (the access check was made
        when the dataset was opened)."""
        return store_call(self.plan.handle.manifest(self.name).versions, location=self.plan.location,
                          action="list the versions of", target=repr(self.name))

    def label_counts(self) -> dict[str, int]:
        """Instances per label in this version or slice."""
        names = self.label_map.names
        return sum_labels(self._rows(["labels"]) if names else pa.table({}), names)

    def diff(self, other: Dataset) -> DatasetDiff:
        """What changed from this version (or slice) to ``other``: items added, removed and
        changed, which parts of each changed item (``orchestrator.diff.PARTS``), and label
        instance totals. Read from the manifests only (no media), as this principal sees them.
        ``store.dataset("street", 1).diff(store.dataset("street", 3))``; slice both the same way
        to compare one slice (an item that left the slice counts as removed)."""
        from orchestrator.diff import COLUMNS, DatasetDiff, compare_rows

        columns = [*COLUMNS, "labels"]
        with ThreadPoolExecutor(2, thread_name_prefix="diff-read") as pool:
            before, after = pool.map(lambda ds: ds._rows(columns), (self, other))
        query = self.query if self.query == other.query else f"{self.query} -> {other.query}"  # one slice, or two
        return DatasetDiff(self.name if self.name == other.name else f"{self.name} -> {other.name}",
                           self.version, other.version, query, compare_rows(before, after))

    def contact_sheet(self, n: int = 24, *, seed: int | None = None, columns: int = 6, thumb: int = 192,
                      labels: bool = True) -> Any:
        """A Pillow image of ``n`` items of this version or slice in a grid, with their boxes,
        polygons and label names in stable per-label colours and each item's id under it
        (``orchestrator.sheet``). The first ``n`` items, or with ``seed`` a random sample; only
        the items shown are read. A notebook displays the returned image."""
        from orchestrator.sheet import contact_sheet

        total = len(self)
        count = min(n, total)
        if seed is None:
            chosen = list(range(count))
        else:
            chosen = sorted(np.random.default_rng(seed).choice(total, count, replace=False).tolist())
        return contact_sheet(self[chosen], columns=columns, thumb=thumb, labels=labels)

    def export(self, out: str | Path, format: str = "coco", *, overwrite: bool = False,
               on_error: str = "raise", progress: bool | None = None) -> ExportReport:
        """Write this version or slice into the folder ``out`` as ``coco`` (``annotations.json``
        + ``images/``), ``jsonl`` (``items.jsonl`` + ``images/``) or ``yolo`` (``data.yaml`` +
        ``images/`` + ``labels/``), with the original media bytes and ``export.json`` (what was
        exported, from where, and what the format cannot hold); see ``orchestrator.export``.
        As this principal sees the data: hidden fields are never written. ``ingest`` reads a
        COCO or JSONL export back as the same items. A non-empty ``out`` is refused unless
        ``overwrite``; the folder appears whole or not at all. ``on_error="skip"`` leaves out
        items whose media are missing or corrupt (reported) instead of stopping."""
        from orchestrator.export import export

        protect = [Path(self.store.location.root)] if self.store.location.scheme == "file" else []
        provenance = {"store": self.store.uri, "principal": self.store.principal}
        return export(self.plan, out, format, query=self.query, overwrite=overwrite,
                      on_error=on_error, progress=progress, provenance=provenance, protect=protect)  # type: ignore[arg-type]

    def stats(self) -> DatasetStats:
        """Per label instances and images, instances per image, image and box sizes, kinds, tag
        and attribute value counts of this version or slice (``orchestrator.stats``), from the
        manifest alone, as this principal sees it."""
        from orchestrator.stats import COLUMNS, compute_stats

        return compute_stats(self._rows(list(COLUMNS)), dataset=self.name, version=self.version,
                             query=self.query)

    def __repr__(self) -> str:
        """Name, version, item count and slice: what a notebook cell shows. The count of a slice
        costs one scan of the query's manifest columns the first time (no media)."""
        q = f", query={self.query!r}" if self._queries else ""
        try:
            items = f", items={len(self):,}"
        except Exception:  # noqa: BLE001 - a repr must not raise (a store gone since the open)
            items = ""
        return f"Dataset({self.name!r}, version={self.version}{items}{q}, store={self.store.uri!r})"


#: Attribute keys per (location, dataset, version, access view): versions are immutable.
_KEYS: dict[tuple[Any, ...], tuple[str, ...]] = {}


def _attribute_keys(location: StoreLocation, snapshot: Snapshot, access: ReadView | None) -> tuple[str, ...]:
    key = (location, snapshot.dataset, snapshot.version, access)
    if key not in _KEYS:
        table = read_rows(location, snapshot, None, ["attributes"], access=access).table
        column = table.column("attributes").combine_chunks()
        keys = pc.unique(column.keys).to_pylist() if len(column) else []
        if len(_KEYS) > 64:
            _KEYS.clear()
        _KEYS[key] = tuple(sorted(k for k in keys if k is not None))
    return _KEYS[key]
