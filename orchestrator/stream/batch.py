"""The batch: the one layout in which items travel together (DataLoader workers, tf.data, Ray).

Items have ragged fields (0..N instances, each with a polygon of any length). Sent one at a time,
or as lists of per-instance arrays, a batch of 32 demo images is ~220 tensors to pickle and
unpickle between processes; padded arrays waste space and still need a count. Here a batch is
flat value arrays plus offsets (as Arrow lists, ``tf.RaggedTensor`` row splits and PyTorch's
nested tensors store them): about 15 objects whatever the number of instances, and
``uncollate`` gets every item back exactly.

The layout, for B items with N instances and C polygon coordinates in all (this docstring is the
reference; ``orchestrator.stream.item`` documents the item fields)::

    id                   list[str] [B]
    width, height        int64 [B]
    version              int64 [B]
    image                uint8 [B, H, W, 3] if every item has an image of one shape, else a
                         list of B arrays (entries None when read with decode=False)
    instance_offsets     int64 [B + 1]   item i's instances are rows
                                         instance_offsets[i]:instance_offsets[i + 1] below
    boxes                float32 [N, 4]  x_min, y_min, x_max, y_max in pixels
    labels               int64 [N]
    label_names          list[str] [N]
    instance_attributes  list[dict] [N]
    polygon_offsets      int64 [N + 1]   instance j's polygon is
    polygon_coords       float32 [C]     polygon_coords[polygon_offsets[j]:polygon_offsets[j + 1]]
                                         (x0, y0, x1, y1, ...; empty: the instance has none)
    instance_tags        list [B] of the items' list[str]
    tags                 list [B] of the items' list[str]
    attributes           list [B] of the items' dict[str, str]

Every instance has a box (one derived from its polygon when the source gave none) and a
polygon that may be empty, so ``boxes`` and ``polygon_offsets`` always have N (N + 1) rows.
Offsets start at 0 and end at N (C); they never decrease.

An empty batch (B = 0) is well formed: zero-length arrays, ``instance_offsets == [0]``,
``polygon_offsets == [0]`` and ``image == []`` (no shape to stack); ``uncollate`` of it is [].

Frameworks: ``adapters.torch.batch_to_torch`` makes each array a tensor without a copy.
TensorFlow: ``tf.RaggedTensor.from_row_splits(boxes, instance_offsets)`` is the [B, None, 4]
boxes (likewise labels); polygons are two levels,
``tf.RaggedTensor.from_row_splits(tf.RaggedTensor.from_row_splits(polygon_coords,
polygon_offsets), instance_offsets)`` — the same values and row splits ``ragged_batch`` makes.

Pure numpy functions: no torch, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from orchestrator.stream.item import ITEM_FIELDS

__all__ = ["BATCH_FIELDS", "collate", "uncollate"]

#: The fields of a batch, in the order documented above.
BATCH_FIELDS = ("id", "width", "height", "version", "image", "instance_offsets", "boxes", "labels",
                "label_names", "instance_attributes", "polygon_offsets", "polygon_coords",
                "instance_tags", "tags", "attributes")


def _offsets(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    """[0, l0, l0 + l1, ...] as int64: row splits of values cut into ``lengths``."""
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lengths, dtype=np.int64), out=out[1:])
    return out


def _images(images: list[Any]) -> np.ndarray | list[Any]:
    """One uint8 [B, H, W, 3] array when every image exists and has one shape, else the list."""
    if not images or any(im is None for im in images):
        return list(images)
    first = images[0].shape
    if any(im.shape != first for im in images):
        return list(images)
    return np.stack(images)


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The batch (layout in the module doc) of ``items``, which are item dicts
    (``stream.item``). Raises ValueError naming the first item that lacks an item field or whose
    boxes, labels and polygons disagree in count (a transform that changed one but not the
    others); fields beyond the item's are not carried."""
    for item in items:
        missing = [f for f in ITEM_FIELDS if f not in item]
        if missing:
            raise ValueError(f"item {item.get('id')!r} cannot be batched: it has no {', '.join(missing)} "
                             "(collate takes the item dicts the readers yield)")
        n = len(item["boxes"])
        if not (len(item["labels"]) == len(item["label_names"]) == len(item["polygons"])
                == len(item["instance_attributes"]) == n):
            raise ValueError(f"item {item['id']!r} cannot be batched: {n} boxes but {len(item['labels'])} "
                             f"labels, {len(item['label_names'])} label names, {len(item['polygons'])} "
                             f"polygons and {len(item['instance_attributes'])} instance attributes")
    polygons = [p for item in items for p in item["polygons"]]
    boxes = [np.asarray(item["boxes"], dtype=np.float32).reshape(-1, 4) for item in items]
    labels = [np.asarray(item["labels"], dtype=np.int64).reshape(-1) for item in items]
    return {
        "id": [item["id"] for item in items],
        "width": np.fromiter((item["width"] for item in items), dtype=np.int64, count=len(items)),
        "height": np.fromiter((item["height"] for item in items), dtype=np.int64, count=len(items)),
        "version": np.fromiter((item["version"] for item in items), dtype=np.int64, count=len(items)),
        "image": _images([item["image"] for item in items]),
        "instance_offsets": _offsets([len(b) for b in boxes]),
        "boxes": np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32),
        "labels": np.concatenate(labels) if labels else np.zeros(0, np.int64),
        "label_names": [name for item in items for name in item["label_names"]],
        "instance_attributes": [a for item in items for a in item["instance_attributes"]],
        "polygon_offsets": _offsets([len(p) for p in polygons]),
        "polygon_coords": (np.concatenate(polygons).astype(np.float32, copy=False) if polygons
                           else np.zeros(0, np.float32)),
        "instance_tags": [item["instance_tags"] for item in items],
        "tags": [item["tags"] for item in items],
        "attributes": [item["attributes"] for item in items],
    }


