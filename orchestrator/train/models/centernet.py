"""The box encoding shared by the torch and keras detectors (numpy only).

Both detectors are CenterNet-style ("Objects as Points", Zhou et al. 2019): the image is cut
into a ``grid x grid`` output map (``grid = image_size // stride``), and an object is
represented by the one cell that holds its box center.

Targets (:func:`make_targets`) are one dense float32 array ``[B, grid, grid, C + 5]``, channels
last, so that keras ``model.fit`` can take them as ``y`` and torch can slice them::

    [..., 0:C]      heatmap: per class, a Gaussian bump of peak exactly 1.0 at each object's
                    center cell, sigma = (box size in cells) / 6 per axis, at least 0.5 cell;
                    overlapping bumps of the same class take the max
    [..., C:C+2]    offset: where the true center lies inside its cell, (dx, dy) in [0, 1)
    [..., C+2:C+4]  log size: log(w * grid), log(h * grid), the box size in cells, log-space
    [..., C+4]      mask: 1.0 at the center cell of some object, else 0 (where offset and
                    size are defined); two objects in one cell: the later one wins

The raw network output is ``C + 4`` channels per cell: C heatmap logits, then the same
offset (2) and log size (2). :func:`decode_peaks` turns picked peaks back into boxes.

The loss (implemented once per framework, same formula):
``focal(heatmap) + OFFSET_WEIGHT * L1(offset) + SIZE_WEIGHT * L1(log size)``,
where the focal term is CenterNet's penalty-reduced pixel-wise focal loss (alpha=2, beta=4)
summed over all cells and classes and divided by the number of objects in the batch, and the
L1 terms are averaged over the object cells and their two coordinates.
"""

from __future__ import annotations

import numpy as np

__all__ = ["OFFSET_WEIGHT", "SIZE_WEIGHT", "PRIOR_BIAS", "make_targets", "decode_peaks"]

OFFSET_WEIGHT = 1.0
SIZE_WEIGHT = 1.0
# heatmap logit bias at init: sigmoid(-2.19) ~= 0.1, CenterNet's prior; keeps the focal loss
# of the (many) background cells from swamping the first steps.
PRIOR_BIAS = -2.19
MIN_SIGMA = 0.5
MAX_LOG_SIZE_MARGIN = 1.0  # decode clamps log size to log(grid) + this (a box at most e x the image)


def make_targets(
    boxes: np.ndarray, labels: np.ndarray, num_boxes: np.ndarray, grid: int, num_classes: int
) -> np.ndarray:
    """Padded normalized boxes ``[B, M, 4]``, labels ``[B, M]``, counts ``[B]`` -> ``[B, G, G, C+5]``.

    Rows at or beyond ``num_boxes`` and rows with a negative label are padding and ignored;
    labels ``>= num_classes`` raise (a label map / model mismatch should fail loudly).
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    labels = np.asarray(labels)
    num_boxes = np.asarray(num_boxes).reshape(-1)
    if boxes.ndim == 2:  # one example, not a batch
        boxes, labels = boxes[None], labels[None]
    B = boxes.shape[0]
    C = num_classes
    out = np.zeros((B, grid, grid, C + 5), dtype=np.float32)
    cells = np.arange(grid, dtype=np.float32)
    for b in range(B):
        for k in range(int(num_boxes[b])):
            c = int(labels[b, k])
            if c < 0:
                continue
            if c >= C:
                raise ValueError(f"label {c} out of range for {C} classes")
            x0, y0, x1, y1 = (float(v) * grid for v in boxes[b, k])
            w, h = max(x1 - x0, 1e-3), max(y1 - y0, 1e-3)
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            ix, iy = min(int(cx), grid - 1), min(int(cy), grid - 1)
            sx, sy = max(w / 6, MIN_SIGMA), max(h / 6, MIN_SIGMA)
            bump = np.exp(
                -((cells[None, :] - ix) ** 2) / (2 * sx * sx) - ((cells[:, None] - iy) ** 2) / (2 * sy * sy)
            )
            np.maximum(out[b, :, :, c], bump, out=out[b, :, :, c])
            out[b, iy, ix, c] = 1.0
            out[b, iy, ix, C:] = (cx - ix, cy - iy, np.log(w), np.log(h), 1.0)
    return out


def decode_peaks(
    scores: np.ndarray,
    classes: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    box_raw: np.ndarray,
    grid: int,
    score_threshold: float,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Top-k peaks per image -> ``[(boxes [k, 4] in [0, 1], scores [k], labels [k]), ...]``.

    ``scores, classes, ys, xs``: ``[B, K]``, best first; ``box_raw``: ``[B, K, 4]`` the raw
    offset and log-size outputs at those cells. Peaks below ``score_threshold`` are dropped.
    """
    out = []
    for b in range(scores.shape[0]):
        keep = scores[b] >= score_threshold
        s, c = scores[b][keep].astype(np.float32), classes[b][keep].astype(np.int64)
        y, x, raw = ys[b][keep], xs[b][keep], box_raw[b][keep].astype(np.float32)
        cx = (x + raw[:, 0]) / grid
        cy = (y + raw[:, 1]) / grid
        wh = np.exp(np.clip(raw[:, 2:4], -10.0, np.log(grid) + MAX_LOG_SIZE_MARGIN)) / grid
        boxes = np.stack([cx - wh[:, 0] / 2, cy - wh[:, 1] / 2, cx + wh[:, 0] / 2, cy + wh[:, 1] / 2], axis=1)
        out.append((np.clip(boxes, 0.0, 1.0).astype(np.float32).reshape(-1, 4), s, c))
    return out
