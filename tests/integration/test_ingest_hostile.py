"""Ingest of hostile sources through the real pipeline: nothing outside the source is opened,
read or stored, and ambiguous input is refused rather than merged.

"Not opened" is observed, not inferred: outside the source folder sit a FIFO whose watcher
counts every open of it (a plain open would block; the watcher lets it through and counts it),
and a file whose atime (older than its mtime, so relatime updates it on any read), mtime and
bytes are compared before and after. Each test checks at the end that its detector would have
fired, so a passing test cannot be one that proved nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
from PIL import Image

import orchestrator
from orchestrator.scan import read_table
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("ray_cluster")


class FifoWatch:
    """A FIFO at ``path``; ``opened`` turns True once any reader opens it (it then reads EOF)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self.opened = False
        self._done = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            fd = os.open(self.path, os.O_WRONLY)  # returns once a reader has opened the FIFO
            os.close(fd)
            if self._done:
                return
            self.opened = True

    def assert_detects(self) -> None:
        """Open the FIFO as a reader would: ``opened`` must turn True, or the test proved nothing."""
        os.close(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK))
        self._thread.join(0.05)
        for _ in range(100):
            if self.opened:
                return
            self._thread.join(0.05)
        raise AssertionError("the FIFO watcher missed an open: the test proved nothing")

    def close(self) -> None:
        self._done = True
        os.close(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK))  # release the blocked open
        self._thread.join(5)
        assert not self._thread.is_alive(), "the FIFO watcher did not stop"


class Untouched:
    """A file outside the source; ``check()`` asserts nobody read or changed it."""

    def __init__(self, path: Path, data: bytes) -> None:
        path.write_bytes(data)
        st = path.stat()
        os.utime(path, ns=(st.st_mtime_ns - 10**12, st.st_mtime_ns))  # atime < mtime
        self.path, self.data = path, data
        self.before = self._stat()
        self.sha256 = hashlib.sha256(data).hexdigest()

    def _stat(self) -> tuple[int, int]:
        st = self.path.stat()
        return st.st_atime_ns, st.st_mtime_ns

    def check(self) -> None:
        assert self._stat() == self.before, f"{self.path} was read or written"
        assert self.path.read_bytes() == self.data
        assert self._stat()[0] != self.before[0], "a read does not change atime here: proved nothing"


def _stored_in(store_dir: Path, data: bytes) -> bool:
    """Whether any object of a file:// store holds ``data`` (a loose blob, or a range of a pack:
    the layouts differ, the bytes do not)."""
    return any(data in p.read_bytes() for p in store_dir.rglob("*") if p.is_file())


def _png(path: Path, color: tuple[int, int, int]) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path, "PNG")
    return path.read_bytes()


@pytest.fixture
def hostile(tmp_path: Path):
    """src/ (one good image, links that lead out of it) next to outside/ (a secret, a FIFO)."""
    src, outside = tmp_path / "src", tmp_path / "outside"
    outside.mkdir()
    _png(src / "ok.png", (0, 200, 0))
    _png(src / "c.png", (0, 0, 200))
    _png(src / "d.png", (200, 0, 200))
    buf = tmp_path / "secret-source.png"
    secret = Untouched(outside / "secret.png", _png(buf, (200, 0, 0)))
    fifo = FifoWatch(outside / "pipe.png")
    (src / "link.png").symlink_to(secret.path)
    (src / "pipe_link.png").symlink_to(fifo.path)
    (src / "dirlink").symlink_to(outside, target_is_directory=True)
    yield src, outside, secret, fifo
    fifo.close()


def _escapes(outside: Path) -> list[str]:
    return [
        "../outside/secret.png", "sub/../../outside/secret.png", str(outside / "secret.png"),
        "link.png", "dirlink/secret.png",
        "../outside/pipe.png", "sub/../../outside/pipe.png", str(outside / "pipe.png"),
        "pipe_link.png", "dirlink/pipe.png",
        "%2e%2e/outside/secret.png", "\uff0e\uff0e/outside/secret.png",
    ]


def test_store_ingest_opens_and_stores_nothing_outside_the_images_folder(hostile, tmp_path):
    src, outside, secret, fifo = hostile
    names = ["ok.png", *_escapes(outside)]
    doc = {
        "images": [{"id": n, "file_name": f} for n, f in enumerate(names)]
        + [{"id": 99, "file_name": "c.png"}, {"id": 99, "file_name": "d.png"}],  # one id, two files
        "annotations": [{"id": 1, "image_id": 99, "category_id": 1, "bbox": [0, 0, 2, 2]}],
        "categories": [{"id": 1, "name": "car"}],
    }
    coco = tmp_path / "ann.json"
    coco.write_text(json.dumps(doc))
    store = orchestrator.connect(f"file://{tmp_path / 'store'}")

    report = store.ingest("hostile", coco=coco, images=src)

    assert not fifo.opened, "a FIFO outside the images folder was opened"
    secret.check()
    assert report.version == 0 and report.items == 1
    rejected = {r.file: r.reason for r in report.rejected}
    assert set(rejected) == set(names[1:]) | {"c.png", "d.png"}
    for name in names[1:]:
        assert "outside" in rejected[name] or "absolute" in rejected[name] or "not found" in rejected[name]
    assert "image id 99" in rejected["c.png"] and "d.png" in rejected["c.png"]
    rows = read_table(store.location, store.manifest("hostile").snapshot()).to_pylist()
    assert [r["item_id"] for r in rows] == ["ok.png"]
    assert _stored_in(tmp_path / "store", (src / "ok.png").read_bytes())  # the scan finds stored media
    assert not _stored_in(tmp_path / "store", secret.data)
    fifo.assert_detects()


def test_cli_strict_refuses_jsonl_paths_outside_and_allow_root_opts_in(hostile, tmp_path):
    src, outside, secret, fifo = hostile
    store = f"file://{tmp_path / 'store'}"
    lines = tmp_path / "src" / "items.jsonl"
    escapes = [n for n in _escapes(outside) if "%" not in n and "\uff0e" not in n]
    lines.write_text("".join(json.dumps({"path": n}) + "\n" for n in ["ok.png", *escapes]))

    r = run_cli("ingest", "--store", store, "--dataset", "hostile", "--jsonl", str(lines),
                "--strict", "--json", timeout=180)
    assert r.returncode == 3, r.stderr[-3000:]
    assert not fifo.opened, "a FIFO outside the JSONL's folder was opened"
    secret.check()
    report = json.loads(r.stdout)
    assert report["version"] is None
    assert sorted(x["file"] for x in report["rejected"]) == sorted(escapes)
    assert all("--allow-root" in x["reason"] for x in report["rejected"])
    assert "Traceback" not in r.stderr
    assert not [p for p in (tmp_path / "store").rglob("*") if p.is_file()]  # nothing written

    # The opt-in: absolute paths and links under the named root are read; nothing else is.
    lines.write_text("".join(json.dumps({"path": n}) + "\n"
                             for n in ["ok.png", str(outside / "secret.png"), "../x.png"]))
    r = run_cli("ingest", "--store", store, "--dataset", "hostile", "--jsonl", str(lines),
                "--allow-root", str(outside), "--json", timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert report["items"] == 2 and [x["file"] for x in report["rejected"]] == ["../x.png"]
    assert not fifo.opened
    opened = orchestrator.connect(store)
    rows = read_table(opened.location, opened.manifest("hostile").snapshot()).to_pylist()
    assert secret.sha256 in {r["blob"] for r in rows}
    assert _stored_in(tmp_path / "store", secret.data)
    fifo.assert_detects()
