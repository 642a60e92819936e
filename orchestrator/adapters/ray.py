"""Ray Data: the slice as a ``ray.data.Dataset`` built from three stages over a read plan.

1. manifest scan: a Ray ``Datasource`` with one read task per manifest file that the Delta
   statistics leave in (row counts from the Delta log), through the one manifest reader
   (``scan.read_rows``): the columns an item needs, the exact slice predicate, the access view;
2. blob fetch through this node's cache and 3. decode: the SDK's ``ItemLoader``, with the same
   error policy; rows are the item encoded by ``stream.item.to_ray_row``.

Ready for ``streaming_split`` and Ray Train's ``datasets=``. Nothing is fetched until consumed.
"""

from __future__ import annotations

import functools
import uuid
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from orchestrator.errors import ItemError
from orchestrator.scan import candidate_files
from orchestrator.stream.item import ITEM_COLUMNS, ItemBlock, to_ray_row
from orchestrator.stream.plan import ReadPlan
from orchestrator.stream.reader import ItemLoader, apply_error_policy
from orchestrator.stream.skips import Skips
from orchestrator.stream.split import HashSplit

if TYPE_CHECKING:
    import ray.data


def scan_manifest_file(plan: ReadPlan, path: str, split: HashSplit | None = None,
                       item_ids: frozenset[str] | None = None) -> pa.Table:
    """Stage 1 for one manifest file: its rows that match the slice (and the split, and the
    shard's ``item_ids``), read by the one manifest reader."""
    table = plan.rows(ITEM_COLUMNS, files=[path]).table
    if split is not None:
        table = table.filter(pa.array(split.keep(table.column("item_id").to_pylist()), type=pa.bool_()))
    if item_ids is not None:
        table = table.filter(pa.array([i in item_ids for i in table.column("item_id").to_pylist()],
                                      type=pa.bool_()))
    return table


def manifest_datasource(plan: ReadPlan, split: HashSplit | None = None,
                        item_ids: frozenset[str] | None = None) -> Any:
    """A Ray ``Datasource`` over the slice's manifest rows: one read task per manifest file that
    the Delta statistics leave in, each running ``scan_manifest_file``. The row count of a task
    comes from the Delta log when nothing filters the file's rows (no query, row filter, split
    or shard), so Ray Data plans with real sizes; otherwise it is unknown until read."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ManifestDatasource(Datasource):
        def __init__(self) -> None:
            self.files = candidate_files(plan.snapshot, plan.query)

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[ReadTask]:
            exact = plan.query is None and split is None and item_ids is None
            return [ReadTask(functools.partial(lambda p: [scan_manifest_file(plan, p, split, item_ids)], path),
                             BlockMetadata(num_rows=stats.num_records if exact else None, size_bytes=None,
                                           exec_stats=None, input_files=(path,)),
                             per_task_row_limit=per_task_row_limit)
                    for path, stats in self.files]

        def get_name(self) -> str:
            return f"Manifest({plan.dataset!r} v{plan.version})"

    return ManifestDatasource()


class SkipLedger:
    """Where Ray stages record skipped items, so the driver can count them.

    A named Ray actor, created by the first skip only (a clean read starts no process), detached
    so that it outlives the fetch actors that wrote to it, and placed on the driver's node so
    it never keeps an autoscaled node alive. Each skip is recorded synchronously before the
    stage moves on, so a reader that finished consuming sees every skip. ``close()`` ends it.
    """

    def __init__(self, name: str, home_node: str | None) -> None:
        self.name = name
        self.home_node = home_node

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
        import ray

        one = Skips()
        one.add(exc)
        ray.get(self._actor(create=True).add.remote(one.as_dict()))

    def read(self) -> Skips:
        import ray

        skips = Skips()
        actor = self._actor(create=False)
        if actor is not None:
            skips.merge(ray.get(actor.read.remote()))
        return skips

    def close(self) -> None:
        import ray

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


class FetchDecode:
    """Stages 2+3 as one callable class, so each Ray worker keeps its cache between batches.

    The same ``ItemLoader`` and error policy as the SDK reader: a batch of manifest rows is
    fetched with ``ItemLoader.fetch_many`` (packed rows by merged range requests: a batch of
    adjacent items of one pack is one request), then decoded; a missing, corrupt or
    undecodable blob is skipped (recorded in the ``ledger``) or raised; a store outage past the
    retry deadline always raises ``StoreUnavailable``, which fails the pipeline instead of
    thinning it. Rows are ``stream.item.to_ray_row`` of the item."""

    def __init__(self, plan: ReadPlan, ledger: SkipLedger | None = None) -> None:
        self.load = ItemLoader(plan)
        self.on_error = plan.options.on_error
        self.ledger = ledger
        import ray

        # Stamped on every row: which node fetched it (shard locality is checked with it).
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    def _record(self, exc: ItemError) -> None:
        if self.ledger is not None:
            self.ledger.add(exc)

    def __call__(self, batch: pa.Table) -> pa.Table | dict[str, list]:
        rows = ItemBlock(batch, self.load.label_map).rows()
        out = []
        for row, data in zip(rows, self.load.fetch_many(rows), strict=True):
            try:
                item = self.load.item(row, data)
            except ItemError as exc:
                apply_error_policy(exc, self.on_error, self._record)
                continue
            out.append(to_ray_row(item, self.node_id))
        if not out:  # every item skipped: an empty block with no columns
            return pa.table({})
        return {name: [r[name] for r in out] for name in out[0]}


ROWS_PER_BLOCK = 32


def to_ray_dataset(plan: ReadPlan, ledger: SkipLedger | None = None, split: HashSplit | None = None, *,
                   item_ids: frozenset[str] | None = None,
                   node_id: str | None = None) -> ray.data.Dataset:
    """Items of ``plan`` as a lazy Ray Data pipeline of ``to_ray_row`` rows (order not
    preserved); skipped items are recorded in ``ledger``.

    ``split`` keeps one side of a hash split and ``item_ids`` one worker's shard, both applied in
    the scan: other items' blobs are never fetched. ``node_id`` pins every stage to that node
    (a train worker's), so its blobs are fetched into that node's cache and no decoded image
    crosses the network. At most ``plan.options.ray_fetch_actors`` fetch actors run."""
    import ray.data

    from orchestrator.ray_runtime import ensure_ray

    ensure_ray()
    source = manifest_datasource(plan, split, item_ids)
    if not source.files:
        return ray.data.from_items([])
    pinned = pinned_to(node_id)
    return (
        ray.data.read_datasource(source, override_num_blocks=len(source.files), num_cpus=0.25,
                                 ray_remote_args=pinned)
        # One manifest file can hold the whole slice: cut it into small blocks so fetch and
        # decode run in parallel and the first batch reaches a consumer after a few items,
        # not after the whole file.
        .repartition(target_num_rows_per_block=ROWS_PER_BLOCK)
        .map_batches(FetchDecode, fn_constructor_kwargs={"plan": plan, "ledger": ledger},
                     batch_size=ROWS_PER_BLOCK, batch_format="pyarrow",
                     compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.options.ray_fetch_actors),
                     num_cpus=0.5, **pinned)
    )


def pinned_to(node_id: str | None) -> dict:
    """Ray remote args that keep a stage on ``node_id`` (falling back elsewhere only if that
    node is gone); empty when ``node_id`` is None."""
    if node_id is None:
        return {}
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=True)}
