"""Ingest under a store outage: it rides out a short one and commits the whole version once;
past the retry deadline it ends with one clear ``error:`` line and commits nothing.

Against this session's fault server (a SeaweedFS killed -9 while blobs are being uploaded).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

import orchestrator
from tests.support.faulty_server import BUCKET, KEY, SECRET, FaultyServer

pytestmark = [pytest.mark.s3, pytest.mark.slow]


def _count(faulty: FaultyServer, prefix: str, where: str) -> int:
    client = faulty.server.client(KEY, SECRET)
    return client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/datasets/street/{where}/").get("KeyCount", 0)


def _wait_for_first_blob(faulty: FaultyServer, prefix: str, running) -> None:
    """Block until the ingest has stored its first blob (so the fault hits the upload stage)."""
    deadline = time.monotonic() + 180
    while _count(faulty, prefix, "blobs") == 0:
        assert running(), "the ingest ended before any blob was uploaded"
        assert time.monotonic() < deadline, "no blob was uploaded in time"
        time.sleep(0.02)
    assert _count(faulty, prefix, "manifest/_delta_log") == 0, "the fault came after the commit"


def test_ingest_rides_out_a_killed_server_and_commits_once(faulty_seaweed, demo_small, ray_cluster):
    faulty = faulty_seaweed
    prefix = uuid.uuid4().hex[:10]
    store = orchestrator.connect(faulty.uri(prefix), credentials=faulty.credentials())
    outcome: dict = {}

    def ingest() -> None:
        try:
            outcome["report"] = store.ingest("street", coco=demo_small / "annotations.json",
                                             images=demo_small / "images")
        except BaseException as exc:  # reported below
            outcome["error"] = exc

    worker = threading.Thread(target=ingest)
    worker.start()
    _wait_for_first_blob(faulty, prefix, worker.is_alive)
    faulty.kill_and_restart_after(3)
    worker.join(timeout=300)
    faulty.wait_idle()
    assert not worker.is_alive()
    assert "error" not in outcome, outcome.get("error")
    report = outcome["report"]
    assert report.version == 0 and report.items == 60
    ds = store.dataset("street")
    assert [v.version for v in ds.versions()] == [0]
    assert len([item["id"] for item in ds]) == 60 and ds.skipped == 0  # every blob whole and readable


def test_ingest_past_the_deadline_fails_cleanly_and_commits_nothing(faulty_seaweed, demo_small, ray_cluster):
    faulty = faulty_seaweed
    prefix = uuid.uuid4().hex[:10]
    uri = faulty.uri(prefix, retry_deadline=3, request_timeout=1, connect_timeout=1)
    exe = shutil.which("orchestrator", path=str(Path(sys.executable).parent)) or "orchestrator"
    import os

    proc = subprocess.Popen(
        [exe, "ingest", "--store", uri, "--dataset", "street",
         "--coco", str(demo_small / "annotations.json"), "--images", str(demo_small / "images")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **faulty.env()},
    )
    try:
        _wait_for_first_blob(faulty, prefix, lambda: proc.poll() is None)
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
