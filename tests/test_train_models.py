"""Unit tests for orchestrator.train: batches, metrics, the detectors and the counting baseline.

Fast and Ray-free: demo items are read straight from the COCO file with Pillow.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import pytest
from PIL import Image, ImageOps

from orchestrator.dev.demo import make_demo_data
from orchestrator.errors import ConfigError
from orchestrator.train.batches import ground_truth, prepare_item, stack
from orchestrator.train.metrics import average_precision, iou, mean_average_precision
from orchestrator.train.models import MODELS, get_model
from orchestrator.train.models.centernet import decode_peaks, make_targets

NUM_CLASSES = 4
SIZE = 128
MAX_BOXES = 32


# ----------------------------------------------------------------------------------------------
# demo data


def _load_demo(out: Path, n: int, seed: int = 0) -> list[dict]:
    coco = json.loads(make_demo_data(out, n, seed=seed).read_text())
    per: dict[int, list] = {}
    for a in coco["annotations"]:
        per.setdefault(a["image_id"], []).append(a)
    items = []
    for im in coco["images"]:
        with Image.open(out / "images" / im["file_name"]) as f:
            image = np.asarray(ImageOps.exif_transpose(f).convert("RGB"))
        anns = per.get(im["id"], [])
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], np.float32)
        labels = np.array([a["category_id"] - 1 for a in anns], np.int64)
        items.append({"image": image, "boxes": boxes.reshape(-1, 4), "labels": labels})
    return items


@pytest.fixture(scope="module")
def demo_batch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    items = _load_demo(tmp_path_factory.mktemp("demo64"), 64)
    return stack([prepare_item(it, SIZE, MAX_BOXES) for it in items])


@pytest.fixture
def torch_one_thread():
    """One intra-op thread for the torch training tests: on a busy 2-core machine, torch's
    default OpenMP threads spin against other processes and a 3 s loop can take 90 s."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(before)


