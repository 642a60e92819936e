"""TensorFlow: a real ``tf.data.Dataset`` with an explicit element spec.

Each element is ``to_tf_element`` of an item (``orchestrator.stream.item``): ``image`` uint8
[H, W, 3], ``boxes`` float32 [N, 4], ``labels`` int64 [N], ``label_names`` string [N] with N
varying by item, so ``.ragged_batch(b)`` gives RaggedTensors and ``.padded_batch(b,
padding_values=...)`` pads; ``polygons`` is a RaggedTensor [N, None]; ``tags`` and
``instance_tags`` are string vectors; ``attributes`` and ``instance_attributes`` are JSON text
(maps of any keys do not fit a tensor). ``from_tf_element`` turns an element back into the item.
``ragged_batch`` gives the values and row splits of the one batch layout (``stream.batch``):
a ``stream.batch`` batch maps to it by ``tf.RaggedTensor.from_row_splits(boxes, instance_offsets)``
(see that module).
Use tf-keras (``TF_USE_LEGACY_KERAS=1``) for ``model.fit`` under MultiWorkerMirroredStrategy.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from orchestrator.optional import require  # noqa: E402
from orchestrator.stream.item import encode_json  # noqa: E402

tf = require("tensorflow")

if TYPE_CHECKING:
    from orchestrator.stream.reader import ItemStream


def element_spec() -> dict[str, Any]:
    """The ``tf.data`` element spec of an item (see the module doc)."""
    return {
        "id": tf.TensorSpec([], tf.string),
        "image": tf.TensorSpec([None, None, 3], tf.uint8),
        "boxes": tf.TensorSpec([None, 4], tf.float32),
        "labels": tf.TensorSpec([None], tf.int64),
        "label_names": tf.TensorSpec([None], tf.string),
        "polygons": tf.RaggedTensorSpec([None, None], tf.float32, ragged_rank=1),
        "instance_attributes": tf.TensorSpec([], tf.string),  # JSON list, aligned with boxes
        "instance_tags": tf.TensorSpec([None], tf.string),
        "tags": tf.TensorSpec([None], tf.string),
        "attributes": tf.TensorSpec([], tf.string),  # JSON object
        "width": tf.TensorSpec([], tf.int64),
        "height": tf.TensorSpec([], tf.int64),
        "version": tf.TensorSpec([], tf.int64),
    }


def _strings(values: list[str]) -> Any:
    return tf.constant(values, tf.string, shape=[len(values)])


def to_tf_element(item: dict[str, Any]) -> dict[str, Any]:
    """An item as an element of ``element_spec()``."""
    lengths = [len(p) for p in item["polygons"]]
    flat = [v for p in item["polygons"] for v in p]
    return {
        "id": item["id"],
        "image": item["image"],
        "boxes": item["boxes"],
        "labels": item["labels"],
        "label_names": _strings(item["label_names"]),
        "polygons": tf.RaggedTensor.from_row_lengths(
            tf.constant(flat, tf.float32), tf.constant(lengths, tf.int64)
        ),
        "instance_attributes": encode_json(item["instance_attributes"]),
        "instance_tags": _strings(item["instance_tags"]),
        "tags": _strings(item["tags"]),
        "attributes": encode_json(item["attributes"]),
        "width": item["width"],
        "height": item["height"],
        "version": item["version"],
    }


def from_tf_element(element: dict[str, Any]) -> dict[str, Any]:
    """The item of one (unbatched) element, as numpy and Python values (inverse of
    ``to_tf_element``)."""

    def texts(t: Any) -> list[str]:
        return [v.decode() for v in t.numpy().tolist()]

    return {
        "id": element["id"].numpy().decode(),
        "image": element["image"].numpy(),
        "boxes": element["boxes"].numpy().reshape(-1, 4),
        "labels": element["labels"].numpy(),
        "label_names": texts(element["label_names"]),
        "polygons": [np.asarray(p, dtype=np.float32) for p in element["polygons"].numpy()],
        "instance_attributes": json.loads(element["instance_attributes"].numpy()),
        "instance_tags": texts(element["instance_tags"]),
        "tags": texts(element["tags"]),
        "attributes": json.loads(element["attributes"].numpy()),
        "width": int(element["width"].numpy()),
        "height": int(element["height"].numpy()),
        "version": int(element["version"].numpy()),
    }


def to_tf_dataset(stream: ItemStream, *, shuffle: bool = False, seed: int = 0) -> tf.data.Dataset:
    """Items of a slice as a tf.data pipeline; each pass over it is one epoch, and with
    ``shuffle`` successive passes use epochs 0, 1, 2, ... of the deterministic shuffle."""
    epochs = {"next": 0}

    def generate():
        epoch = epochs["next"]
        epochs["next"] += 1
        for item in stream.iter_items(shuffle=shuffle, seed=seed, epoch=epoch):
            yield to_tf_element(item)

    return tf.data.Dataset.from_generator(generate, output_signature=element_spec())
