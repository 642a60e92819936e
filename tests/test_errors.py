"""errors: one hierarchy, builtin-compatible, picklable across Ray workers."""

from __future__ import annotations

import pickle

import pytest

from orchestrator import errors


def test_every_error_is_an_orchestrator_error():
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.OrchestratorError)


def test_builtin_compatibility():
    assert issubclass(errors.DatasetNotFound, KeyError)
    assert issubclass(errors.QueryError, ValueError)
    assert issubclass(errors.AccessDenied, PermissionError)


@pytest.mark.parametrize("cls", [getattr(errors, n) for n in errors.__all__])
def test_pickle_round_trip_keeps_class_message_and_hint(cls):
    err = cls("dataset 'x' is gone", hint="run orchestrator datasets")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert str(back) == str(err) == "dataset 'x' is gone\n  fix: run orchestrator datasets"
    assert back.hint == err.hint


def test_missing_optional_framework_names_the_install_command():
    from orchestrator.optional import require

    with pytest.raises(errors.ConfigError, match=r"pip install -e '\.\[torch\]'"):
        require("torch.no_such_submodule_xyz")


def test_public_surface_is_sorted_and_importable():
    import orchestrator

    assert orchestrator.__all__ == sorted(orchestrator.__all__)
    assert all(hasattr(orchestrator, name) for name in orchestrator.__all__)