def uncollate(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """The items of a batch, in order: the exact inverse of ``collate`` (every field equal, with
    the item's types: arrays of the same dtype and shape, int width/height/version). Arrays are
    views into the batch's arrays, not copies. Takes numpy arrays (convert tensors back with
    ``.numpy()`` first). Raises ValueError if the offsets do not fit the values."""
    ids = list(batch["id"])
    b = len(ids)
    inst = np.asarray(batch["instance_offsets"], dtype=np.int64)
    poly = np.asarray(batch["polygon_offsets"], dtype=np.int64)
    boxes = np.asarray(batch["boxes"], dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(batch["labels"], dtype=np.int64).reshape(-1)
    coords = np.asarray(batch["polygon_coords"], dtype=np.float32).reshape(-1)
    n = len(boxes)
    if (len(inst) != b + 1 or inst[0] != 0 or inst[-1] != n or len(labels) != n or len(poly) != n + 1
            or poly[0] != 0 or poly[-1] != len(coords) or np.any(np.diff(inst) < 0) or np.any(np.diff(poly) < 0)):
        raise ValueError(f"not a well-formed batch: {b} ids, instance_offsets {len(inst)} long ending at "
                         f"{inst[-1] if len(inst) else None}, {n} boxes, {len(labels)} labels, polygon_offsets "
                         f"{len(poly)} long ending at {poly[-1] if len(poly) else None}, {len(coords)} coordinates")
    images = batch["image"]
    names = list(batch["label_names"])
    attrs = list(batch["instance_attributes"])
    polygons = [coords[poly[j]:poly[j + 1]] for j in range(n)]
    bounds = inst.tolist()
    widths, heights, versions = (np.asarray(batch[k]).tolist() for k in ("width", "height", "version"))
    items = []
    for i in range(b):
        lo, hi = bounds[i], bounds[i + 1]
        items.append({
            "id": ids[i],
            "image": images[i],
            "boxes": boxes[lo:hi],
            "labels": labels[lo:hi],
            "label_names": names[lo:hi],
            "polygons": polygons[lo:hi],
            "instance_attributes": attrs[lo:hi],
            "instance_tags": batch["instance_tags"][i],
            "tags": batch["tags"][i],
            "attributes": batch["attributes"][i],
            "width": widths[i],
            "height": heights[i],
            "version": versions[i],
        })
    return items
