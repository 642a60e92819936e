"""Concurrent writers never lose each other's rows; a killed ingest leaves no partial version."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.fs as pafs
import pytest

import orchestrator
from orchestrator.manifest import conform
from orchestrator.scan import read_table
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _rows(prefix: str, n: int) -> list[dict]:
    now = datetime.now(UTC)
    return [
        {"item_id": f"{prefix}-{i}", "blob": f"{i:064x}", "media_type": "image/jpeg", "width": 1,
         "height": 1, "size_bytes": 1, "source_name": f"{prefix}-{i}.jpg", "instances": [],
         "attributes": {}, "tags": [], "ingested_at": now, "labels": {"car": i}}
        for i in range(n)
    ]


def test_racing_writers_all_land(store_uri):
    """4 threads x 3 commits each, released together by a barrier: 12 versions, no row lost."""
    store = orchestrator.connect(store_uri)
    manifest = store.manifest("race")
    manifest.upsert(conform(_rows("seed", 2), ["car"]), message="seed", principal="t", operation="ingest")
    writers, rounds = 4, 3
    barrier = threading.Barrier(writers)
    versions: list[int] = []
    errors: list[BaseException] = []

    def work(w: int) -> None:
        try:
            for r in range(rounds):
                barrier.wait()
                table = conform(_rows(f"w{w}r{r}", 5), ["car"])
                versions.append(manifest.upsert(table, message=f"w{w}r{r}", principal="t", operation="ingest"))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(versions) == list(range(1, 1 + writers * rounds))
    ids = set(read_table(store.location, manifest.snapshot(), ["item_id"]).column("item_id").to_pylist())
    expected = {f"seed-{i}" for i in range(2)} | {
        f"w{w}r{r}-{i}" for w in range(writers) for r in range(rounds) for i in range(5)
    }
    assert ids == expected
    assert [v.items for v in store.versions("race")][-1] == len(expected)


def _split_coco(demo: Path, out: Path) -> tuple[Path, Path]:
    doc = json.loads((demo / "annotations.json").read_text())
    halves = []
    for k in range(2):
        images = doc["images"][k::2]
        keep = {i["id"] for i in images}
        part = dict(doc, images=images, annotations=[a for a in doc["annotations"] if a["image_id"] in keep])
        path = out / f"half{k}.json"
        path.write_text(json.dumps(part))
        halves.append(path)
    return halves[0], halves[1]


def test_two_concurrent_cli_ingests_on_s3(seaweed, demo_small, tmp_path):
    uri = f"s3://orchestrator-test/concurrent-{os.getpid()}-{time.time_ns()}"
    a, b = _split_coco(demo_small, tmp_path)
    exe = str(Path(os.sys.executable).parent / "orchestrator")
    procs = [
        subprocess.Popen(
            [exe, "ingest", "--store", uri, "--dataset", "street", "--coco", str(p),
             "--images", str(demo_small / "images"), "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for p in (a, b)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    reports = [json.loads(out) for out, _ in outs]
    assert sorted(r["version"] for r in reports) == [0, 1]
    assert sum(r["items"] for r in reports) == 60
    store = orchestrator.connect(uri)
    assert [v.items for v in store.versions("street")][-1] == 60


def _stored(store: orchestrator.Store, where: str) -> dict[str, int]:
    """Path -> size of the objects under ``datasets/street/<where>/`` (blobs or packs)."""
    sel = pafs.FileSelector(store.location.join("datasets", "street", where), allow_not_found=True, recursive=True)
    return {i.path: i.size for i in store.fs.get_file_info(sel) if i.type == pafs.FileType.File}


N_KILLED = 800


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["loose", "packed"])
def test_killed_ingest_leaves_no_version_and_rerun_reuses_uploads(seaweed, demo_2000, layout, tmp_path):
    """Loose: the rerun re-uses the blobs the killed run stored. Packed (1 MB packs, so that
    the kill lands between packs): it groups the same media into the same packs, named by
    their bytes, so every pack the killed run stored is re-used whole and none is left over.
    800 of the 2,000 demo images: enough for the kill to land mid-upload (about 18 packs)."""
    uri = f"s3://orchestrator-test/killed-{os.getpid()}-{time.time_ns()}"
    store = orchestrator.connect(uri)
    where, option, enough = ("blobs", ["--loose"], 50) if layout == "loose" else ("packs", ["--pack-mb", "1"], 5)
    doc = json.loads((demo_2000 / "annotations.json").read_text())
    images = doc["images"][:N_KILLED]
    keep = {i["id"] for i in images}
    coco = tmp_path / "annotations.json"
    coco.write_text(json.dumps(dict(doc, images=images, annotations=[a for a in doc["annotations"]
                                                                     if a["image_id"] in keep])))
    args = ["ingest", "--store", uri, "--dataset", "street", "--coco",
            str(coco), "--images", str(demo_2000 / "images"), *option, "--json"]
    exe = str(Path(os.sys.executable).parent / "orchestrator")
    proc = subprocess.Popen([exe, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    seen = 0
    while time.monotonic() < deadline and proc.poll() is None:
        seen = len(_stored(store, where))
        if seen >= enough:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "ingest finished before it could be killed: the test proves nothing"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(1.0)  # uploads already in flight in Ray workers may still land
    partial = _stored(store, where)
    assert store.datasets() == []  # no version was committed

    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["version"] == 0 and report["items"] == N_KILLED
    if layout == "loose":
        assert enough <= len(partial) < N_KILLED, len(partial)
        assert report["blobs_reused"] >= len(partial) - 5  # a blob half-written at the kill is redone
        assert report["blobs_uploaded"] + report["blobs_reused"] == len(_stored(store, where))
        return
    assert report["blobs_uploaded"] + report["blobs_reused"] == N_KILLED
    rows = store.dataset("street").manifest_rows(["pack"]).to_pylist()
    members = Counter(r["pack"] for r in rows)  # pack id -> items in it (no duplicates in the demo)
    packs = _stored(store, where)
    assert {p.rsplit("/", 1)[-1] for p in packs} == set(members), "a pack no row reads was left over"
    assert enough <= len(partial) < len(packs), (len(partial), len(packs))
    assert set(partial) <= set(packs) and all(packs[p] == n for p, n in partial.items())
    # Every pack the killed run stored holds the same media as the rerun's (same name): re-used whole.
    assert report["blobs_reused"] >= sum(members[p.rsplit("/", 1)[-1]] for p in partial)
