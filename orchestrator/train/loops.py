"""The per-worker training loops for Ray Train, one per framework, each readable top to bottom.

Both loops: build the model from the registry, resume from ``ray.train.get_checkpoint()`` when
there is one (a restarted worker group or ``--resume``), then per epoch train on this worker's
shard of ``train``, score ``validation`` (mAP@0.5 for the detector, count MAE for the counter) on
rank 0 with a local, collective-free copy of the model, and ``ray.train.report`` the metrics with
a checkpoint (rank 0 uploads it).

A worker's shard is its own node-local pipeline (train/data.py, ``NodeLocalDataConfig``). Every
worker takes the same number of steps per epoch, the longest shard's, even when skipped items
leave one shard short (torch: ``_in_step``; TensorFlow: a fixed step count): a worker out of data
takes zero-weight steps, since one that stopped early would leave the others waiting in a
collective. Every item of every shard is trained once an epoch, none twice.

With ``checkpoint.every_steps`` both also checkpoint inside an epoch, with the data position
(``train.position``): a worker group that starts from such a checkpoint trains only the items
that epoch had not trained, dealt over its own ranks (``data.rest_of_epoch``). Each epoch's
metrics carry ``train_items`` and ``train_digest`` over ranks and attempts.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np

from orchestrator.train.position import EpochTally, Resume, epoch_totals, read_position, write_position
from orchestrator.train.progress import StepReporter, skipped_so_far

HISTORY = "history.json"


def _load_history(directory: str) -> list[dict]:
    """Metrics of the epochs before this checkpoint (kept in it, so restarts lose none)."""
    path = os.path.join(directory, HISTORY)
    return json.load(open(path)) if os.path.exists(path) else []


def _save_history(directory: str, history: list[dict]) -> None:
    with open(os.path.join(directory, HISTORY), "w") as f:
        json.dump(history, f)


def _evaluate(predict_fn, spec, val_shard, batch_size: int, num_classes: int) -> dict[str, float]:
    """Score the whole validation split: mAP@0.5 (detection) or count MAE (counting)."""
    from orchestrator.train.batches import ground_truth
    from orchestrator.train.metrics import mean_average_precision
    from orchestrator.train.models.counting import count_targets

    preds, truth, errors = [], [], []
    sums: dict[str, float] = {}
    seen = 0
    for batch in val_shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        out = predict_fn(batch)
        if spec.task == "custom":  # the model's own metrics, weighted by batch size
            n = len(batch["num_boxes"])
            for name, value in spec.metrics(out, batch).items():
                sums[name] = sums.get(name, 0.0) + float(value) * n
            seen += n
        elif spec.task == "detection":  # a low threshold: mAP integrates over all scores
            preds += spec.predict(out, score_threshold=0.05, max_detections=50)
            truth += ground_truth(batch)
        else:
            errors.append(np.abs(spec.predict(out) - count_targets(batch["labels"], num_classes)))
    if spec.task == "custom":
        return {f"val_{name}": total / max(seen, 1) for name, total in sums.items()}
    if spec.task == "detection":
        score = mean_average_precision(preds, truth, num_classes, 0.5) if truth else float("nan")
        return {"val_map50": float(score) if np.isfinite(score) else 0.0}
    return {"val_count_mae": float(np.concatenate(errors).mean()) if errors else 0.0}


def _build(config: dict[str, Any], framework: str):
    """The run's model for this worker (``models.registry``: built-in or the user's function,
    whose folder the driver sent along in ``model_path``)."""
    from orchestrator.train.models.registry import ModelContext, build_model, ensure_importable

    m = config["model"]
    ensure_importable(config.get("model_path"))
    ctx = ModelContext(framework, config["num_classes"], tuple(config.get("label_names", ())),  # type: ignore[arg-type]
                       m["image_size"], m["max_boxes"], dict(m["params"]), dict(config.get("run_config", {})))
    return build_model(m["name"], ctx)


def _skipped_since(before: int | None, config: dict[str, Any]) -> dict[str, int]:
    """``{"skipped_items": n}``: items the run's pipelines skipped since ``before`` (rank 0 reads
    the ledger at the epoch's start and again after scoring validation, when every rank has
    finished the epoch and no pipeline reads the next one yet); empty when unreadable."""
    after = skipped_so_far(config.get("skip_ledger")) if before is not None else None
    return {} if before is None or after is None else {"skipped_items": after - before}


def _in_step(batches, blank: dict[str, np.ndarray]):
    """``(batch, weight)`` for as many steps as the longest shard of any worker has batches.

    DDP needs every worker to take the same number of steps (each backward is a collective),
    but shards differ by an item (``balanced_shards``) and an item skipped for a missing or
    corrupt blob shortens one more. A worker whose shard has run out takes zero-weight steps
    (its last batch, or ``blank``, with the loss times 0: it adds no gradient) until every
    worker's has, so each item of every shard is trained once per epoch and no worker is left
    waiting in an all-reduce. One tiny all-reduce per step agrees on whether any has a batch.
    (DDP averages gradients over all workers, so a step in which some pad is a slightly
    smaller step for the others: at most the last one or two of an epoch.)
    """
    import torch.distributed as dist

    together = dist.is_available() and dist.is_initialized()
    last = None
    for batch in _with_end(batches):
        if together:
            import torch

            have = torch.tensor([0 if batch is None else 1], dtype=torch.int32)
            dist.all_reduce(have, op=dist.ReduceOp.MAX)
            if not have.item():
                return
        elif batch is None:
            return
        if batch is None:
            yield (last if last is not None else blank), 0.0
        else:
            last = batch
            yield batch, 1.0


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def blank_batch(size: int, max_boxes: int, rows: int = 1) -> dict[str, np.ndarray]:
    """A batch of ``rows`` empty examples (black image, no boxes) in the examples' layout: the
    input of a padding step whose weight is 0."""
    return {"image": np.zeros((rows, size, size, 3), np.uint8),
            "boxes": np.zeros((rows, max_boxes, 4), np.float32),
            "labels": np.full((rows, max_boxes), -1, np.int64), "num_boxes": np.zeros(rows, np.int64),
            "id": np.array([""] * rows, dtype=object)}


def _with_end(batches):
    yield from batches
    while True:  # then "no batch" for as long as the others still ask
        yield None


def _epoch_source(config: dict[str, Any], train_shard, epoch: int, resume: Resume | None, rank: int,
                  world: int) -> tuple[Any, int, Resume | None]:
    """What this rank reads in ``epoch``: its shard and the epoch's item count; in the epoch a
    mid-epoch checkpoint left unfinished, only the items that epoch had not trained
    (``data.rest_of_epoch``), with the checkpoint's ``Resume`` to carry into the epoch's totals."""
    if resume is None or resume.epoch != epoch:
        return train_shard, config["train_items"], None
    from orchestrator.train.data import rest_of_epoch

    source, remaining = rest_of_epoch(config["run_data"], resume, rank, world)
    return source, remaining, resume


def _epoch_metrics(epoch: int, summed: list[float], start_epoch: int, carried: Resume | None,
                   reporter: StepReporter) -> dict[str, Any]:
    """An epoch's metrics from the ranks' summed ``EpochTally.vector``s: loss, items and their
    digest over every attempt, what a resumed epoch carried in, and this attempt's time and
    throughput."""
    done = epoch_totals(summed)
    before = len(carried.consumed) if carried else 0
    return {"epoch": epoch, "train_loss": done["train_loss"] or 0.0, "train_items": done["train_items"],
            "train_digest": done["train_digest"], "attempt_start_epoch": start_epoch,
            **({"resumed_items": before} if carried else {}), **reporter.finish(done["train_items"] - before)}


def _mid_epoch_report(directory: str, *, rank: int, epoch: int, step: int, tally: EpochTally,
                      carried: Resume | None, save_model, shard_seed: int) -> None:
    """A mid-epoch checkpoint (every ``checkpoint.every_steps`` steps): the model state
    (``save_model(directory)``, called on every rank, which keeps rank 0's) and every rank's
    data position (``train.position``), merged by Ray Train into one directory. The report says
    ``mid_epoch``, so the driver does not take it for a finished epoch."""
    import ray.train
    from ray.train import Checkpoint

    save_model(directory)  # every rank: saving may be a collective (Keras); rank 0's is kept
    train = ray.train.get_context()
    write_position(directory, rank=rank, epoch=epoch, step=step, tally=tally, carried=carried,
                   world=train.get_world_size(), shard_seed=shard_seed)
    items = len(tally.ids) + (len(carried.consumed) if carried else 0)
    ray.train.report({"epoch": epoch, "mid_epoch": True, "step": step, "rank0_items": items},
                     checkpoint=Checkpoint.from_directory(directory))


def torch_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint

    t = config["train"]
    torch.manual_seed(t["seed"])
    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    spec = _build(config, "torch")
    model = spec.model
    optimizer = torch.optim.Adam(model.parameters(), lr=t["learning_rate"])
    start_epoch, history, resume = 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), weights_only=False)
            history = _load_history(d)
            resume = read_position(d)  # a mid-epoch checkpoint: the epoch is half trained
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"] + 1  # the last finished epoch's
    model = ray.train.torch.prepare_model(model)
    local = model.module if hasattr(model, "module") else model
    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    blank = blank_batch(config["model"]["image_size"], config["model"]["max_boxes"])
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")
    every_steps = config.get("checkpoint_every_steps")

    def save_model(directory: str, finished_epoch: int) -> None:
        if rank != 0:  # rank 0's model is the checkpoint's
            return
        torch.save({"model": local.state_dict(), "optimizer": optimizer.state_dict(), "epoch": finished_epoch},
                   os.path.join(directory, "state.pt"))
        _save_history(directory, history)

    for epoch in range(start_epoch, t["epochs"]):
        model.train()
        source, items, carried = _epoch_source(config, train_shard, epoch, resume, rank, world)
        steps = _ceil_div(_ceil_div(items, world), t["batch_size"])  # the longest shard's, for the bar
        tally = EpochTally()
        skipped_before = skipped_so_far(config.get("skip_ledger")) if rank == 0 else None
        reporter = StepReporter(config.get("mailbox") if rank == 0 else None, epoch, steps, world)
        batches = source.iter_batches(batch_size=t["batch_size"], batch_format="numpy",
                                      prefetch_batches=config["data"]["prefetch_batches"])
        for step, (batch, weight) in enumerate(_in_step(batches, blank)):
            # Checkpointed once another step is known to follow (every rank learns that in
            # _in_step's all-reduce): never a mid-epoch position at the epoch's very end.
            if every_steps and step and step % every_steps == 0:
                with tempfile.TemporaryDirectory() as d:
                    _mid_epoch_report(d, rank=rank, epoch=epoch, step=step, tally=tally, carried=carried,
                                      save_model=lambda directory: save_model(directory, epoch - 1),  # noqa: B023
                                      shard_seed=config["run_data"].shard_seed)
            loss = spec.loss(model(spec.inputs(batch)), batch) * weight
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if weight:
                n = len(batch["num_boxes"])
                value = float(loss.detach())
                tally.add(batch["id"], value * n, n)
                reporter.step(n, value)
        totals = torch.tensor(tally.vector(carried if rank == 0 else None), dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
        metrics = _epoch_metrics(epoch, totals.tolist(), start_epoch, carried, reporter)
        last = epoch == t["epochs"] - 1
        save = rank == 0 and ((epoch + 1) % config["checkpoint_every"] == 0 or last)
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                local.eval()
                with torch.no_grad():
                    metrics.update(_evaluate(lambda b: local(spec.inputs(b)), spec, val_shard,
                                             t["batch_size"], config["num_classes"]))
                metrics.update(_skipped_since(skipped_before, config))
            history.append(dict(metrics))
            if save:
                save_model(d, epoch)
                ckpt = Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)


def tf_loop(config: dict[str, Any]) -> None:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import ray.train
    import tensorflow as tf
    import tf_keras as keras
    from ray.train import Checkpoint

    m, t = config["model"], config["train"]
    tf.random.set_seed(t["seed"])
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        spec = _build(config, "tensorflow")
        model = spec.model
        model.compile(optimizer=keras.optimizers.Adam(t["learning_rate"]), loss=spec.loss)
    start_epoch, history, resume = 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            model.load_weights(os.path.join(d, "model.weights.h5"))
            start_epoch = int(open(os.path.join(d, "epoch.txt")).read()) + 1  # the last finished epoch's
            history = _load_history(d)
            resume = read_position(d)  # a mid-epoch checkpoint: the epoch is half trained
    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")
    size, batch_size = m["image_size"], t["batch_size"]
    target_shape = spec.targets(blank_batch(size, m["max_boxes"]), model).shape[1:]
    every_steps = config.get("checkpoint_every_steps")

    # MultiWorkerMirroredStrategy needs every worker to take the same number of steps, and
    # Keras must know that number up front (an unknown-size dataset can leave one worker waiting
    # in a collective at the end of an epoch). Each worker's node-local shard (train/data.py,
    # stream.split.balanced_shards) holds at most ceil(items / world) items: every worker takes
    # the steps of the longest, and a step's rows beyond its shard (its shard is shorter by an
    # item, or lost one to a bad blob) are blank examples of sample weight 0, so every item is
    # trained once an epoch and none twice. With checkpoint.every_steps the epoch is fitted in
    # parts of that many steps, with a mid-epoch checkpoint between parts (train.position).
    signature = (tf.TensorSpec((batch_size, size, size, 3), tf.float32),
                 tf.TensorSpec((batch_size, *target_shape), tf.float32),
                 tf.TensorSpec((batch_size,), tf.float32))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    padding = blank_batch(size, m["max_boxes"], batch_size)

    class StepReports(keras.callbacks.Callback):
        """Rank 0's step reports for the driver's progress bar (``progress.StepReporter``)."""

        reporter: StepReporter | None = None

        def on_train_batch_end(self, batch, logs=None):
            if self.reporter is not None:
                loss = (logs or {}).get("loss")
                self.reporter.step(t["batch_size"], running_loss=None if loss is None else float(loss))

    def save_weights(directory: str) -> None:
        """Every worker saves (reading weights is a collective: BatchNorm statistics are
        sync-on-read variables; a worker that skipped it would leave the others waiting); rank
        0's file goes into the checkpoint, the others' into a scratch folder."""
        if rank == 0:
            model.save_weights(os.path.join(directory, "model.weights.h5"))
        else:
            with tempfile.TemporaryDirectory() as scratch:
                model.save_weights(os.path.join(scratch, "model.weights.h5"))

    def save_record(directory: str, finished_epoch: int) -> None:
        if rank == 0:
            with open(os.path.join(directory, "epoch.txt"), "w") as f:
                f.write(str(finished_epoch))
            _save_history(directory, history)

    step_reports = StepReports()
    for epoch in range(start_epoch, t["epochs"]):
        source, items, carried = _epoch_source(config, train_shard, epoch, resume, rank, world)
        steps = _ceil_div(_ceil_div(items, world), batch_size)
        tally = EpochTally()
        skipped_before = skipped_so_far(config.get("skip_ledger")) if rank == 0 else None
        reporter = step_reports.reporter = StepReporter(config.get("mailbox") if rank == 0 else None,
                                                        epoch, steps, world)
        shard_batches = iter(source.iter_batches(batch_size=batch_size, batch_format="numpy",
                                                 prefetch_batches=config["data"]["prefetch_batches"]))

        def padded_steps(count: int):
            for _ in range(count):
                batch = next(shard_batches, None)  # noqa: B023 (fit consumes this within the epoch)
                rows = 0 if batch is None else len(batch["num_boxes"])
                if rows:
                    tally.add(batch["id"])  # noqa: B023
                if rows < batch_size:  # the shard ran short: blank rows of weight 0
                    batch = {k: np.concatenate([batch[k], padding[k][:batch_size - rows]]) if rows else
                             padding[k] for k in padding}
                weights = (np.arange(batch_size) < rows).astype(np.float32)
                yield (spec.inputs(batch).astype(np.float32), spec.targets(batch, model).astype(np.float32),
                       weights)

        done = 0
        while done < steps or not steps:
            part = min(every_steps or steps, steps - done)
            if part:
                data = (tf.data.Dataset.from_generator(lambda n=part: padded_steps(n), output_signature=signature)
                        .apply(tf.data.experimental.assert_cardinality(part)).with_options(options))
                fitted = model.fit(data, epochs=1, steps_per_epoch=part, verbose=0, callbacks=[step_reports])
                if rank == 0:  # Keras's loss is already the global one: counted once
                    tally.add((), fitted.history["loss"][-1] * part, part)
            done += part
            if done >= steps:
                break
            with tempfile.TemporaryDirectory() as d:
                _mid_epoch_report(d, rank=rank, epoch=epoch, step=done, tally=tally, carried=carried,
                                  save_model=lambda directory: (save_weights(directory),  # noqa: B023
                                                                save_record(directory, epoch - 1)),  # noqa: B023
                                  shard_seed=config["run_data"].shard_seed)
        for _ in shard_batches:  # finish this epoch of the shard
            pass
        # Every worker's real rows and their digest, summed (a collective: every worker gets here).
        vector = tally.vector(carried if rank == 0 else None)
        summed = strategy.reduce(tf.distribute.ReduceOp.SUM,
                                 strategy.run(lambda v=vector: tf.constant(v, tf.float64)), axis=None)
        metrics = _epoch_metrics(epoch, summed.numpy().tolist(), start_epoch, carried, reporter)
        last = epoch == t["epochs"] - 1
        with tempfile.TemporaryDirectory() as d:
            save_weights(d)
            weights = model.get_weights()  # a collective too (see save_weights)
            ckpt = None
            if rank == 0:
                local = _build(config, "tensorflow").model  # outside the strategy
                local.set_weights(weights)
                # The lambda is used by _evaluate within this iteration only.
                metrics.update(_evaluate(lambda b: local(spec.inputs(b), training=False), spec,  # noqa: B023
                                         val_shard, t["batch_size"], config["num_classes"]))
                metrics.update(_skipped_since(skipped_before, config))
            history.append(dict(metrics))
            save_record(d, epoch)
            if rank == 0 and ((epoch + 1) % config["checkpoint_every"] == 0 or last):
                ckpt = Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)
