"""Ray Data: the slice as a ``ray.data.Dataset`` built from three stages.

1. manifest scan: one task per manifest file that the Delta statistics leave in; it reads the
   columns an item needs, applies the exact slice predicate and emits rows;
2. blob fetch through this node's cache (the same ``fetch_blob`` as the SDK);
3. decode into the item fields.

Ready for ``streaming_split`` and Ray Train's ``datasets=``. Nothing is fetched until consumed.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from orchestrator.access.policy import ReadView
from orchestrator.access.redact import redact
from orchestrator.errors import ItemError
from orchestrator.manifest import LabelMap, Snapshot
from orchestrator.manifest_faults import manifest_file_errors
from orchestrator.query.compile import CompiledQuery
from orchestrator.retry import RetryPolicy
from orchestrator.scan import candidate_files, fill_label_counts, manifest_dataset
from orchestrator.storage_errors import retrying
from orchestrator.stream.cache import BlobCache, node_cache
from orchestrator.stream.decode import decode_image, make_item
from orchestrator.stream.index import ITEM_COLUMNS
from orchestrator.stream.reader import fetch_blob
from orchestrator.stream.skips import Skips
from orchestrator.stream.split import HashSplit

if TYPE_CHECKING:
    import ray.data

    from orchestrator.store import BlobStore, Store
    from orchestrator.stream.dataset import Dataset


def scan_manifest_files(batch: pa.Table, store: Store, snapshot: Snapshot,
                        query: CompiledQuery | None, split: HashSplit | None = None,
                        item_ids: frozenset[str] | None = None,
                        access: ReadView | None = None, retry: RetryPolicy | None = None) -> pa.Table:
    """Stage 1: the rows of the given manifest files that match the slice (and the split, and
    the shard's ``item_ids``)."""
    files = batch.column("file").to_pylist()
    columns = sorted(set(ITEM_COLUMNS) | set(query.columns if query else []),
                     key=snapshot.schema.names.index)
    dataset = manifest_dataset(store, snapshot, files)
    with manifest_file_errors(store, files, snapshot.dataset):
        table = fill_label_counts(retrying(
            lambda: dataset.to_table(columns=columns), location=store.location,
            action="read the manifest of dataset", target=repr(snapshot.dataset), policy=retry))
    if query is not None:
        table = table.filter(query.evaluate(table))
    if split is not None:
        table = table.filter(pa.array(split.keep(table.column("item_id").to_pylist())))
    if item_ids is not None:
        table = table.filter(pa.array([i in item_ids for i in table.column("item_id").to_pylist()],
                                      type=pa.bool_()))
    return redact(table.select(ITEM_COLUMNS), access)


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

    The error policy is the SDK reader's: a missing, corrupt or undecodable blob is skipped
    (recorded in the ``ledger``) or raised; a store outage past the retry deadline always
    raises ``StoreUnavailable``, which fails the pipeline instead of thinning it."""

    def __init__(self, blobs: BlobStore, label_map: LabelMap, version: int,
                 cache: BlobCache | None, on_error: str, ledger: SkipLedger | None = None) -> None:
        self.blobs = blobs
        self.label_map = label_map
        self.version = version
        self.cache = cache if cache is not None else node_cache()
        self.on_error = on_error
        self.ledger = ledger
        import ray

        # Stamped on every item: which node fetched it (shard locality is checked with it).
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    def __call__(self, row: dict) -> list[dict]:
        try:
            data = fetch_blob(self.blobs, self.cache, row["blob"])
            item = make_item(row, decode_image(data, row["item_id"]), self.label_map, self.version)
        except ItemError as exc:
            named = ItemError(f"item {row['item_id']!r}: {exc.message}", hint=exc.hint, reason=exc.reason)
            if self.on_error == "raise":
                raise named from None
            if self.ledger is not None:
                self.ledger.add(named)
            return []
        return [{
            "id": item["id"],
            "image": item["image"],
            "boxes": item["boxes"],
            "labels": item["labels"],
            "label_names": json.dumps(item["label_names"]),
            "polygons": json.dumps([p.tolist() for p in item["polygons"]]),
            "tags": json.dumps(item["tags"]),
            "attributes": json.dumps(item["attributes"]),
            "instance_attributes": json.dumps(item["instance_attributes"]),
            "num_boxes": np.int64(len(item["boxes"])),
            "width": np.int64(item["width"]),
            "height": np.int64(item["height"]),
            "version": np.int64(item["version"]),
            "fetch_node": self.node_id,
        }]


ROWS_PER_BLOCK = 32


def to_ray_dataset(ds: Dataset, split: HashSplit | None = None, *,
                   item_ids: frozenset[str] | None = None,
                   node_id: str | None = None) -> ray.data.Dataset:
    """Items of ``ds`` as a lazy Ray Data pipeline (order not preserved; list-like fields of
    variable structure travel as JSON text: label_names, polygons, tags, attributes; each item
    also carries ``fetch_node``, the Ray node that fetched its blob).

    ``split`` keeps one side of a hash split and ``item_ids`` one worker's shard, both applied in
    the scan: other items' blobs are never fetched. ``node_id`` pins every stage to that node
    (a train worker's), so its blobs are fetched into that node's cache and no decoded image
    crosses the network."""
    import ray.data

    from orchestrator.ray_runtime import ensure_ray

    ensure_ray()
    snapshot, query = ds._snapshot, ds._query
    files = [f for f, _ in candidate_files(snapshot, query)]
    if not files:
        return ray.data.from_items([])
    opts = ds.options
    retry = opts.retry_policy(ds.store.location)
    ledger = ds.ray_skip_ledger()
    pinned = pinned_to(node_id)
    return (
        ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files))
        .map_batches(scan_manifest_files, batch_size=1, batch_format="pyarrow", num_cpus=0.25,
                     fn_kwargs={"store": ds.store, "snapshot": snapshot, "query": query,
                                "split": split, "item_ids": item_ids,
                                "access": ds._access, "retry": retry}, **pinned)
        # One manifest file can hold the whole slice: cut it into small blocks so fetch and
        # decode run in parallel and the first batch reaches a consumer after a few items,
        # not after the whole file.
        .repartition(target_num_rows_per_block=ROWS_PER_BLOCK)
        .flat_map(FetchDecode, fn_constructor_kwargs={
            "blobs": ds.store.blobs(ds.name).with_retry(retry), "label_map": ds.label_map,
            "version": ds.version, "cache": opts.cache, "on_error": opts.on_error, "ledger": ledger},
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, opts.threads)),
            num_cpus=0.5, **pinned)
    )


def pinned_to(node_id: str | None) -> dict:
    """Ray remote args that keep a stage on ``node_id`` (falling back elsewhere only if that
    node is gone); empty when ``node_id`` is None."""
    if node_id is None:
        return {}
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=True)}
