"""Detection metrics in pure numpy: box IoU and VOC-style mean average precision.

Formats (the output of the models' ``predict`` functions and of
:func:`orchestrator.train.batches.ground_truth`)::

    predictions   list, one entry per image: (boxes [k, 4], scores [k], labels [k])
    ground_truth  list, one entry per image: (boxes [n, 4], labels [n])

Boxes are ``x_min, y_min, x_max, y_max`` in any one coordinate system (normalized or pixels),
the same for predictions and ground truth.

How :func:`mean_average_precision` scores (PASCAL VOC 2010+ protocol):

* For each class, all predictions of that class over all images are sorted by score (highest
  first; ties keep input order). Each one, in turn, is compared with the ground-truth boxes of
  the same class in its image and takes the one it overlaps most. It is a true positive if that
  IoU is ``>= iou_threshold`` and that box was not already taken by a higher-scored prediction;
  otherwise a false positive (so a duplicate detection of an object costs precision).
* AP is the area under the precision/recall curve with all-point interpolation: precision is
  first made monotone (each point gets the best precision at any higher recall), then summed
  over the recall steps.
* mAP is the mean AP over the classes that have at least one ground-truth box in the whole
  set. Predictions of classes without ground truth are ignored (they cannot be scored).
  If no class has ground truth, mAP is undefined and ``nan`` is returned.
* There are no "difficult"/"crowd" exemptions: every ground-truth box counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["iou", "average_precision", "mean_average_precision"]


def iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``[N, 4]`` and ``[M, 4]`` boxes -> ``[N, M]`` float64.

    Boxes that only touch (shared edge or corner) have IoU 0; a pair whose union has no area
    (two degenerate boxes) has IoU 0 rather than nan.
    """
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """All-point interpolated AP from a recall/precision curve (in detection order)."""
    mrec = np.concatenate([[0.0], np.asarray(recall, dtype=np.float64), [1.0]])
    mpre = np.concatenate([[0.0], np.asarray(precision, dtype=np.float64), [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    step = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


def mean_average_precision(
    predictions: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    ground_truth: Sequence[tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    iou_threshold: float = 0.5,
) -> float:
    """VOC-style mAP at one IoU threshold; see the module docstring for the exact protocol."""
    if len(predictions) != len(ground_truth):
        raise ValueError(f"{len(predictions)} prediction entries for {len(ground_truth)} images")
    gt = [(np.asarray(b, np.float64).reshape(-1, 4), np.asarray(l).reshape(-1)) for b, l in ground_truth]
    pr = [
        (np.asarray(b, np.float64).reshape(-1, 4), np.asarray(s, np.float64).reshape(-1), np.asarray(l).reshape(-1))
        for b, s, l in predictions
    ]
    aps = []
    for c in range(num_classes):
        gt_c = [b[l == c] for b, l in gt]
        n_gt = sum(len(g) for g in gt_c)
        if n_gt == 0:
            continue
        # every prediction of class c as (score, image index, box), best first
        scores, images, boxes = [], [], []
        for i, (b, s, l) in enumerate(pr):
            m = l == c
            scores.append(s[m])
            images.append(np.full(int(m.sum()), i))
            boxes.append(b[m])
        scores, images, boxes = np.concatenate(scores), np.concatenate(images), np.concatenate(boxes)
        order = np.argsort(-scores, kind="stable")
        taken = [np.zeros(len(g), dtype=bool) for g in gt_c]
        tp = np.zeros(len(order))
        for k, d in enumerate(order):
            g = gt_c[images[d]]
            if len(g) == 0:
                continue
            overlaps = iou(boxes[d : d + 1], g)[0]
            j = int(np.argmax(overlaps))
            if overlaps[j] >= iou_threshold and not taken[images[d]][j]:
                taken[images[d]][j] = True
                tp[k] = 1.0
        tp_cum = np.cumsum(tp)
        recall = tp_cum / n_gt
        precision = tp_cum / np.arange(1, len(order) + 1)
        aps.append(average_precision(recall, precision) if len(order) else 0.0)
    return float(np.mean(aps)) if aps else float("nan")
