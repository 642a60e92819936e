"""Bytes → pixels, and a manifest row + pixels → the item dict every reader yields.

Pure functions shared by the SDK iterator, the PyTorch and TensorFlow adapters and the Ray Data
stages, so every path yields identical items.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from orchestrator.errors import ItemError
from orchestrator.manifest import LabelMap


def decode_image(data: bytes, item_id: str = "?") -> np.ndarray:
    """H×W×3 uint8 RGB with EXIF orientation applied (grayscale, palette, RGBA converted)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode != "RGB":
                img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "LA", "PA") else img.convert("RGB")
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ItemError(
            f"item {item_id!r}: its blob is not a readable image ({exc})",
            hint="re-ingest the item from its source file", reason="undecodable",
        ) from None


def make_item(row: dict, image: np.ndarray | None, label_map: LabelMap, version: int) -> dict[str, Any]:
    """The item dict: boxes, labels and polygons cover instances with geometry (box, polygon),
    aligned by index; tag-kind instances are listed in ``instance_tags``."""
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
