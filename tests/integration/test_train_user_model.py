"""A model of the user's own, named by import path in `model.name`, trained on Ray Train with
both frameworks from a module outside the package (a temporary folder)."""

from __future__ import annotations

import textwrap
import uuid

import pytest

import orchestrator
from orchestrator.errors import ConfigError
from orchestrator.train.config import load_config
from orchestrator.train.runner import plan_run, run
from tests.conftest import REPO

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]

USER_MODEL = textwrap.dedent('''
    """A tiny counting model: mean colour -> per-class counts; its own metrics (task "custom")."""
    import numpy as np

    from orchestrator.train.models import ModelContext, ModelSpec


    def counts(batch, num_classes):
        labels = np.asarray(batch["labels"])
        return np.stack([(labels == c).sum(axis=1) for c in range(num_classes)], axis=1).astype(np.float32)


    def build(ctx: ModelContext) -> ModelSpec:
        c = ctx.num_classes

        def metrics(out, batch):
            predicted = np.asarray(out.detach() if hasattr(out, "detach") else out, dtype=np.float32)
            # What the function received, reported back so the test can see it.
            return {"count_mae": float(np.abs(predicted - counts(batch, c)).mean()),
                    "labels_seen": float(len(ctx.label_names)), "image_size_seen": float(ctx.image_size),
                    "lr_seen": float(ctx.config["train"]["learning_rate"])}

        if ctx.framework == "torch":
            import torch

            net = torch.nn.Linear(3, c)

            class Tiny(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.net = net

                def forward(self, images):
                    return self.net(images.float().mean(dim=(1, 2)) / 255.0)

            def loss(out, batch):
                return torch.nn.functional.mse_loss(out, torch.from_numpy(counts(batch, c)))

            return ModelSpec("tiny", "torch", "custom", Tiny(), lambda b: torch.from_numpy(b["image"]), loss,
                             metrics=metrics)
        import tf_keras as keras

        model = keras.Sequential([keras.layers.Input((ctx.image_size, ctx.image_size, 3)),
                                  keras.layers.Rescaling(1 / 255.0), keras.layers.GlobalAveragePooling2D(),
                                  keras.layers.Dense(c)])
        return ModelSpec("tiny", "tensorflow", "custom", model, lambda b: b["image"].astype(np.float32),
                         keras.losses.MeanSquaredError(), targets=lambda b, m: counts(b, c), metrics=metrics)
''')


@pytest.fixture(scope="module")
def street(tmp_path_factory, demo_small) -> str:
    uri = f"file://{tmp_path_factory.mktemp('user-model') / 'store'}"
    orchestrator.connect(uri).ingest("street", coco=demo_small / "annotations.json", images=demo_small / "images")
    return uri


@pytest.mark.parametrize("config", ["street_torch.yaml", "street_tf.yaml"])
def test_a_model_from_a_module_outside_the_package_trains_with_its_own_metrics(config, street, tmp_path,
                                                                               monkeypatch):
    module = f"user_models_{uuid.uuid4().hex[:8]}"  # a fresh name: Ray workers outlive a test
    (tmp_path / module).mkdir()
    (tmp_path / module / "__init__.py").write_text("")
    (tmp_path / module / "tiny.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    settings = load_config(REPO / "configs" / config, [f"store={street}", "train.epochs=2", "train.batch_size=8",
                                                       "train.learning_rate=0.1",  # moves the loss in 12 steps
                                                       f"model.name={module}.tiny:build"])
    lineage = run(plan_run(settings))
    assert lineage.status == "finished" and lineage.config["model"]["name"] == f"{module}.tiny:build"
    first, last = lineage.metrics
    labels = len(orchestrator.connect(street).dataset("street").label_map.names)
    assert last["val_labels_seen"] == labels and last["val_image_size_seen"] == 128
    assert last["val_lr_seen"] == settings.train.learning_rate
    assert 0 <= last["val_count_mae"] and last["train_loss"] < first["train_loss"], lineage.metrics


def test_a_model_path_that_does_not_import_fails_before_ray_work(street):
    settings = load_config(REPO / "configs" / "street_torch.yaml", [f"store={street}",
                                                                    "model.name=no_such_pkg.models:build"])
    with pytest.raises(ConfigError, match="cannot import 'no_such_pkg.models'"):
        plan_run(settings)
