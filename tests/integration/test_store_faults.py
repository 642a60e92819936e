"""A store outage is never a bad item: every read path either delivers every item exactly once
or raises ``StoreUnavailable``; it never finishes with fewer items and no error.

Against a real SeaweedFS of this module's own, killed -9 and restarted, or SIGSTOPped, while
items are read through ``ds[i]``, iteration, a 2-worker DataLoader, ``to_tensorflow`` and
``to_ray`` (training goes through ``to_ray``; ingest is in test_ingest_faults.py).

Faults that land between two items of a pass (after the 10th item, during a stall) read the
items loose (``street``: one object, so one request, per item): packed, the 60 items are one
range request fetched before the first item is consumed, and nothing would be read during the
fault. Faults that come before any media is read run on both layouts (``either``: packed, the
default, and loose).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

import orchestrator
from orchestrator.errors import StoreUnavailable
from orchestrator.retry import retry_stats
from orchestrator.stream.cache import BlobCache
from tests.support.faulty_server import FaultyServer

pytestmark = [pytest.mark.s3, pytest.mark.slow]

RESTART_AFTER_S = 3.0


@pytest.fixture(scope="module")
def faulty(faulty_seaweed):
    return faulty_seaweed


def _store(faulty: FaultyServer, prefix: str, **options: float) -> orchestrator.Store:
    return orchestrator.connect(faulty.uri(prefix, **options), credentials=faulty.credentials())


def _ingest(faulty: FaultyServer, demo_small: Path, *, pack: bool) -> tuple[str, list[str]]:
    prefix = uuid.uuid4().hex[:10]
    store = _store(faulty, prefix)
    store.ingest("street", coco=demo_small / "annotations.json", images=demo_small / "images", pack=pack)
    assert all((r["pack"] is not None) == pack
               for r in store.dataset("street").manifest_rows(["pack"]).to_pylist())
    return prefix, sorted(store.dataset("street").item_ids())


@pytest.fixture(scope="module")
def street(faulty, demo_small: Path, ray_cluster) -> tuple[str, list[str]]:
    """60 demo items ingested loose into the faulty server once: (prefix, item ids)."""
    return _ingest(faulty, demo_small, pack=False)


@pytest.fixture(scope="module")
def street_packed(faulty, demo_small: Path, ray_cluster) -> tuple[str, list[str]]:
    """The same 60 items packed (the default layout): (prefix, item ids)."""
    return _ingest(faulty, demo_small, pack=True)


@pytest.fixture(params=["packed", "loose"])
def either(request: pytest.FixtureRequest) -> tuple[str, list[str]]:
    """``street_packed``, then ``street``: for faults that come before any media is read."""
    return request.getfixturevalue("street_packed" if request.param == "packed" else "street")


def _fresh(faulty, street, **uri_options) -> orchestrator.Dataset:
    """The dataset with no cache, so that every item is fetched from the server."""
    prefix, _ = street
    return _store(faulty, prefix, **uri_options).dataset(
        "street", cache=BlobCache(memory_budget=1), prefetch=2, threads=2)


def _assert_exactly_once(seen: list[str], expected: list[str]) -> None:
    assert len(seen) == len(set(seen)), "an item was delivered twice"
    assert sorted(seen) == expected, f"{len(expected) - len(set(seen))} items lost"


def _read_through_a_kill(faulty: FaultyServer, items, kill_after: int) -> tuple[list[str], float]:
    """Ids of ``items``, with the server killed -9 after ``kill_after`` of them and restarted
    RESTART_AFTER_S later; (ids, seconds the read took)."""
    seen = []
    started = time.monotonic()
    for i, item in enumerate(items):
        seen.append(item["id"])
        if i == kill_after:
            faulty.kill_and_restart_after(RESTART_AFTER_S)
    faulty.wait_idle()
    return seen, time.monotonic() - started


def test_iteration_rides_out_a_killed_and_restarted_server(faulty, street):
    ds = _fresh(faulty, street)
    before = retry_stats().as_dict()
    seen, took = _read_through_a_kill(faulty, ds, kill_after=10)
    _assert_exactly_once(seen, street[1])
    assert ds.skipped == 0
    after = retry_stats().as_dict()
    assert after["retries"] > before["retries"] and after["recovered"] > before["recovered"]
    assert took >= RESTART_AFTER_S  # the outage was waited out, not skipped


def test_random_access_waits_for_the_server(faulty, either):
    ds = _fresh(faulty, either)
    expected = ds[7]["id"]
    ds = _fresh(faulty, either)
    faulty.kill_and_restart_after(RESTART_AFTER_S)
    assert ds[7]["id"] == expected
    faulty.wait_idle()


def test_dataloader_with_two_workers_rides_out_a_killed_server(faulty, street):
    from torch.utils.data import DataLoader

    torch_ds = _fresh(faulty, street).to_pytorch()
    loader = DataLoader(torch_ds, batch_size=1, num_workers=2, prefetch_factor=1,
                        collate_fn=lambda batch: batch[0])
    seen, took = _read_through_a_kill(faulty, loader, kill_after=3)
    _assert_exactly_once(seen, street[1])
    assert torch_ds.skipped == 0
    assert took >= RESTART_AFTER_S


def test_ray_pipeline_started_during_an_outage_delivers_everything(faulty, either):
    ds = _fresh(faulty, either)
    rds = ds.to_ray()
    faulty.kill_and_restart_after(RESTART_AFTER_S)  # down before the first manifest read
    seen = [row["id"] for row in rds.iter_rows()]
    faulty.wait_idle()
    _assert_exactly_once(seen, either[1])
    assert ds.skipped == 0


def test_a_short_stall_is_waited_out(faulty, street):
    ds = _fresh(faulty, street, request_timeout=1, connect_timeout=1)
    seen = []
    for i, item in enumerate(ds):
        seen.append(item["id"])
        if i == 5:
            faulty.stall_for(3)
    faulty.wait_idle()
    _assert_exactly_once(seen, street[1])
    assert ds.skipped == 0


def test_a_stall_longer_than_the_deadline_raises_instead_of_hanging(faulty, street):
    ds = _fresh(faulty, street, retry_deadline=3, request_timeout=1, connect_timeout=1)
    seen = []
    with pytest.raises(StoreUnavailable, match=r"(?s)did not answer for \d+ s .*retry_deadline") as err:
        for i, item in enumerate(ds):
            seen.append(item["id"])
            if i == 5:
                stalled_at = time.monotonic()
                faulty.stall_for(12)
    waited = time.monotonic() - stalled_at
    faulty.wait_idle()
    # deadline + about two request timeouts, not one deadline per fetch in flight
    assert 3 <= waited < 7, f"gave up after {waited:.1f} s with a 3 s deadline"
    assert ds.skipped == 0 and len(seen) < len(street[1])
    assert "check that the S3 server is running" in str(err.value)


def test_a_dead_server_raises_on_every_read_path(faulty, either):
    """Past the deadline each path raises the store error (none returns a shorter epoch)."""
    from torch.utils.data import DataLoader

    paths = {
        "getitem": lambda ds: [ds[i]["id"] for i in range(len(either[1]))],
        "iteration": lambda ds: [it["id"] for it in ds],
        "dataloader": lambda ds: [it["id"] for it in DataLoader(
            ds.to_pytorch(), batch_size=1, num_workers=2, collate_fn=lambda b: b[0])],
        "ray": lambda ds: [row["id"] for row in ds.to_ray().iter_rows()],
    }
    datasets = {name: _fresh(faulty, either, retry_deadline=2, request_timeout=1, connect_timeout=1)
                for name in paths}
    for ds in datasets.values():
        len(ds.stream.index)  # manifest indexed while the server is up: only blob reads remain
    faulty.kill()
    try:
        for name, read in paths.items():
            with pytest.raises(Exception) as caught:
                read(datasets[name])
            assert _is_store_unavailable(caught.value), f"{name}: {caught.value!r}"
            assert datasets[name].skipped == 0, name
    finally:
        faulty.restart_after(0)
        faulty.wait_idle()


def test_tensorflow_path_raises_the_store_error(faulty, either):
    ds = _fresh(faulty, either, retry_deadline=2, request_timeout=1, connect_timeout=1)
    tfds = ds.to_tensorflow()
    len(ds.stream.index)
    faulty.kill()
    try:
        with pytest.raises(Exception, match="StoreUnavailable|did not answer for"):
            for _ in tfds:
                pass
        assert ds.skipped == 0
    finally:
        faulty.restart_after(0)
        faulty.wait_idle()


def _is_store_unavailable(exc: BaseException) -> bool:
    """The error itself, or (through Ray's and the DataLoader's wrappers) the error behind it."""
    from orchestrator.ray_runtime import orchestrator_error_in

    return isinstance(orchestrator_error_in(exc), StoreUnavailable)
