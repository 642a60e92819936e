"""Ingest under a store outage: it rides out a short one and commits the whole version once;
past the retry deadline it ends with one clear ``error:`` line and commits nothing.

Against this session's fault server (a SeaweedFS killed -9 while blobs are being uploaded), on
both layouts. The fault is placed once the first object is stored, while others are still to
come: loose (one object per item), 60 demo items; packed (the default), 2,000 in 1 MB packs,
since 60 items make a single pack and no such moment.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

import orchestrator
from orchestrator.stream.cache import BlobCache
from tests.support.faulty_server import BUCKET, KEY, SECRET, FaultyServer

pytestmark = [pytest.mark.s3, pytest.mark.slow]


@dataclass(frozen=True)
class Layout:
    demo: Path
    where: str  # the folder under datasets/street/ the ingest writes media into
    kwargs: dict  # for store.ingest
    cli: tuple[str, ...]  # for orchestrator ingest


@pytest.fixture(params=["loose", "packed"])
def layout(request: pytest.FixtureRequest) -> Layout:
    if request.param == "loose":
        return Layout(request.getfixturevalue("demo_small"), "blobs", {"pack": False}, ("--loose",))
    return Layout(request.getfixturevalue("demo_2000"), "packs", {"pack_mb": 1}, ("--pack-mb", "1"))


def _count(faulty: FaultyServer, prefix: str, where: str) -> int:
    client = faulty.server.client(KEY, SECRET)
    return client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/datasets/street/{where}/").get("KeyCount", 0)


def _wait_for_first_object(faulty: FaultyServer, prefix: str, where: str, running) -> int:
    """Block until the ingest has stored its first blob or pack (so the fault hits the upload
    stage); returns how many were stored then."""
    deadline = time.monotonic() + 180
    while (stored := _count(faulty, prefix, where)) == 0:
        assert running(), f"the ingest ended before anything was stored under {where}/"
        assert time.monotonic() < deadline, f"nothing was stored under {where}/ in time"
        time.sleep(0.02)
    assert _count(faulty, prefix, "manifest/_delta_log") == 0, "the fault came after the commit"
    return stored


def _items(demo: Path) -> int:
    return len(json.loads((demo / "annotations.json").read_text())["images"])


def test_ingest_rides_out_a_killed_server_and_commits_once(faulty_seaweed, layout, ray_cluster):
    faulty = faulty_seaweed
    prefix = uuid.uuid4().hex[:10]
    store = orchestrator.connect(faulty.uri(prefix), credentials=faulty.credentials())
    outcome: dict = {}

    def ingest() -> None:
        try:
            outcome["report"] = store.ingest("street", coco=layout.demo / "annotations.json",
                                             images=layout.demo / "images", **layout.kwargs)
        except BaseException as exc:  # reported below
            outcome["error"] = exc

    worker = threading.Thread(target=ingest)
    worker.start()
    stored = _wait_for_first_object(faulty, prefix, layout.where, worker.is_alive)
    faulty.kill_and_restart_after(3)
    worker.join(timeout=300)
    faulty.wait_idle()
    assert not worker.is_alive()
    assert "error" not in outcome, outcome.get("error")
    report = outcome["report"]
    n = _items(layout.demo)
    assert report.version == 0 and report.items == n
    assert stored < _count(faulty, prefix, layout.where), "the fault came after the last upload"
    ds = store.dataset("street", cache=BlobCache(memory_budget=1))  # from the store, not a node cache
    assert [v.version for v in ds.versions()] == [0]
    assert len([item["id"] for item in ds]) == n and ds.skipped == 0  # every blob whole and readable


def test_ingest_past_the_deadline_fails_cleanly_and_commits_nothing(faulty_seaweed, layout, ray_cluster):
    faulty = faulty_seaweed
    prefix = uuid.uuid4().hex[:10]
    uri = faulty.uri(prefix, retry_deadline=3, request_timeout=1, connect_timeout=1)
    exe = shutil.which("orchestrator", path=str(Path(sys.executable).parent)) or "orchestrator"
    import os

    proc = subprocess.Popen(
        [exe, "ingest", "--store", uri, "--dataset", "street",
         "--coco", str(layout.demo / "annotations.json"), "--images", str(layout.demo / "images"), *layout.cli],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **faulty.env()},
    )
    try:
        _wait_for_first_object(faulty, prefix, layout.where, lambda: proc.poll() is None)
        faulty.kill()
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
        faulty.restart_after(0)
        faulty.wait_idle()
    assert proc.returncode not in (0, None), out
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "did not answer" in errors[0] and "nothing was committed" in errors[0], errors[0]
    assert "Traceback" not in err and "RayTaskError" not in err, err
    assert _count(faulty, prefix, "manifest/_delta_log") == 0
    store = orchestrator.connect(faulty.uri(prefix), credentials=faulty.credentials(), must_exist=False)
    assert store.datasets() == []
