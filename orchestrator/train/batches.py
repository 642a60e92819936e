"""Fixed-shape training examples from variable-size items (numpy + Pillow only).

Every framework wants batches of one shape, while items come in any size with 0..N boxes.
:func:`prepare_item` turns one item into a fixed-shape example and :func:`stack` stacks
examples into a batch. Both are pure numpy/Pillow so they can run inside a Ray Data ``map``
stage (or a DataLoader worker, or a ``tf.data`` ``numpy_function``) without importing torch or
TensorFlow.

An example (and, stacked, a batch with a leading batch axis) is::

    image      uint8   [size, size, 3]   RGB, resized with Pillow (bilinear)
    boxes      float32 [max_boxes, 4]    x_min, y_min, x_max, y_max in [0, 1] of the image; zero-padded
    labels     int64   [max_boxes]       class ids; -1 marks padding
    num_boxes  int64   []                how many rows of boxes/labels are real

Choices a caller should know about:

* **Aspect ratio is not preserved.** The image is stretched to ``size x size``. Boxes are
  normalized by the width and height of the image the item carries (boxes are in its pixels),
  so they stay aligned with the stretched image and the normalized coordinates mean the same
  thing in the original picture: multiply by the item's ``(width, height, width, height)`` to
  get source pixels back.
* **Full-size or already sized, the same example.** An item read with
  ``StreamOptions.image_size=size`` (decoded straight to ``size x size`` by ``stream.decode``
  with the same bilinear filter, boxes scaled into its pixels) gives the example a full-size
  item gives, up to resampling (JPEG draft mode decodes large images at a reduced scale first)
  and float32 rounding of the boxes (within 1e-6): normalizing by the image's own size undoes
  the scaling. The image is not resized again.
* **Boxes are clipped to the image** (some sources overflow the border by a few pixels);
  boxes that have no area left after clipping are dropped, with their labels.
* **Boxes beyond** ``max_boxes`` **are dropped**, keeping the first ``max_boxes`` in item order.
  Pick ``max_boxes`` above the densest image you expect (demo data has at most 19).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["prepare_item", "stack", "ground_truth"]


def prepare_item(item: Mapping[str, Any], size: int, max_boxes: int) -> dict[str, np.ndarray]:
    """One item (``image`` HxWx3 uint8, ``boxes`` Nx4 pixels, ``labels`` N) -> fixed-shape example.

    Extra keys of ``item`` are ignored. Grayscale (HxW) and RGBA images are converted to RGB.
    ``boxes`` may also be a list / object array of 4-element rows (as Arrow hands ragged
    columns back).
    """
    if size < 1 or max_boxes < 1:
        raise ValueError(f"size and max_boxes must be >= 1, got size={size}, max_boxes={max_boxes}")
    image = np.asarray(item["image"])
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"image must be HxWx3 (or HxW / HxWx4), got shape {image.shape}")
    image = np.ascontiguousarray(image[:, :, :3], dtype=np.uint8)
    h, w = image.shape[:2]
    if (h, w) != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))

    boxes = item.get("boxes", np.zeros((0, 4)))
    if isinstance(boxes, np.ndarray) and boxes.dtype == object:  # rows as separate arrays (Arrow)
        boxes = [np.asarray(b, dtype=np.float32) for b in boxes]
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(item.get("labels", np.zeros((0,))), dtype=np.int64).reshape(-1)
    if len(boxes) != len(labels):
        raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")
    boxes = np.clip(boxes / np.array([w, h, w, h], dtype=np.float32), 0.0, 1.0)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, labels = boxes[keep][:max_boxes], labels[keep][:max_boxes]
    n = len(boxes)

    out_boxes = np.zeros((max_boxes, 4), dtype=np.float32)
    out_labels = np.full((max_boxes,), -1, dtype=np.int64)
    out_boxes[:n] = boxes
    out_labels[:n] = labels
    return {"image": image, "boxes": out_boxes, "labels": out_labels, "num_boxes": np.int64(n)}


def stack(items: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack examples from :func:`prepare_item` into a batch: each key gains a leading axis."""
    if not items:
        raise ValueError("cannot stack an empty list of examples")
    return {k: np.stack([np.asarray(it[k]) for it in items]) for k in items[0]}


def ground_truth(batch: Mapping[str, Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """A padded batch -> per image ``(boxes [n, 4] normalized, labels [n])``, padding removed.

    This is the ``ground_truth`` format of :func:`orchestrator.train.metrics.mean_average_precision`.
    """
    boxes, labels = np.asarray(batch["boxes"]), np.asarray(batch["labels"])
    num = np.asarray(batch["num_boxes"]).reshape(-1)
    return [(boxes[i, : num[i]], labels[i, : num[i]]) for i in range(len(num))]
