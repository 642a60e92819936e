"""The item: the one record every read path yields, and its encodings for Ray and TensorFlow.

An item (a plain dict) has these fields, whatever the path (``ds[i]``, iteration,
``to_pytorch``, ``to_tensorflow``, ``to_ray``, training); ``tests/integration/test_read_contract.py``
checks that every path yields the same values::

    id                   str                        the item id (unique in a version)
    image                uint8 [H, W, 3] | None     RGB pixels, EXIF orientation applied (None: decode=False)
    boxes                float32 [N, 4]             x_min, y_min, x_max, y_max in pixels
    labels               int64 [N]                  label ids (``ds.label_map``: stable across versions)
    label_names          list[str] (N)              label names, aligned with boxes
    polygons             list[float32 [2k]] (N)     x0, y0, x1, y1, ... per instance (empty: none)
    instance_attributes  list[dict] (N)             each instance's attributes
    instance_tags        list[str]                  labels of tag-kind instances (no geometry)
    tags                 list[str]                  item tags
    attributes           dict[str, str]             item attributes
    width, height        int                        pixels after EXIF orientation (manifest columns)
    version              int                        the dataset version read

The N instances are those with geometry (box or polygon), in manifest order. Under an access
policy, hidden attribute keys are absent. PyTorch gets the same dict with ``image``, ``boxes``,
``labels`` and ``polygons`` as tensors (``adapters.torch.to_tensors``). Ray Data and
TensorFlow need columns of fixed type, so variable structures are encoded: ``to_ray_row`` /
``from_ray_row`` here, ``to_tf_element`` / ``from_tf_element`` in ``adapters.tensorflow``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from orchestrator.manifest import LabelMap

#: Manifest columns an item is built from and its bytes found by (they never change type across
#: versions; ``pack`` and ``pack_offset`` read as null in versions written before packs).
ITEM_COLUMNS = ["item_id", "blob", "size_bytes", "pack", "pack_offset", "width", "height", "instances",
                "attributes", "tags"]

#: The item's fields, in the order documented above.
ITEM_FIELDS = ("id", "image", "boxes", "labels", "label_names", "polygons", "instance_attributes",
               "instance_tags", "tags", "attributes", "width", "height", "version")

#: Item fields that Ray rows and TF elements carry as JSON text (variable nested structure).
JSON_FIELDS = ("label_names", "polygons", "instance_attributes", "instance_tags", "tags", "attributes")


def make_item(row: dict, image: np.ndarray | None, label_map: LabelMap, version: int) -> dict[str, Any]:
    """The item dict from a manifest row (``ITEM_COLUMNS``) and its decoded pixels."""
    ids = label_map.as_dict()
    geo = [i for i in row.get("instances") or [] if i["kind"] != "tag"]
    boxes = np.asarray([i["bbox"] for i in geo], dtype=np.float32).reshape(-1, 4)
    return {
        "id": row["item_id"],
        "image": image,
        "boxes": boxes,
        "labels": np.asarray([ids[i["label"]] for i in geo], dtype=np.int64),
        "label_names": [i["label"] for i in geo],
        "polygons": [np.asarray(i["polygon"] or [], dtype=np.float32) for i in geo],
        "instance_attributes": [dict(i.get("attributes") or []) for i in geo],
        "instance_tags": [i["label"] for i in row.get("instances") or [] if i["kind"] == "tag"],
        "tags": list(row.get("tags") or []),
        "attributes": dict(row.get("attributes") or []),
        "width": row["width"],
        "height": row["height"],
        "version": version,
    }


def encode_json(value: Any) -> str:
    """One JSON encoding for every converter (sorted keys: equal values encode equally)."""
    if isinstance(value, list) and value and isinstance(value[0], np.ndarray):
        value = [v.tolist() for v in value]
    return json.dumps(value, sort_keys=True)


def to_ray_row(item: dict[str, Any], fetch_node: str = "") -> dict[str, Any]:
    """The Ray Data row of an item: arrays as tensors, ``JSON_FIELDS`` as JSON text, integers
    as int64; plus ``fetch_node``, the Ray node that fetched the blob (shard locality is
    checked with it; not an item field)."""
    row: dict[str, Any] = {}
    for name in ITEM_FIELDS:
        value = item[name]
        if name in JSON_FIELDS:
            row[name] = encode_json(value)
        elif name in ("width", "height", "version"):
            row[name] = np.int64(value)
        else:
            row[name] = value
    row["fetch_node"] = fetch_node
    return row


def from_ray_row(row: dict[str, Any]) -> dict[str, Any]:
    """The item of a Ray Data row (inverse of ``to_ray_row``; ``fetch_node`` dropped)."""
    item: dict[str, Any] = {}
    for name in ITEM_FIELDS:
        value = row[name]
        if name in JSON_FIELDS:
            value = json.loads(value)
            if name == "polygons":
                value = [np.asarray(p, dtype=np.float32) for p in value]
        elif name in ("width", "height", "version"):
            value = int(value)
        elif name == "boxes":
            value = np.asarray(value, dtype=np.float32).reshape(-1, 4)
        elif name == "labels":
            value = np.asarray(value, dtype=np.int64).reshape(-1)
        item[name] = value
    return item
