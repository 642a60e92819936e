"""Ray Data: the slice as a ``ray.data.Dataset`` whose read tasks fetch and decode.

The driver indexes the slice (one scan of the query's columns, ``stream.index``: where each item
lives) and cuts it into read tasks of adjacent items; each task is the SDK reader itself
(``ItemStream.iterate`` over its items: merged range requests for packed media, the node cache,
decode threads, the one error policy) and yields its items as one Arrow block (or blocks of
Ray Data's target block size, for large images: ``read_items``). One stage, so nothing but
finished rows crosses the object store, and no actor pool has to start before the first item:
tasks run in Ray's already-started workers, whose node cache (memory tier per process, disk tier
per node) serves later epochs.

Rows are ``stream.item.to_ray_row`` of the item (plus ``fetch_node``), or the columns a
``batch_fn`` makes of a block's items (training: fixed-shape examples, ``train.data.Examples``). Ready for
``streaming_split`` and Ray Train's ``datasets=``. Nothing is fetched until consumed.
"""

from __future__ import annotations

import functools
import os
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from orchestrator.errors import ItemError
from orchestrator.ray_runtime import freeze_startup_objects
from orchestrator.stream.buffers import BufferPool, arena_capacity, block_arenas, prefault_block_arenas, stacked_view
from orchestrator.stream.index import ItemIndex, RowReader, ShippedRows, build_index
from orchestrator.stream.item import to_ray_row
from orchestrator.stream.memory import fix_mmap_threshold
from orchestrator.stream.plan import ReadPlan
from orchestrator.stream.reader import ItemStream
from orchestrator.stream.skips import Skips
from orchestrator.stream.split import HashSplit

if TYPE_CHECKING:
    import ray.data

#: Items of a pipeline's first read tasks (one batch of the usual size): see ``read_spans``.
FIRST_TASK_ITEMS = 32
#: Items per read task after the first ones (``read_spans``): adjacent items (a task's reads merge
#: into few requests), and many, because each task's end costs its slot up to 0.1 s: Ray Data's
#: scheduling loop waits (``ray.wait`` with a 0.1 s timeout) for every running task before it
#: sees that one ended and starts the next. Measured (3,000 items cold, file://, 2 cores, 3
#: rounds, medians): 676 items/s at 128, 795 at 512, 851 at 1,024; at 1,024 the task's shipped
#: rows (~1.3 KB an item) pass Ray's 1 MiB warning for a read function.
TASK_ITEMS = 512
#: A slice of at most this many items (and ``SHIP_ROWS_BYTES`` of rows) has its manifest rows read
#: once on the driver and carried inside its read tasks (~1.3 KB a demo row): tasks then open no
#: manifest file, so a warm epoch reads nothing from the store (before: ~4 MB of row groups per
#: epoch for 3,000 items, each task reading the groups of its items again).
SHIP_ROWS_ITEMS = 100_000
SHIP_ROWS_BYTES = 128 << 20


@functools.cache
def decode_buffers() -> BufferPool:
    """This worker process's pool of decode buffers (``stream.buffers``), shared by its tasks."""
    return BufferPool()


def arena_warm_up() -> Callable[[], int] | None:
    """What a local cluster started for a ``to_ray`` pipeline runs in each read worker as it
    warms up (``ray_runtime.warm_up``'s ``prepare``): allocate and write the worker's block
    arenas for this process's ``DataContext.target_max_block_size`` (``BlockArena.prefault``:
    the first epoch then does not wait for the kernel to clear fresh pages). ~320 MiB a worker
    with Ray Data's default 128 MiB blocks, which a ``to_ray`` epoch allocates anyway; ingest
    and training pipelines make their own columns, so they do not ask for it. None when
    ``ORCHESTRATOR_RAY_PREFAULT_ARENAS=0`` (left to the first epoch) or blocks have no size."""
    from ray.data import DataContext

    target = DataContext.get_current().target_max_block_size
    if os.environ.get("ORCHESTRATOR_RAY_PREFAULT_ARENAS", "1") == "0" or not target:
        return None
    return functools.partial(prefault_block_arenas, arena_capacity(target))


def shipped_rows(plan: ReadPlan, index: ItemIndex) -> pa.Table | None:
    """The index's manifest rows (in index order, redacted for the plan's access view) when
    the slice is small enough to ship them in its read tasks, else None."""
    if not 0 < len(index) <= SHIP_ROWS_ITEMS:
        return None
    table = RowReader(plan, index, keep_groups=0, keep_bytes=0).table(np.arange(len(index)))
    return table if table.nbytes <= SHIP_ROWS_BYTES else None


