"""TensorFlow: a real ``tf.data.Dataset`` with an explicit element spec.

Per element, ``image`` is uint8 [H, W, 3], ``boxes`` float32 [N, 4] and ``labels`` int64 [N]
with N varying by item, so ``.ragged_batch(b)`` gives RaggedTensors and
``.padded_batch(b, padding_values=...)`` pads; ``polygons`` is a RaggedTensor [N, None].
Use tf-keras (``TF_USE_LEGACY_KERAS=1``) for ``model.fit`` under MultiWorkerMirroredStrategy.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from orchestrator.optional import require

tf = require("tensorflow")

if TYPE_CHECKING:
    from orchestrator.stream.dataset import Dataset


def element_spec() -> dict:
    return {
        "id": tf.TensorSpec([], tf.string),
        "image": tf.TensorSpec([None, None, 3], tf.uint8),
        "boxes": tf.TensorSpec([None, 4], tf.float32),
        "labels": tf.TensorSpec([None], tf.int64),
        "polygons": tf.RaggedTensorSpec([None, None], tf.float32, ragged_rank=1),
        "tags": tf.TensorSpec([None], tf.string),
        "attributes": tf.TensorSpec([], tf.string),  # JSON object
        "instance_attributes": tf.TensorSpec([], tf.string),  # JSON list, aligned with boxes
        "width": tf.TensorSpec([], tf.int64),
        "height": tf.TensorSpec([], tf.int64),
        "version": tf.TensorSpec([], tf.int64),
    }


def to_tf_dataset(dataset: Dataset, *, shuffle: bool = False, seed: int = 0) -> tf.data.Dataset:
    """Items of ``dataset`` as a tf.data pipeline; each pass over it is one epoch, and with
    ``shuffle`` successive passes use epochs 0, 1, 2, ... of the deterministic shuffle."""
    epochs = {"next": 0}

    def generate():
        epoch = epochs["next"]
        epochs["next"] += 1
        for item in dataset.iter_items(shuffle=shuffle, seed=seed, epoch=epoch):
            lengths = [len(p) for p in item["polygons"]]
            flat = [v for p in item["polygons"] for v in p]
            yield {
                "id": item["id"],
                "image": item["image"],
                "boxes": item["boxes"],
                "labels": item["labels"],
                "polygons": tf.RaggedTensor.from_row_lengths(
                    tf.constant(flat, tf.float32), tf.constant(lengths, tf.int64)
                ),
                "tags": tf.constant(item["tags"], tf.string, shape=[len(item["tags"])]),
                "attributes": json.dumps(item["attributes"], sort_keys=True),
                "instance_attributes": json.dumps(item["instance_attributes"], sort_keys=True),
                "width": item["width"],
                "height": item["height"],
                "version": item["version"],
            }

    return tf.data.Dataset.from_generator(generate, output_signature=element_spec())
