"""train.config: YAML → validated settings, errors with key paths, --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import ConfigError
from orchestrator.train.config import load_config

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["street_torch.yaml", "street_tf.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.dataset == "street" and cfg.scaling.num_workers == 2
    assert cfg.framework == ("torch" if "torch" in name else "tensorflow")


def test_overrides_parse_yaml_values():
    cfg = load_config(REPO / "configs" / "street_torch.yaml",
                      ["train.epochs=5", "version=3", "query=labels.car >= 1", "scaling.use_gpu=true",
                       "model.params={width: 16}"])
    assert cfg.train.epochs == 5 and cfg.version == 3 and cfg.scaling.use_gpu is True
    assert cfg.query == "labels.car >= 1" and cfg.model.params == {"width": 16}


@pytest.mark.parametrize(
    "doc, needles",
    [
        ({"dataset": "x"}, ["names no store"]),
        ({"store": "file:///s", "dataset": "x", "train": {"epochs": 0}},
         ["train.epochs: Input should be greater than or equal to 1 (got 0)"]),
        ({"store": "file:///s", "dataset": "x", "framework": "jax"},
         ["framework: Input should be 'torch' or 'tensorflow' (got 'jax')"]),
        ({"store": "file:///s", "dataset": "x", "scaling": {"num_wrkers": 2}},
         ["scaling.num_wrkers: unknown key"]),
        ({"store": "file:///s", "dataset": "x", "version": -1}, ["version"]),
        ({"store": "file:///s", "dataset": "x", "version": "newest"}, ["version"]),
        ({"store": "file:///s", "dataset": "x", "model": {"name": "resnet"}},
         ["model.name: must be a built-in model (counter, detector) or \"package.module:function\""]),
    ],
)
def test_invalid_configs_name_the_key_path(doc, needles):
    with pytest.raises(ConfigError) as err:
        load_config(doc=doc)
    for needle in needles:
        assert needle in str(err.value)


def test_bad_yaml_and_bad_override(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("store: file:///s\ndataset: [unclosed\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+, column \d+"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(REPO / "configs" / "street_torch.yaml", ["train.epochs"])
    with pytest.raises(ConfigError, match="train.epochs: Input should be a valid integer"):
        load_config(REPO / "configs" / "street_torch.yaml", ["train.epochs=many"])


def test_schedule_timeout_has_a_default_and_must_be_positive():
    base = {"store": "file:///s", "dataset": "x"}
    assert load_config(doc=base).scaling.schedule_timeout_s > 0
    assert load_config(doc={**base, "scaling": {"schedule_timeout_s": 30}}).scaling.schedule_timeout_s == 30
    for bad in (0, -5, "soon"):
        with pytest.raises(ConfigError, match="scaling.schedule_timeout_s"):
            load_config(doc={**base, "scaling": {"schedule_timeout_s": bad}})


def test_the_shipped_configs_name_the_quickstarts_store():
    """jobs/quickstart.py writes <repo>/.demo/store; the configs run as-is after it."""
    for name in ("street_torch.yaml", "street_tf.yaml"):
        assert load_config(REPO / "configs" / name).store == f"file://{REPO / '.demo' / 'store'}"


def test_store_precedence_set_over_store_argument_over_config(tmp_path, monkeypatch):
    config = tmp_path / "sub" / "run.yaml"
    config.parent.mkdir()
    config.write_text("store: ../stores/a\ndataset: x\n")
    assert load_config(config).store == f"file://{tmp_path / 'stores' / 'a'}"  # relative to the file
    assert load_config(config, store="s3://team/b").store == "s3://team/b"
    assert load_config(config, ["store=s3://team/c"], store="s3://team/b").store == "s3://team/c"
    monkeypatch.chdir(tmp_path)  # given elsewhere than the file, a path is relative to the working directory
    assert load_config(config, store="here").store == f"file://{tmp_path / 'here'}"
    assert load_config(config, ["store=there"]).store == f"file://{tmp_path / 'there'}"
    assert load_config(doc={"dataset": "x"}, store="file:///s").store == "file:///s"