def read_spans(items: int, concurrency: int) -> list[np.ndarray]:
    """Index positions of each read task, in order: ``concurrency`` tasks of
    ``FIRST_TASK_ITEMS``, as many of twice that, then ``TASK_ITEMS`` each, and a last round of
    ``concurrency`` even tasks (at least ``FIRST_TASK_ITEMS`` each) for what remains, so that
    no slot works alone at the end of the epoch.

    Why small first: Ray Data hands a read task's output on as blocks of up to its
    ``target_max_block_size`` (128 MiB), so a task's ~15 MB blocks of 32 full-size images went
    out as one block when the task ended, and in its first second an execution runs one task (its
    resource budget starts at zero); the first batch waited for a whole 128-item task. Measured
    (3,000 items, file://, 2 cores, 2 rounds): first batch 0.44-0.58 s cold and 0.19-0.29 s warm,
    against 0.86-1.23 s and 0.42 s with equal tasks, at the same items/s. Later tasks are large
    (``TASK_ITEMS``: each task's end costs its slot the scheduling loop's wait)."""
    spans: list[np.ndarray] = []
    start = 0
    while start < items:
        k = len(spans)
        size = (FIRST_TASK_ITEMS if k < concurrency else 2 * FIRST_TASK_ITEMS if k < 2 * concurrency
                else TASK_ITEMS)
        left = items - start
        if left <= concurrency * size:
            spans.extend(np.array_split(np.arange(start, items), min(concurrency, -(-left // FIRST_TASK_ITEMS))))
            break
        spans.append(np.arange(start, start + size))
        start += size
    return spans


class SkipLedger:
    """Where Ray stages record skipped items, so the driver can count them.

    A named Ray actor, created by the first skip only (a clean read starts no process), detached
    so that it outlives the fetch actors that wrote to it, and placed on the driver's node so
    it never keeps an autoscaled node alive. Each skip is recorded synchronously before the
    stage moves on, so a reader that finished consuming sees every skip. ``close()`` ends it,
    in the process that made this handle only.
    """

    def __init__(self, name: str, home_node: str | None) -> None:
        self.name = name
        self.home_node = home_node
        self.owner_pid = os.getpid()

    def _actor(self, create: bool):
        import ray

        if not create:
            try:
                return ray.get_actor(self.name)
            except ValueError:
                return None
        options: dict = {"name": self.name, "get_if_exists": True, "lifetime": "detached",
                         "num_cpus": 0}
        options.update(pinned_to(self.home_node))
        return ray.remote(_LedgerActor).options(**options).remote()

    def add(self, exc: ItemError) -> None:
        one = Skips()
        one.add(exc)
        self.merge(one)

    def merge(self, skips: Skips) -> None:
        """Record ``skips`` (waits for the ledger's answer, so a consumer that finished sees them)."""
        import ray

        ray.get(self._actor(create=True).add.remote(skips.as_dict()))

    def read(self, timeout: float | None = None) -> Skips:
        """The skips recorded so far (``timeout``: seconds to wait for the ledger's answer;
        ``GetTimeoutError`` past it)."""
        import ray

        skips = Skips()
        actor = self._actor(create=False)
        if actor is not None:
            skips.merge(ray.get(actor.read.remote(), timeout=timeout))
        return skips

    def close(self) -> None:
        """End the ledger's actor. A no-op outside the process that made this handle: a
        DataLoader worker forked from it inherits the ``Dataset`` whose finalizer calls this
        (collected by the child's garbage collector), and the inherited Ray connection is not
        usable there: ``ray.get_actor`` waited forever and hung the DataLoader (seen in CI)."""
        import ray

        if os.getpid() != self.owner_pid:
            return
        actor = self._actor(create=False) if ray.is_initialized() else None
        if actor is not None:
            ray.kill(actor)

    @classmethod
    def new(cls, name: str | None = None) -> SkipLedger:
        """A ledger homed on this process's node (``name`` shares one across pipelines)."""
        import ray

        return cls(name or f"orchestrator-skips-{uuid.uuid4().hex[:12]}",
                   ray.get_runtime_context().get_node_id())


class _LedgerActor:
    def __init__(self) -> None:
        self.skips = Skips()

    def add(self, state: dict) -> None:
        self.skips.merge(state)

    def read(self) -> dict:
        return self.skips.as_dict()


#: Turns a block's items into its columns (numpy arrays or lists of B rows): how a training run
#: gets fixed-shape examples made in the read task (``train.data.Examples``).
BatchFn = Callable[[list[dict]], dict[str, Any]]


def _block(items: list[dict], node_id: str, batch_fn: BatchFn | None) -> pa.Table:
    """One Arrow block of items: ``to_ray_row`` columns, or ``batch_fn``'s (plus ``id`` and
    ``fetch_node``). Arrays of one shape become one fixed-shape tensor column."""
    from ray.data.block import BlockAccessor

    if batch_fn is not None:
        columns = dict(batch_fn(items))
        columns["id"] = [item["id"] for item in items]
        columns["fetch_node"] = [node_id] * len(items)
    else:
        rows = [to_ray_row(item, node_id) for item in items]
        columns = {name: [r[name] for r in rows] for name in rows[0]}
    out: dict[str, np.ndarray] = {}
    for name, values in columns.items():
        if isinstance(values, np.ndarray):
            out[name] = values
        elif isinstance(values[0], np.ndarray) and all(v.shape == values[0].shape for v in values):
            stacked = stacked_view(values)  # images laid out back to back in an arena: no copy
            out[name] = np.stack(values) if stacked is None else stacked
        elif isinstance(values[0], (np.ndarray, str)):
            column = np.empty(len(values), dtype=object)
            column[:] = values
            out[name] = column
        else:
            out[name] = np.asarray(values)
    return BlockAccessor.batch_to_block(out)


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def read_items(plan: ReadPlan, index: ItemIndex, ledger: SkipLedger | None, batch_fn: BatchFn | None,
               rows: bytes | None = None) -> Iterator[pa.Table]:
    """The body of one read task: every item of ``index`` through the SDK reader, as blocks.
    ``rows``: the index's manifest rows, shipped by the driver (``shipped_rows``, as Arrow IPC
    bytes); else the task reads them from the manifest.

    Skipped items (missing, corrupt, undecodable blob under ``on_error="skip"``) are recorded in
    ``ledger`` before the block that would have held them is handed on; a store outage past the
    retry deadline raises ``StoreUnavailable`` and fails the pipeline instead of thinning it."""
    import ray
    from ray.data import DataContext

    fix_mmap_threshold()  # a read worker lives for many tasks: its heap must not grow (stream.memory)
    freeze_startup_objects()  # its imports out of the garbage collector's way (ray_runtime)
    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    shipped = None if rows is None else ShippedRows(pa.ipc.open_stream(rows).read_all(), plan.label_map)
    stream = ItemStream(plan, index=index, rows=shipped)
    # Decoded into reused buffers, then copied into the block's arena as items arrive: with the
    # mmap threshold pinned, fresh image buffers page-faulted on every image (stream.buffers).
    stream.load.buffers = decode_buffers()
    # One block per task, or per Ray Data's target block size when the task's images pass it.
    # Why not smaller blocks: Ray Data merges a task's blocks up to that size, and a merged block's
    # columns are chunked, which its batcher copied into one piece on the consumer's side (a copy
    # of every image: a quarter of the driver's CPU in a cold epoch, py-spy).
    target = DataContext.get_current().target_max_block_size
    arena = (block_arenas(arena_capacity(target))
             if target is not None and batch_fn is None else None)  # batch_fn makes its own columns
    column = None
    items: list[dict] = []
    pending = 0

    def flush() -> Iterator[pa.Table]:
        nonlocal items, pending, column
        skipped, stream.skips = stream.skips, Skips()  # the reader records into the new one
        if ledger is not None and skipped.count:
            ledger.merge(skipped)
        if items:
            yield _block(items, node_id, batch_fn)
        items, pending, column = [], 0, None

    with warnings.catch_warnings():  # skips are counted in the ledger, not warned per task
        warnings.simplefilter("ignore")
        for item in stream.iterate(np.arange(len(index))):
            image = item.get("image")
            if isinstance(image, np.ndarray):
                pending += image.nbytes
                if arena is not None:
                    if column is None:
                        column = arena.column()
                    item["image"] = column.add(image)
            del image  # the decode buffer goes back to the pool
            items.append(item)
            if target is not None and pending > target:
                yield from flush()
    yield from flush()


def item_datasource(plan: ReadPlan, ledger: SkipLedger | None = None, split: HashSplit | None = None,
                    item_ids: frozenset[str] | None = None, batch_fn: BatchFn | None = None) -> Any:
    """A Ray ``Datasource`` over the slice: the index is built here, on the driver (one scan of
    the query's columns, with ``split`` and ``item_ids`` applied to the ids, so other items are
    never fetched), and ``get_read_tasks`` cuts it into tasks of adjacent items."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    keep: Callable[[list[str]], np.ndarray] | None = None
    if split is not None or item_ids is not None:
        def keep(ids: list[str]) -> np.ndarray:
            mask = np.ones(len(ids), dtype=bool) if split is None else np.asarray(split.keep(ids), dtype=bool)
            if item_ids is not None:
                mask &= np.fromiter((i in item_ids for i in ids), dtype=bool, count=len(ids))
            return mask

    index = build_index(plan, keep)
    rows = shipped_rows(plan, index)

    class ItemDatasource(Datasource):
        def __init__(self) -> None:
            self.index = index
            self.rows = rows
            # Ray Data asks for the tasks several times per execution (planning, metadata, the
            # read itself): the parts are cut once per task count.
            self._parts: dict[int, list[tuple[ItemIndex, bytes | None]]] = {}
            self.spans: list[np.ndarray] = []

        def parts(self, count: int) -> list[tuple[ItemIndex, bytes | None]]:
            """Each task's index and its shipped rows as Arrow IPC bytes (pickled as they are:
            Ray's own Arrow serialization walked the nested columns, ~0.1 s per execution)."""
            if count not in self._parts:
                n = len(self.index)
                spans = (self.spans if len(self.spans) == count
                         else np.array_split(np.arange(n), max(1, min(count, n))))
                self._parts[count] = [
                    (self.index.subset(span), None if self.rows is None else _ipc(self.rows.take(pa.array(span))))
                    for span in spans]
            return self._parts[count]

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[ReadTask]:
            """``parallelism`` tasks of adjacent items: those of ``read_spans`` (``to_ray_dataset``
            asks for exactly that many, so Ray Data does not split blocks after the read), else
            near-equal ones."""
            tasks = []
            for sub, part in self.parts(parallelism):
                # Row count unknown until read: skipped items do not become rows.
                meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None,
                                     input_files=tuple(sub.files))
                tasks.append(ReadTask(lambda sub=sub, part=part: read_items(plan, sub, ledger, batch_fn, part),
                                      meta, per_task_row_limit=per_task_row_limit))
            return tasks

        def get_name(self) -> str:
            return f"Items({plan.dataset!r} v{plan.version})"

    return ItemDatasource()


def to_ray_dataset(plan: ReadPlan, ledger: SkipLedger | None = None, split: HashSplit | None = None, *,
                   item_ids: frozenset[str] | None = None, node_id: str | None = None,
                   batch_fn: BatchFn | None = None) -> ray.data.Dataset:
    """Items of ``plan`` as a lazy Ray Data pipeline of ``to_ray_row`` rows (or ``batch_fn``'s
    columns), order not preserved; skipped items are recorded in ``ledger``.

    ``split`` keeps one side of a hash split and ``item_ids`` one worker's shard, both applied
    to the index: other items' blobs are never fetched. ``node_id`` pins every read task to that
    node (a train worker's), so its blobs are fetched into that node's cache and no decoded image
    crosses the network. At most ``plan.options.ray_fetch_actors`` read tasks run at once."""
    import ray.data

    from orchestrator.ray_runtime import ensure_ray, read_concurrency, task_env

    ensure_ray(arena_warm_up() if batch_fn is None else None)  # batch_fn's pipelines make their own columns
    source = item_datasource(plan, ledger, split, item_ids, batch_fn)
    concurrency = plan.options.ray_fetch_actors or read_concurrency()
    source.spans = read_spans(len(source.index), concurrency)
    tasks = len(source.spans)
    if tasks == 0:
        return ray.data.from_items([])
    return ray.data.read_datasource(source, override_num_blocks=tasks, num_cpus=0.5,
                                    concurrency=min(concurrency, tasks), runtime_env=task_env(),
                                    ray_remote_args=pinned_to(node_id) or None)


def pinned_to(node_id: str | None) -> dict:
    """Ray remote args that keep a stage on ``node_id`` (falling back elsewhere only if that
    node is gone); empty when ``node_id`` is None."""
    if node_id is None:
        return {}
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=True)}