def _minibatches(batch: dict, steps: int, size: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = len(batch["num_boxes"])
    for _ in range(steps):
        idx = rng.choice(n, size, replace=False)
        yield {k: v[idx] for k, v in batch.items()}


def _assert_valid_predictions(preds: list, n_images: int, max_detections: int) -> None:
    assert len(preds) == n_images
    for boxes, scores, labels in preds:
        k = len(scores)
        assert boxes.shape == (k, 4) and boxes.dtype == np.float32
        assert labels.shape == (k,) and labels.dtype == np.int64
        assert k <= max_detections
        assert np.all((boxes >= 0) & (boxes <= 1))
        assert np.all(boxes[:, 2] >= boxes[:, 0]) and np.all(boxes[:, 3] >= boxes[:, 1])
        assert np.all((labels >= 0) & (labels < NUM_CLASSES))
        assert np.all(np.diff(scores) <= 0)  # best first


# ----------------------------------------------------------------------------------------------
# iou / mAP


def test_iou_edge_cases() -> None:
    a = np.array([[0, 0, 10, 10]], np.float32)
    assert iou(a, a)[0, 0] == pytest.approx(1.0)
    assert iou(a, [[20, 20, 30, 30]])[0, 0] == 0.0  # disjoint
    assert iou(a, [[10, 0, 20, 10]])[0, 0] == 0.0  # shares an edge
    assert iou(a, [[10, 10, 20, 20]])[0, 0] == 0.0  # shares a corner
    assert iou(a, [[0, 0, 5, 10]])[0, 0] == pytest.approx(0.5)  # contained, half the area
    assert iou(a, [[5, 0, 15, 10]])[0, 0] == pytest.approx(5 / 15)  # half overlap
    assert iou(a, [[3, 3, 3, 8]])[0, 0] == 0.0  # zero-area box
    assert iou([[3, 3, 3, 3]], [[3, 3, 3, 3]])[0, 0] == 0.0  # two points: 0, not nan
    m = iou(np.zeros((3, 4)), np.ones((5, 4)))
    assert m.shape == (3, 5) and not np.isnan(m).any()
    assert iou(np.zeros((0, 4)), a).shape == (0, 1)


def _img(gt_boxes, gt_labels, pr_boxes=(), pr_scores=(), pr_labels=()):
    gt = (np.array(gt_boxes, np.float32).reshape(-1, 4), np.array(gt_labels, np.int64))
    pr = (np.array(pr_boxes, np.float32).reshape(-1, 4), np.array(pr_scores, np.float32), np.array(pr_labels, np.int64))
    return gt, pr


A, B, C_, FAR = [0, 0, 10, 10], [20, 20, 30, 30], [40, 0, 50, 10], [80, 80, 90, 90]


def test_map_perfect_predictions_is_one() -> None:
    imgs = [_img([A, B], [0, 1], [A, B], [0.9, 0.8], [0, 1]), _img([C_], [2], [C_], [0.3], [2])]
    gts, preds = zip(*imgs)
    assert mean_average_precision(preds, gts, 3) == pytest.approx(1.0)


def test_map_no_predictions_is_zero() -> None:
    gts, preds = zip(_img([A, B], [0, 1]), _img([C_], [2]))
    assert mean_average_precision(preds, gts, 3) == 0.0


def test_map_known_values() -> None:
    # class 0, 2 GT: FP(0.9), TP(0.8), TP(0.7) -> recall .5, 1 at precision .5, .667 -> envelope
    # .667 everywhere -> AP = 2/3
    gts, preds = zip(_img([A, B], [0, 0], [FAR, A, B], [0.9, 0.8, 0.7], [0, 0, 0]))
    assert mean_average_precision(preds, gts, 1) == pytest.approx(2 / 3)
    # a duplicate of A is a false positive: TP, FP, TP -> AP = .5 * 1 + .5 * 2/3
    gts, preds = zip(_img([A, B], [0, 0], [A, A, B], [0.9, 0.8, 0.7], [0, 0, 0]))
    assert mean_average_precision(preds, gts, 1) == pytest.approx(0.5 + 1 / 3)
    # half right over two classes: class 0 perfect (AP 1), class 1 found with the wrong label (AP 0)
    gts, preds = zip(_img([A], [0], [A], [0.9], [0]), _img([B], [1], [B], [0.9], [0]))
    assert mean_average_precision(preds, gts, 2) == pytest.approx(0.5)
    # matching is per image: the right box in the wrong image is a false positive
    gts, preds = zip(_img([A], [0], [], [], []), _img([B], [0], [A], [0.9], [0]))
    assert mean_average_precision(preds, gts, 1) == 0.0


def test_map_classes_without_ground_truth_are_ignored() -> None:
    gts, preds = zip(_img([A], [0], [A, B], [0.5, 0.9], [0, 3]))
    assert mean_average_precision(preds, gts, 4) == pytest.approx(1.0)
    gts, preds = zip(_img([], [], [A], [0.5], [0]))
    assert math.isnan(mean_average_precision(preds, gts, 4))
    with pytest.raises(ValueError):
        mean_average_precision([], gts, 4)


def test_map_iou_threshold_is_inclusive() -> None:
    half = [0, 0, 5, 10]  # IoU with A exactly 0.5
    gts, preds = zip(_img([A], [0], [half], [0.9], [0]))
    assert mean_average_precision(preds, gts, 1, iou_threshold=0.5) == pytest.approx(1.0)
    assert mean_average_precision(preds, gts, 1, iou_threshold=0.6) == 0.0


def test_average_precision_all_point_interpolation() -> None:
    assert average_precision([], []) == 0.0
    assert average_precision([0.5, 1.0], [1.0, 1.0]) == pytest.approx(1.0)
    # precision rises again at higher recall: the envelope lifts the earlier step
    assert average_precision([0.25, 0.25, 0.5], [1.0, 0.5, 2 / 3]) == pytest.approx(0.25 + 0.25 * 2 / 3)


# ----------------------------------------------------------------------------------------------
# batches


def test_prepare_item_scales_pads_and_resizes() -> None:
    image = np.zeros((100, 200, 3), np.uint8)  # H=100, W=200
    image[:, 100:] = 255
    item = {"image": image, "boxes": np.array([[20, 10, 120, 60], [0, 0, 200, 100]], np.float32),
            "labels": np.array([2, 0]), "id": "ignored"}
    ex = prepare_item(item, 64, 5)
    assert set(ex) == {"image", "boxes", "labels", "num_boxes"}
    assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.uint8
    assert ex["image"][:, :30].max() == 0 and ex["image"][:, 34:].min() == 255  # stretched, not padded
    assert ex["boxes"].shape == (5, 4) and ex["boxes"].dtype == np.float32
    np.testing.assert_allclose(ex["boxes"][0], [0.1, 0.1, 0.6, 0.6], rtol=1e-6)
    np.testing.assert_allclose(ex["boxes"][1], [0, 0, 1, 1])
    assert not ex["boxes"][2:].any()
    assert ex["labels"].dtype == np.int64 and ex["labels"].tolist() == [2, 0, -1, -1, -1]
    assert ex["num_boxes"].dtype == np.int64 and ex["num_boxes"] == 2


def test_prepare_item_truncates_clips_and_drops_degenerate() -> None:
    boxes = np.array([[i, i, i + 10, i + 10] for i in range(6)], np.float32)
    ex = prepare_item({"image": np.zeros((50, 50, 3), np.uint8), "boxes": boxes, "labels": np.arange(6)}, 32, 4)
    assert ex["num_boxes"] == 4 and ex["labels"].tolist() == [0, 1, 2, 3]  # first max_boxes kept
    item = {
        "image": np.zeros((40, 80), np.uint8),  # grayscale
        "boxes": np.array([[-8, 30, 20, 48], [10, 10, 10, 20], [90, 0, 99, 10], [5, 5, 6, 6]], np.float32),
        "labels": np.array([1, 2, 3, 0]),
    }
    ex = prepare_item(item, 16, 8)
    assert ex["image"].shape == (16, 16, 3)
    assert ex["labels"].tolist()[:3] == [1, 0, -1] and ex["num_boxes"] == 2  # zero-width and outside dropped
    np.testing.assert_allclose(ex["boxes"][0], [0, 0.75, 0.25, 1.0])  # overflow clipped
    rows = np.empty(2, dtype=object)  # how Arrow may hand back a ragged N x 4 column
    rows[0], rows[1] = np.array([0, 0, 5, 5.0]), np.array([5, 5, 10, 10.0])
    ex = prepare_item({"image": np.zeros((10, 10, 3), np.uint8), "boxes": rows, "labels": [0, 1]}, 8, 3)
    np.testing.assert_allclose(ex["boxes"][:2], [[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]])
    empty = prepare_item({"image": np.zeros((10, 10, 3), np.uint8), "boxes": np.zeros((0, 4)),
                          "labels": np.zeros((0,), np.int64)}, 8, 3)
    assert empty["num_boxes"] == 0 and empty["labels"].tolist() == [-1, -1, -1]
    with pytest.raises(ValueError):
        prepare_item({"image": np.zeros((10, 10, 3), np.uint8), "boxes": np.zeros((2, 4)), "labels": [1]}, 8, 3)


def test_stack_and_ground_truth_round_trip(demo_batch) -> None:
    assert demo_batch["image"].shape == (64, SIZE, SIZE, 3)
    assert demo_batch["boxes"].shape == (64, MAX_BOXES, 4)
    assert demo_batch["labels"].shape == (64, MAX_BOXES) and demo_batch["num_boxes"].shape == (64,)
    gt = ground_truth(demo_batch)
    assert sum(len(b) for b, _ in gt) == demo_batch["num_boxes"].sum() > 0
    assert all(np.all(l >= 0) and len(b) == len(l) for b, l in gt)
    assert np.all(demo_batch["labels"][demo_batch["labels"] >= 0] < NUM_CLASSES)


def test_make_targets_and_decode_round_trip() -> None:
    boxes = np.zeros((1, 3, 4), np.float32)
    boxes[0, 0] = [0.25, 0.5, 0.5, 0.75]  # center (0.375, 0.625) -> cell (3, 5) of 8, offset (0, 0)
    boxes[0, 1] = [0.0, 0.0, 0.3, 0.2]
    labels = np.array([[1, 3, 2]])  # third row is beyond num_boxes: padding
    t = make_targets(boxes, labels, np.array([2]), grid=8, num_classes=4)
    assert t.shape == (1, 8, 8, 9) and t.dtype == np.float32
    assert t[0, 5, 3, 1] == 1.0 and (t[..., 1] == 1.0).sum() == 1 and t[..., 2].max() == 0
    assert t[0, ..., 8].sum() == 2
    np.testing.assert_allclose(t[0, 5, 3, 4:8], [0.0, 0.0, np.log(2), np.log(2)], atol=1e-6)
    # decode the target itself: exact boxes back
    peaks = [(5, 3, 1), (0, 1, 3)]  # (y, x, class) of the two centers
    ys, xs, cls = (np.array([[p[i] for p in peaks]]) for i in range(3))
    raw = t[0, ys[0], xs[0], 4:8][None]
    (out_boxes, scores, out_labels), = decode_peaks(np.array([[0.9, 0.8]]), cls, ys, xs, raw, 8, 0.5)
    np.testing.assert_allclose(out_boxes, boxes[0, :2], atol=1e-6)
    assert out_labels.tolist() == [1, 3]


# ----------------------------------------------------------------------------------------------
# torch detector


def test_torch_detector_learns_on_demo_data(demo_batch, torch_one_thread) -> None:
    torch = torch_one_thread
    torch.manual_seed(0)
    spec = get_model("detector", "torch", NUM_CLASSES)
    model = spec.model
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    losses = []
    t0 = time.perf_counter()
    for batch in _minibatches(demo_batch, 60):
        loss = spec.loss(model(spec.inputs(batch)), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    elapsed = time.perf_counter() - t0
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    print(f"torch detector: loss {first:.3f} -> {last:.3f} over 60 steps in {elapsed:.1f}s")
    assert all(np.isfinite(losses))
    assert last < 0.6 * first  # measured ~3.7 -> ~0.4

    model.eval()
    with torch.no_grad():
        out = model(spec.inputs(demo_batch))
    assert out["heatmap"].shape == (64, NUM_CLASSES, SIZE // 4, SIZE // 4)
    preds = spec.predict(out, score_threshold=0.05, max_detections=30)
    _assert_valid_predictions(preds, 64, 30)
    m = mean_average_precision(preds, ground_truth(demo_batch), NUM_CLASSES)
    print(f"torch detector: train-set mAP@0.5 {m:.3f}")
    assert m > 0.2  # measured ~0.6; an untrained model scores ~0


def test_torch_detector_stride_8_and_empty_images() -> None:
    torch = pytest.importorskip("torch")
    from orchestrator.train.models import torch_detector as td

    model = td.build(3, width=8, stride=8)
    batch = stack([prepare_item({"image": np.zeros((70, 90, 3), np.uint8), "boxes": np.zeros((0, 4)),
                                 "labels": np.zeros((0,), np.int64)}, 64, 4)] * 2)
    out = model(td.inputs(batch))
    assert out["heatmap"].shape == (2, 3, 8, 8) and out["box"].shape == (2, 4, 8, 8)
    loss = td.loss(out, batch)  # no objects at all: focal loss of the background only
    assert torch.isfinite(loss) and loss.item() > 0
    _assert_valid_predictions(td.predict(out, 0.0, 5), 2, 5)
    with pytest.raises(ValueError):
        td.build(3, stride=2)
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.zeros((1, 100, 100, 3), dtype=torch.uint8))


# ----------------------------------------------------------------------------------------------
# keras detector


def test_keras_detector_learns_with_fit(demo_batch) -> None:
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("tf_keras")
    keras.utils.set_random_seed(0)
    spec = get_model("detector", "tensorflow", NUM_CLASSES, image_size=SIZE)
    model = spec.model
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=spec.loss)
    x, y = spec.inputs(demo_batch), spec.targets(demo_batch, model)
    assert x.dtype == np.float32 and y.shape == (64, SIZE // 4, SIZE // 4, NUM_CLASSES + 5)
    data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(64, seed=0).batch(16)
    before = model.evaluate(x, y, batch_size=16, verbose=0)
    t0 = time.perf_counter()
    hist = model.fit(data, epochs=12, verbose=0)
    elapsed = time.perf_counter() - t0
    after = model.evaluate(x, y, batch_size=16, verbose=0)
    print(f"keras detector: eval loss {before:.3f} -> {after:.3f}, fit loss "
          f"{hist.history['loss'][0]:.3f} -> {hist.history['loss'][-1]:.3f} (48 steps, {elapsed:.1f}s)")
    assert np.isfinite(hist.history["loss"]).all()
    assert after < 0.6 * before  # measured ~4.6 -> ~1.0
    preds = spec.predict(model.predict(x, verbose=0), score_threshold=0.05, max_detections=30)
    _assert_valid_predictions(preds, 64, 30)
    m = mean_average_precision(preds, ground_truth(demo_batch), NUM_CLASSES)
    print(f"keras detector: train-set mAP@0.5 {m:.3f}")
    assert m > 0.1


def test_keras_detector_any_input_size_and_targets() -> None:
    pytest.importorskip("tensorflow")
    from orchestrator.train.models import keras_detector as kd

    model = kd.build(2, width=8, stride=8)  # no image_size: grid read off the batch
    batch = stack([prepare_item({"image": np.zeros((30, 40, 3), np.uint8), "boxes": [[0, 0, 20, 15]],
                                 "labels": [1]}, 64, 3)] * 3)
    y = kd.targets(batch, model)
    assert y.shape == (3, 8, 8, 7) and y[..., 1].max() == 1.0
    out = model(kd.inputs(batch), training=False)
    assert out.shape == (3, 8, 8, 6)
    assert np.isfinite(float(np.mean(kd.loss_fn(y, out))))
    with pytest.raises(ValueError, match="multiple of 8"):
        kd.build(2, image_size=100)


def test_keras_detector_loss_with_zero_weight_padding_equals_the_loss_of_the_real_rows(demo_batch) -> None:
    """The training loop pads a short step with blank rows of sample weight 0 (train.loops);
    Keras's weighted mean over the padded batch must be the loss of the real rows alone."""
    pytest.importorskip("tensorflow")
    from orchestrator.train.loops import blank_batch
    from orchestrator.train.models import keras_detector as kd

    g, real = SIZE // 4, {k: v[:3] for k, v in demo_batch.items()}
    blank = blank_batch(SIZE, demo_batch["boxes"].shape[1], 2)
    padded = {k: np.concatenate([real[k], blank[k]]) for k in ("boxes", "labels", "num_boxes")}
    raw = np.random.default_rng(2).normal(0, 1.5, (5, g, g, NUM_CLASSES + 4)).astype(np.float32)
    alone = kd.loss_fn(kd.make_targets(real["boxes"], real["labels"], real["num_boxes"], g, NUM_CLASSES), raw[:3])
    per_row = kd.loss_fn(kd.make_targets(padded["boxes"], padded["labels"], padded["num_boxes"], g, NUM_CLASSES), raw)
    weights = np.array([1, 1, 1, 0, 0], np.float32)
    assert float(np.sum(np.asarray(per_row) * weights) / 5) == pytest.approx(float(np.mean(alone)), rel=1e-5)


def test_torch_and_keras_detectors_agree_on_loss_and_decoding(demo_batch) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("tensorflow")
    from orchestrator.train.models import keras_detector as kd
    from orchestrator.train.models import torch_detector as td

    batch = {k: v[:8] for k, v in demo_batch.items()}
    g = SIZE // 4
    raw = np.random.default_rng(1).normal(0, 1.5, (8, g, g, NUM_CLASSES + 4)).astype(np.float32)
    raw[..., :NUM_CLASSES] -= 2.0
    torch_out = {"heatmap": torch.from_numpy(raw[..., :NUM_CLASSES]).permute(0, 3, 1, 2),
                 "box": torch.from_numpy(raw[..., NUM_CLASSES:]).permute(0, 3, 1, 2)}
    y = kd.make_targets(batch["boxes"], batch["labels"], batch["num_boxes"], g, NUM_CLASSES)
    assert float(np.mean(kd.loss_fn(y, raw))) == pytest.approx(td.loss(torch_out, batch).item(), rel=1e-4)
    for (b1, s1, l1), (b2, s2, l2) in zip(td.predict(torch_out, 0.2, 20), kd.predict_boxes(raw, 0.2, 20)):
        np.testing.assert_allclose(s1, s2, rtol=1e-5)
        np.testing.assert_allclose(b1, b2, atol=1e-5)
        np.testing.assert_array_equal(l1, l2)


# ----------------------------------------------------------------------------------------------
# counting baseline


def test_counting_targets() -> None:
    from orchestrator.train.models.counting import count_targets

    c = count_targets(np.array([[0, 0, 3, -1, -1], [-1, -1, -1, -1, -1]]), 4)
    assert c.dtype == np.float32 and c.tolist() == [[2, 0, 0, 1], [0, 0, 0, 0]]
    with pytest.raises(ValueError):
        count_targets(np.array([[4]]), 4)


def test_torch_counter_trains(demo_batch, torch_one_thread) -> None:
    torch = torch_one_thread
    torch.manual_seed(0)
    spec = get_model("counter", "torch", NUM_CLASSES)
    model = spec.model
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    losses = []
    for batch in _minibatches(demo_batch, 20):
        loss = spec.loss(model(spec.inputs(batch)), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"torch counter: loss {np.mean(losses[:3]):.3f} -> {np.mean(losses[-3:]):.3f} over 20 steps")
    assert np.isfinite(losses).all() and np.mean(losses[-3:]) < np.mean(losses[:3])
    model.eval()
    with torch.no_grad():
        counts = spec.predict(model(spec.inputs(demo_batch)))
    assert counts.shape == (64, NUM_CLASSES) and counts.dtype == np.float32 and (counts > 0).all()


def test_keras_counter_trains(demo_batch) -> None:
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("tf_keras")
    keras.utils.set_random_seed(0)
    spec = get_model("counter", "tensorflow", NUM_CLASSES, image_size=SIZE)
    model = spec.model
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=spec.loss)
    x, y = spec.inputs(demo_batch), spec.targets(demo_batch, model)
    assert y.shape == (64, NUM_CLASSES)
    hist = model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), epochs=5, verbose=0)
    losses = hist.history["loss"]
    print(f"keras counter: loss {losses[0]:.3f} -> {losses[-1]:.3f} over 20 steps")
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    counts = spec.predict(model.predict(x, verbose=0))
    assert counts.shape == (64, NUM_CLASSES) and (counts > 0).all()


