"""The item: the one record every read path yields, and its encodings for Ray and TensorFlow.

An item (a plain dict) has these fields, whatever the path (``ds[i]``, iteration,
``to_pytorch``, ``to_tensorflow``, ``to_ray``, training); ``tests/integration/test_read_contract.py``
checks that every path yields the same values::

    id                   str                        the item id (unique in a version)
    image                uint8 [H, W, 3] | None     RGB pixels, EXIF orientation applied (None: decode=False);
                                                    [h, w, 3] with StreamOptions.image_size (w, h)
    boxes                float32 [N, 4]             x_min, y_min, x_max, y_max in pixels of ``image``
                                                    as delivered (see below)
    labels               int64 [N]                  label ids (``ds.label_map``: stable across versions)
    label_names          list[str] (N)              label names, aligned with boxes
    polygons             list[float32 [2k]] (N)     x0, y0, x1, y1, ... per instance (empty: none),
                                                    in pixels of ``image`` as delivered
    instance_attributes  list[dict] (N)             each instance's attributes
    instance_tags        list[str]                  labels of tag-kind instances (no geometry)
    tags                 list[str]                  item tags
    attributes           dict[str, str]             item attributes
    width, height        int                        the SOURCE image's pixels after EXIF orientation
                                                    (manifest columns), whatever ``image_size``
    version              int                        the dataset version read

The N instances are those with geometry (box or polygon), in manifest order. Read with
``StreamOptions.image_size`` = (w, h), the image is decoded straight to w x h (stretched, see
``stream.decode``) and boxes and polygons are scaled to it: x by w / width, y by h / height,
so they stay on the same objects; ``width`` and ``height`` keep the source size (multiply
by width / w, height / h to get source pixels back). With ``decode=False`` the geometry is
scaled all the same: the caller asked for that coordinate system, and an item's geometry never
depends on whether its pixels were decoded. Under an access
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


def make_item(row: dict, image: np.ndarray | None, label_map: LabelMap, version: int,
              size: tuple[int, int] | None = None) -> dict[str, Any]:
    """The item dict from a manifest row (``ITEM_COLUMNS``) and its decoded pixels.

    ``size`` = (w, h): the image was decoded to that size (or would have been: decode=False);
    boxes and polygons are scaled from the row's oriented ``width`` x ``height`` to it."""
    ids = label_map.as_dict()
    geo = [i for i in row.get("instances") or [] if i["kind"] != "tag"]
    boxes = np.asarray([i["bbox"] for i in geo], dtype=np.float32).reshape(-1, 4)
    polygons = [np.asarray(i["polygon"] or [], dtype=np.float32) for i in geo]
    if size is not None:
        boxes, polygons = scale_geometry(boxes, polygons, size[0] / row["width"], size[1] / row["height"])
    return {
        "id": row["item_id"],
        "image": image,
        "boxes": boxes,
        "labels": np.asarray([ids[i["label"]] for i in geo], dtype=np.int64),
        "label_names": [i["label"] for i in geo],
        "polygons": polygons,
        "instance_attributes": [dict(i.get("attributes") or []) for i in geo],
        "instance_tags": [i["label"] for i in row.get("instances") or [] if i["kind"] == "tag"],
        "tags": list(row.get("tags") or []),
        "attributes": dict(row.get("attributes") or []),
        "width": row["width"],
        "height": row["height"],
        "version": version,
    }


def scale_geometry(boxes: np.ndarray, polygons: list[np.ndarray], sx: float, sy: float
                   ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Boxes [N, 4] and flat polygons (x0, y0, x1, y1, ...) with x scaled by ``sx`` and y by
    ``sy``: computed in float64 and rounded once to float32, so the result is the float32
    nearest to the exact product."""
    box_scale = np.array([sx, sy, sx, sy], dtype=np.float64)
    scaled_boxes = (boxes.astype(np.float64) * box_scale).astype(np.float32)
    scaled_polygons = []
    for polygon in polygons:
        xy = polygon.astype(np.float64)
        xy[0::2] *= sx
        xy[1::2] *= sy
        scaled_polygons.append(xy.astype(np.float32))
    return scaled_boxes, scaled_polygons


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
