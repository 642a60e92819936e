"""The tiny CenterNet-style detector again, in tf-keras (functional model).

Same layers, loss and decoding as :mod:`orchestrator.train.models.torch_detector` (read that
docstring for the network); the box encoding is shared in
:mod:`orchestrator.train.models.centernet`. Differences that are framework conventions, not
design: channels-last tensors, zero conv biases where torch draws them at random (conv weights
do use torch's default init, which trains this model noticeably faster than keras' Glorot), and
TF's "same" padding of stride-2 convs (extra pixel bottom/right, not both sides).
BatchNorm uses torch's momentum (0.9 in keras terms) so short runs get usable moving statistics.

The model takes ``[B, S, S, 3]`` float32 pixels 0..255 and returns one tensor
``[B, G, G, C + 4]``: C heatmap logits, then offset (2) and log size (2). That single output
is what makes plain ``model.fit`` work::

    model = build(num_classes)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss_fn)
    y = make_targets(batch["boxes"], batch["labels"], batch["num_boxes"], grid, num_classes)
    model.fit(tf.data.Dataset.from_tensor_slices((inputs(batch), y)).batch(16), epochs=...)

``loss_fn`` returns one scalar per batch (normalized by the number of objects in the batch,
as CenterNet does), which keras takes as the batch loss as is.

Import note: set ``TF_USE_LEGACY_KERAS=1`` before TensorFlow is first imported; this module
sets it (``setdefault``) itself, and imports keras as ``tf_keras``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from collections.abc import Mapping  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

import orchestrator.train.models.centernet as cn  # noqa: E402
from orchestrator.train.models.centernet import make_targets  # noqa: E402

__all__ = ["build", "inputs", "targets", "make_targets", "loss_fn", "predict_boxes"]

layers = keras.layers


def _torch_init() -> keras.initializers.Initializer:
    """torch's default conv weight init (kaiming_uniform, a=sqrt(5)): U(+-1/sqrt(fan_in)).
    A new instance per layer: one shared unseeded instance would give every layer the same values."""
    return keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")


def _conv(x: tf.Tensor, cout: int, stride: int = 1) -> tf.Tensor:
    x = layers.Conv2D(cout, 3, stride, padding="same", use_bias=False, kernel_initializer=_torch_init())(x)
    x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(x)
    return layers.ReLU()(x)


def _head(x: tf.Tensor, hidden: int, cout: int, bias: float = 0.0) -> tf.Tensor:
    x = layers.Conv2D(hidden, 3, padding="same", activation="relu", kernel_initializer=_torch_init())(x)
    return layers.Conv2D(
        cout, 1, kernel_initializer=_torch_init(), bias_initializer=keras.initializers.Constant(bias)
    )(x)


def build(num_classes: int, *, width: int = 16, stride: int = 4, image_size: int | None = None) -> keras.Model:
    """``width`` base channels (16), ``stride`` 4 or 8; ``image_size`` fixes the input size
    (default: any size divisible by 8)."""
    if stride not in (4, 8):
        raise ValueError(f"stride must be 4 or 8, got {stride}")
    if image_size is not None and image_size % 8:
        raise ValueError(f"image_size must be a multiple of 8, got {image_size}")
    w = width
    images = keras.Input((image_size, image_size, 3), dtype="float32", name="image")
    x = layers.Rescaling(1.0 / 255.0)(images)
    f4 = _conv(_conv(_conv(x, w, 2), 2 * w, 2), 2 * w)
    f8 = _conv(_conv(_conv(f4, 4 * w, 2), 4 * w), 4 * w)
    if stride == 4:
        up = layers.UpSampling2D(2, interpolation="nearest")(f8)
        up = layers.Conv2D(2 * w, 1, kernel_initializer=_torch_init())(up)
        feat = _conv(layers.Add()([f4, up]), 2 * w)
    else:
        feat = f8
    heat = _head(feat, 2 * w, num_classes, cn.PRIOR_BIAS)
    box = _head(feat, 2 * w, 4)
    out = layers.Concatenate(name="heatmap_offset_logsize")([heat, box])
    return keras.Model(images, out, name=f"centernet_w{w}_s{stride}")


def inputs(batch: Mapping[str, Any]) -> np.ndarray:
    """The model input for a batch from :func:`orchestrator.train.batches.stack`."""
    return np.asarray(batch["image"], dtype=np.float32)


def targets(batch: Mapping[str, Any], model: keras.Model) -> np.ndarray:
    """``y`` for ``model`` on this batch (numpy ``[B, G, G, C+5]``); grid and class count are
    read off the model's output shape for this batch's image size."""
    _, g, _, ch = model.output_shape
    if g is None:
        side = np.asarray(batch["image"]).shape[1]
        g = int(model.compute_output_shape((1, side, side, 3))[1])
    return make_targets(batch["boxes"], batch["labels"], batch["num_boxes"], g, ch - 4)


def loss_fn(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """Per-image losses ``[B]`` whose mean is the torch detector's loss (same formula, see
    ``centernet``): ``y_true`` ``[B, G, G, C+5]`` from :func:`make_targets`, ``y_pred`` the model
    output ``[B, G, G, C+4]``. Per image, not one scalar, so that Keras applies sample weights:
    the rows a training step pads with (``train.loops``) have weight 0. The normalizers (the
    batch's positives and boxes) count real images only: padded rows have none."""
    y_true = tf.cast(y_true, tf.float32)
    y_pred = tf.cast(y_pred, tf.float32)
    C = tf.shape(y_pred)[-1] - 4
    logits, box = y_pred[..., :C], y_pred[..., C:]
    heat, box_t, mask = y_true[..., :C], y_true[..., C : C + 4], y_true[..., C + 4 : C + 5]
    rows = tf.cast(tf.shape(y_pred)[0], tf.float32)

    p = tf.sigmoid(logits)
    pos = tf.cast(tf.equal(heat, 1.0), tf.float32)
    pos_term = pos * (1 - p) ** 2 * tf.math.log_sigmoid(logits)
    neg_term = (1 - pos) * (1 - heat) ** 4 * p**2 * tf.math.log_sigmoid(-logits)
    focal = -tf.reduce_sum(pos_term + neg_term, axis=[1, 2, 3]) / tf.maximum(tf.reduce_sum(pos), 1.0)

    n = tf.maximum(tf.reduce_sum(mask), 1.0)
    l1 = tf.abs(box - box_t) * mask
    offset_l1 = tf.reduce_sum(l1[..., 0:2], axis=[1, 2, 3]) / (2 * n)
    size_l1 = tf.reduce_sum(l1[..., 2:4], axis=[1, 2, 3]) / (2 * n)
    return rows * (focal + cn.OFFSET_WEIGHT * offset_l1 + cn.SIZE_WEIGHT * size_l1)


def predict_boxes(
    y_pred: Any, score_threshold: float = 0.3, max_detections: int = 50
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Model output ``[B, G, G, C+4]`` (tensor or numpy) -> per image
    ``(boxes [k, 4] normalized x0 y0 x1 y1, scores [k], labels [k])``, best first.

    Max-pool NMS peak picking exactly as in the torch detector's ``predict``.
    """
    y = tf.convert_to_tensor(y_pred, tf.float32)
    B, G, ch = int(y.shape[0]), int(y.shape[1]), int(y.shape[-1])
    C = ch - 4
    heat = tf.sigmoid(y[..., :C])
    peaks = heat * tf.cast(tf.equal(tf.nn.max_pool2d(heat, 3, 1, "SAME"), heat), tf.float32)
    # flatten as [B, C, G*G] so ranking ties break like the torch version
    flat = tf.reshape(tf.transpose(peaks, [0, 3, 1, 2]), [B, -1])
    scores, idx = tf.math.top_k(flat, k=min(max_detections, C * G * G))
    idx = idx.numpy()
    classes, cell = idx // (G * G), idx % (G * G)
    box = tf.reshape(y[..., C : C + 4], [B, G * G, 4]).numpy()
    raw = np.take_along_axis(box, cell[:, :, None], axis=1)
    return cn.decode_peaks(scores.numpy(), classes, cell // G, cell % G, raw, G, score_threshold)