def test_counting_losses_agree_across_frameworks() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("tensorflow")
    from orchestrator.train.models import counting

    labels = np.array([[0, 0, 1, -1], [3, 3, 3, 2]])
    out = np.random.default_rng(0).normal(0, 1, (2, 4)).astype(np.float32)
    y = counting.count_targets(labels, 4)
    t = counting.torch_loss(torch.from_numpy(out), {"labels": labels}).item()
    k = float(np.mean(counting.keras_loss(y, out)))
    assert t == pytest.approx(k, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# registry


def test_registry_builds_every_builtin_for_both_frameworks_and_names_bad_choices() -> None:
    assert set(MODELS) == {"detector", "counter"}
    spec = get_model("counter", "torch", 3)
    assert (spec.name, spec.framework, spec.task, spec.targets) == ("counter", "torch", "counting", None)
    with pytest.raises(ConfigError, match="detector"):
        get_model("yolo", "torch")
    with pytest.raises(ConfigError, match="tensorflow"):
        get_model("detector", "jax")
    with pytest.raises(ConfigError, match="cannot import 'no_such_module_xyz'"):
        get_model("no_such_module_xyz:build", "torch")
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        get_model("orchestrator.train.models.registry:nope", "torch")


def test_a_model_function_that_returns_the_wrong_thing_is_named(tmp_path, monkeypatch) -> None:
    (tmp_path / "bad_models.py").write_text(
        "from orchestrator.train.models import ModelSpec\n"
        "def not_a_spec(ctx):\n    return 42\n"
        "def no_targets(ctx):\n    return ModelSpec('x', ctx.framework, 'counting', object(), id, id, id)\n"
        "def wrong_framework(ctx):\n    return ModelSpec('x', 'torch', 'counting', object(), id, id, id, id)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="returned int, not a ModelSpec"):
        get_model("bad_models:not_a_spec", "torch")
    with pytest.raises(ConfigError, match="needs targets"):
        get_model("bad_models:no_targets", "tensorflow")
    with pytest.raises(ConfigError, match="built a torch model for a tensorflow run"):
        get_model("bad_models:wrong_framework", "tensorflow")
