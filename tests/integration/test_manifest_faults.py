"""A damaged manifest, both backends: a garbage, truncated or missing ``_delta_log`` entry and a
garbage Parquet data file are errors that name the dataset, the file and the fix; the versions
before a damaged log entry still read; ``datasets`` reports a dataset without its first entry
as damaged; a store that does not exist fails every reading command (not "(no datasets)")."""

from __future__ import annotations

import pytest

import orchestrator
from orchestrator.errors import StoreError
from tests.conftest import run_cli
from tests.support.tiny_manifest import commit_items

FIRST = "00000000000000000000.json"


@pytest.fixture
def three_versions(store_uri) -> orchestrator.Store:
    """Dataset 'd': version 0 = [a], 1 = +b, 2 = +c (one manifest file per version)."""
    store = orchestrator.connect(store_uri)
    for ids in (["a"], ["b"], ["c"]):
        commit_items(store, "d", ids)
    return store


def _log_path(store: orchestrator.Store, dataset: str, version: int) -> str:
    return store.location.join("datasets", dataset, "manifest", "_delta_log", f"{version:020d}.json")


def _read(store: orchestrator.Store, path: str) -> bytes:
    with store.fs.open_input_stream(path) as f:
        return f.read()


def _write(store: orchestrator.Store, path: str, data: bytes) -> None:
    with store.fs.open_output_stream(path) as out:
        out.write(data)


def _assert_named(text: str, dataset: str, file: str) -> None:
    assert f"dataset {dataset!r}" in text and file in text, text
    assert "restore" in text and "backup" in text, text
    assert "Kernel error" not in text and "Traceback" not in text, text


def test_garbage_log_entry_names_the_file_and_earlier_versions_still_read(three_versions):
    store = three_versions
    _write(store, _log_path(store, "d", 1), b"garbage{{{ not json\n")
    bad = "00000000000000000001.json"
    with pytest.raises(StoreError) as err:
        store.dataset("d")
    _assert_named(str(err.value), "d", bad)
    assert "version 0 can still be read" in str(err.value)
    for attempt in (lambda: store.dataset("d", version=2), lambda: store.versions("d")):
        with pytest.raises(StoreError, match=bad):
            attempt()
    assert store.dataset("d", version=0).item_ids() == ["a"]

    r = run_cli("info", "--store", store.uri, "d")
    assert r.returncode == 1, r.stderr
    _assert_named(r.stderr, "d", bad)
    r = run_cli("versions", "--store", store.uri, "d")
    assert r.returncode == 1 and bad in r.stderr and "Traceback" not in r.stderr
    r = run_cli("slice", "--store", store.uri, "d", "labels.car >= 0", "--version", "0", "--count")
    assert r.returncode == 0 and r.stdout.strip() == "1", r.stderr


def test_truncated_latest_entry_leaves_the_versions_before_it_readable(three_versions):
    store = three_versions
    path = _log_path(store, "d", 2)
    text = _read(store, path)
    _write(store, path, text[: len(text) // 2])
    with pytest.raises(StoreError) as err:
        store.dataset("d").item_ids()
    _assert_named(str(err.value), "d", "00000000000000000002.json")
    assert "versions 0..1 can still be read" in str(err.value)
    assert sorted(store.dataset("d", version=1).item_ids()) == ["a", "b"]
    r = run_cli("info", "--store", store.uri, "d", "--version", "1", "--json")
    assert r.returncode == 0 and '"items": 2' in r.stdout, r.stderr


@pytest.mark.parametrize("damage", ["garbage", "overwritten middle", "deleted"])
def test_damaged_manifest_data_file_is_named(three_versions, damage):
    store = three_versions
    before = set(store.manifest("d").snapshot(1).files)
    (newest,) = set(store.manifest("d").snapshot(2).files) - before  # only in version 2
    data = _read(store, newest)
    if damage == "garbage":
        _write(store, newest, b"\x17garbage" * 64)
    elif damage == "overwritten middle":  # footer intact, pages not: a decoder error, no path
        quarter = len(data) // 4
        _write(store, newest, data[:quarter] + b"\x17" * (2 * quarter) + data[3 * quarter:])
    else:
        store.fs.delete_file(newest)
    name = newest.rsplit("/", 1)[-1]
    ds = store.dataset("d")
    for read in (ds.manifest_rows, lambda: ds[0] and [ds[i] for i in range(len(ds))]):
        with pytest.raises(StoreError) as err:
            read()
        _assert_named(str(err.value), "d", name)
    old = store.dataset("d", version=1)  # does not include the damaged file
    assert sorted(old.item_ids()) == ["a", "b"] and {old[i]["id"] for i in range(2)} == {"a", "b"}

    r = run_cli("info", "--store", store.uri, "d")
    assert r.returncode == 1, r.stderr
    _assert_named(r.stderr, "d", name)


def test_dataset_without_its_first_log_entry_is_reported_damaged(store_uri):
    store = orchestrator.connect(store_uri)
    commit_items(store, "good", ["a"])
    for ids in (["a"], ["b"]):
        commit_items(store, "bad", ids)
    store.fs.delete_file(_log_path(store, "bad", 0))

    assert store.datasets() == ["good"]
    damaged = store.damaged_datasets()
    assert list(damaged) == ["bad"]
    _assert_named(str(damaged["bad"]), "bad", FIRST)
    with pytest.raises(StoreError) as err:
        store.dataset("bad")
    _assert_named(str(err.value), "bad", FIRST)

    r = run_cli("datasets", "--store", store_uri)
    assert r.returncode == 0 and r.stdout.split() == ["good"], r.stderr
    assert "warning:" in r.stderr and "'bad'" in r.stderr and FIRST in r.stderr
    r = run_cli("datasets", "--store", store_uri, "--json")
    assert r.returncode == 0 and r.stdout.strip() == '["good"]'
    r = run_cli("versions", "--store", store_uri, "bad")
    assert r.returncode == 1 and FIRST in r.stderr and "Traceback" not in r.stderr


READING_COMMANDS = [
    ["datasets"], ["versions", "d"], ["info", "d"], ["slice", "d", "labels.car > 1"],
    ["delete", "--dataset", "d", "--items", "x"], ["runs"], ["policy", "show"],
]


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_a_store_that_does_not_exist_fails_every_reading_command(backend, tmp_path, request):
    if backend == "s3":
        request.getfixturevalue("seaweed")
        uri = "s3://no-such-bucket/p"
    else:
        uri = f"file://{tmp_path}/typo"
    for command in READING_COMMANDS:
        r = run_cli(*command, "--store", uri)
        assert r.returncode == 2, (command, r.returncode, r.stdout, r.stderr)
        assert "does not exist" in r.stderr and "Traceback" not in r.stderr, (command, r.stderr)
        assert "(no datasets)" not in r.stdout
    if backend == "file":
        assert not (tmp_path / "typo").exists()  # reading created nothing
        with pytest.raises(StoreError, match="does not exist"):
            orchestrator.connect(uri).datasets()
        store = orchestrator.connect(uri)  # a write is allowed to create the store
        commit_items(store, "d", ["a"])
        assert store.datasets() == ["d"]
    else:
        with pytest.raises(StoreError, match="no bucket 'no-such-bucket'"):
            orchestrator.connect(uri)
