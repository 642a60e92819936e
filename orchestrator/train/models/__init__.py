"""Models: a run's ``model.name`` names a function ``build(ctx: ModelContext) -> ModelSpec``, a
built-in (``detector``, ``counter``) or ``"package.module:function"`` of your own
(:mod:`orchestrator.train.models.registry` says what it receives and returns)::

    spec = build_model("detector", ModelContext("torch", num_classes=3))
    spec = get_model("mypkg.models:tiny", "tensorflow", 3, image_size=128)

A :class:`ModelSpec` gives every model the same handful of functions. Batches are what
:func:`orchestrator.train.batches.stack` makes (numpy ``image`` uint8 [B,S,S,3], ``boxes``
[B,M,4] normalized, ``labels`` [B,M] padded with -1, ``num_boxes`` [B]).

===========  =============================================================================
field        meaning
===========  =============================================================================
name, task   e.g. ``"detector"``; task ``"detection"``/``"counting"``/``"custom"`` (picks the metric)
framework    ``"torch"`` or ``"tensorflow"``
model        the built ``torch.nn.Module`` / uncompiled ``keras.Model``; built-in params:
             ``width`` (all), ``stride`` 4|8 (detector)
inputs       ``inputs(batch)`` -> the model input (torch uint8 tensor / float32 numpy, NHWC 0..255;
             both models scale to [0, 1] themselves)
loss         torch: ``loss(model_out, batch) -> scalar tensor`` (targets built from the batch);
             tensorflow: ``loss(y_true, y_pred)``, for ``model.compile(loss=...)`` / ``fit``
targets      tensorflow: ``targets(batch, model) -> y_true`` numpy for ``fit``; torch: ``None``
predict      detection: ``predict(model_out, score_threshold=0.3, max_detections=50)`` -> per image
             ``(boxes [k,4] normalized x0,y0,x1,y1, scores [k], labels [k])``, the input of
             :func:`orchestrator.train.metrics.mean_average_precision`;
             counting: ``predict(model_out)`` -> expected counts ``[B, C]`` float32 numpy
metrics      custom task: ``metrics(model_out, batch)`` -> ``{name: float}`` per validation batch
===========  =============================================================================

A torch step::

    out = spec.model(spec.inputs(batch)); loss = spec.loss(out, batch); loss.backward()

A keras step (or ``fit`` on a ``tf.data`` of ``(inputs, targets)`` pairs)::

    spec.model.compile(optimizer, loss=spec.loss)
    spec.model.train_on_batch(spec.inputs(batch), spec.targets(batch, spec.model))

The models live in ``torch_detector`` and ``keras_detector`` (one CenterNet-style detector,
box encoding shared through ``centernet``) and ``counting`` (both frameworks in one module); the
registry (``ModelContext``, ``ModelSpec``, ``MODELS``, ``build_model``, ``get_model``) lives in
``registry`` and is re-exported here.
Frameworks are imported lazily: asking for a torch model never imports TensorFlow, and the other
way round. The keras models set ``TF_USE_LEGACY_KERAS=1`` (``setdefault``) before importing TF.
"""

from __future__ import annotations

from orchestrator.train.models.registry import (
    FRAMEWORKS,
    MODELS,
    ModelContext,
    ModelSpec,
    build_model,
    get_model,
)

__all__ = ["FRAMEWORKS", "MODELS", "ModelContext", "ModelSpec", "build_model", "get_model"]
