"""A light counting baseline: predict how many instances of each class an image holds.

No boxes at inference, only ``counts [B, C]``; a sanity baseline for the detector (a detector
that cannot beat this at counting is not finding objects) and a cheap model for pipeline tests.

Network, the same in both frameworks (``width`` = w, default 16)::

    images [B, S, S, 3] 0..255, scaled to [0, 1] inside
    4 x (conv3x3 stride 2 + BatchNorm + ReLU), channels w, 2w, 4w, 4w  -> S/16
    global average pool -> linear -> C log-rates r (bias 0: one object per class at init)

Loss: Poisson negative log-likelihood of the true counts under rate ``exp(r)``, without the
constant ``log(y!)``: ``mean(exp(r) - y * r)`` over images and classes (its minimum is at
``exp(r) = y``, and it is not the MSE of counts). Prediction: ``exp(r)``, the expected count
(float; round it for an integer count).

Targets come from the padded labels of a batch (:func:`count_targets`), so the same batches
feed the detector and the counter. TensorFlow is imported only by the keras functions, torch
only by the torch functions, so either framework can be used without the other installed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "count_targets",
    "build_torch", "torch_inputs", "torch_loss", "torch_predict",
    "build_keras", "keras_inputs", "keras_targets", "keras_loss", "keras_predict",
]


def count_targets(labels: Any, num_classes: int) -> np.ndarray:
    """Padded labels ``[B, M]`` (-1 = padding) -> float32 counts ``[B, C]``.

    Labels ``>= num_classes`` raise, as in the detector's targets.
    """
    labels = np.asarray(labels)
    if labels.size and labels.max() >= num_classes:
        raise ValueError(f"label {labels.max()} out of range for {num_classes} classes")
    return (labels[..., None] == np.arange(num_classes)).sum(axis=-2).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# torch


def build_torch(num_classes: int, *, width: int = 16) -> Any:
    """A ``torch.nn.Module``: images ``[B, S, S, 3]`` 0..255 (moved to the model's device)
    -> log-rates ``[B, C]``."""
    import torch
    from torch import nn

    class Counter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            chans = [3, width, 2 * width, 4 * width, 4 * width]
            self.features = nn.Sequential(*[
                nn.Sequential(nn.Conv2d(a, b, 3, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True))
                for a, b in zip(chans[:-1], chans[1:])
            ])
            self.head = nn.Linear(chans[-1], num_classes)
            nn.init.zeros_(self.head.bias)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = images.to(self.head.weight.device).permute(0, 3, 1, 2).float() / 255.0
            x = self.features(x)
            return self.head(x.mean(dim=(2, 3)))

    return Counter()


def torch_inputs(batch: Mapping[str, Any]) -> Any:
    import torch

    return torch.as_tensor(np.asarray(batch["image"]))


def torch_loss(model_out: Any, batch: Mapping[str, Any]) -> Any:
    """Poisson NLL of the batch's counts (from ``batch['labels']``) under ``exp(model_out)``."""
    import torch
    import torch.nn.functional as F

    labels = batch["labels"]
    labels = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else labels
    y = torch.from_numpy(count_targets(labels, model_out.shape[-1])).to(model_out.device)
    return F.poisson_nll_loss(model_out.float(), y, log_input=True, full=False)


def torch_predict(model_out: Any) -> np.ndarray:
    """Expected counts ``[B, C]`` (float32 numpy)."""
    return model_out.detach().float().exp().cpu().numpy()


# ----------------------------------------------------------------------------------------------
# keras


def build_keras(num_classes: int, *, width: int = 16, image_size: int | None = None) -> Any:
    """A ``keras.Model``: images ``[B, S, S, 3]`` float 0..255 -> log-rates ``[B, C]``."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tf_keras as keras

    layers = keras.layers
    images = keras.Input((image_size, image_size, 3), dtype="float32", name="image")
    x = layers.Rescaling(1.0 / 255.0)(images)
    for c in (width, 2 * width, 4 * width, 4 * width):
        x = layers.Conv2D(c, 3, 2, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(x)
        x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    out = layers.Dense(num_classes, name="log_rate")(x)
    return keras.Model(images, out, name=f"counter_w{width}")


def keras_inputs(batch: Mapping[str, Any]) -> np.ndarray:
    return np.asarray(batch["image"], dtype=np.float32)


def keras_targets(batch: Mapping[str, Any], model: Any) -> np.ndarray:
    """``y`` for ``model.fit``: counts ``[B, C]``, C read off the model's output."""
    return count_targets(batch["labels"], int(model.output_shape[-1]))


def keras_loss(y_true: Any, y_pred: Any) -> Any:
    """Per-image Poisson NLL (mean over classes); keras averages it over the batch."""
    import tensorflow as tf

    y_true = tf.cast(y_true, tf.float32)
    y_pred = tf.cast(y_pred, tf.float32)
    return tf.reduce_mean(tf.exp(y_pred) - y_true * y_pred, axis=-1)


def keras_predict(y_pred: Any) -> np.ndarray:
    """Expected counts ``[B, C]`` (float32 numpy)."""
    return np.exp(np.asarray(y_pred, dtype=np.float32))
