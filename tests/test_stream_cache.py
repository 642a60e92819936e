"""The node blob cache's disk tier (stream.cache): on by default where ``ORCHESTRATOR_CACHE_DIR``
says, bounded without scanning on the hot path, safe for processes filling it at once, never
serving a byte that does not hash to its name, and never failing a read when it cannot write."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from orchestrator.errors import ConfigError
from orchestrator.stream import cache as cache_module
from orchestrator.stream.cache import BlobCache, DiskLRU, default_disk_budget, default_memory_budget


def _blob(i: int, size: int = 1000) -> tuple[str, bytes]:
    data = (i.to_bytes(4, "big") + b"orchestrator")[:16] * (size // 16 + 1)
    data = data[:size]
    return hashlib.sha256(data).hexdigest(), data


def _entries(directory: Path) -> dict[str, Path]:
    return {p.name: p for p in directory.glob("*/*") if not p.name.startswith(".")}


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


def test_node_cache_has_a_disk_tier_where_the_environment_says_unless_off(tmp_path):
    code = """
        import json
        from orchestrator.stream.cache import node_cache
        c = node_cache()
        print(json.dumps({"disk": str(c.disk.directory) if c.disk else None,
                          "budget": c.disk.budget if c.disk else None, "memory": c.memory.budget}))
    """
    on = _python(code, {"ORCHESTRATOR_CACHE_DIR": str(tmp_path / "blobs"), "ORCHESTRATOR_CACHE_GB": "0.5"})
    assert on.returncode == 0, on.stderr
    got = json.loads(on.stdout)
    assert got == {"disk": str(tmp_path / "blobs"), "budget": 500_000_000,
                   "memory": default_memory_budget(disk_tier=True)}
    assert (tmp_path / "blobs").is_dir()
    off = _python(code, {"ORCHESTRATOR_CACHE_DIR": "off"})
    assert off.returncode == 0, off.stderr
    assert json.loads(off.stdout) == {"disk": None, "budget": None, "memory": default_memory_budget()}
    # Per process, the memory tier is small when the (shared) disk tier backs it.
    assert default_memory_budget(disk_tier=True) < default_memory_budget()


def test_a_bad_cache_budget_is_a_config_error_with_a_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHESTRATOR_CACHE_GB", "lots")
    with pytest.raises(ConfigError, match="ORCHESTRATOR_CACHE_GB") as err:
        default_disk_budget(tmp_path)
    assert "ORCHESTRATOR_CACHE_DIR=off" in str(err.value)


def test_a_put_counts_without_scanning_and_a_trim_corrects_the_count(tmp_path):
    disk = DiskLRU(tmp_path, budget=100_000)
    for i in range(10):
        disk.put(*_blob(i))
    disk.flush()
    assert disk.estimate() == disk.size() == 10_000
    time.sleep(0.05)  # file times are coarse: keep the three phases apart on the LRU clock
    # A file that appears behind the cache's back is not seen by puts (they never list the
    # directory) ...
    key, data = _blob(1000, 50_000)
    (tmp_path / key[:2]).mkdir(exist_ok=True)
    (tmp_path / key[:2] / key).write_bytes(data)
    for i in range(10, 20):
        disk.put(*_blob(i))
    disk.flush()
    assert disk.estimate() == 20_000 and disk.size() == 70_000
    time.sleep(0.05)
    # ... until the count passes the budget: the trim scans, evicts the oldest down to 90% of
    # the budget, and records the real size (then puts count on from there).
    for i in range(20, 110):
        disk.put(*_blob(i))
    disk.flush()
    assert disk.estimate() == disk.size() <= 100_000
    assert disk.get(_blob(0)[0]) is None and disk.get(key) is None
    assert disk.get(_blob(109)[0]) == _blob(109)[1] and disk.get(_blob(20)[0]) == _blob(20)[1]


def test_another_process_sees_the_count_of_this_ones_puts(tmp_path):
    disk = DiskLRU(tmp_path, budget=1 << 20)
    for i in range(5):
        disk.put(*_blob(i))
    disk.flush()
    assert DiskLRU(tmp_path, budget=1 << 20).estimate() == 5_000


def test_a_torn_or_foreign_file_is_never_served(tmp_path):
    cache = BlobCache(memory_budget=1, disk_dir=tmp_path, disk_budget=1 << 20)
    key, data = _blob(1)
    assert cache.get_or_fetch(key, lambda: data) == data
    cache.disk.drain()  # written by the writer thread
    path = tmp_path / key[:2] / key
    path.write_bytes(data[:500])  # what a power cut after the rename can leave behind
    assert cache.get_or_fetch(key, lambda: data) == data
    cache.disk.drain()
    assert cache.stats.misses == 2 and cache.stats.disk_hits == 0
    assert path.read_bytes() == data  # the torn file was removed, then written again
    assert cache.get_or_fetch(key, lambda: b"never") == data and cache.stats.disk_hits == 1


def _fill(directory: str, worker: int, budget: int) -> None:
    """One of several processes writing to and reading from one cache directory."""
    disk = DiskLRU(Path(directory), budget)
    for n in range(400):
        i = (n * 7 + worker * 3) % 300  # overlapping keys across workers
        key, blob = _blob(i, 500 + (i % 7) * 300)
        data = disk.get(key)
        if data is not None:
            assert data == blob, "read a torn or foreign entry"
        else:
            disk.put(key, blob)


@pytest.mark.parametrize("start", ["spawn", "fork"])  # fresh interpreters (Ray workers), forks (DataLoader)
def test_processes_filling_one_directory_stay_correct_and_within_budget(tmp_path, start):
    budget = 150_000  # about a third of what they write: many trims, from every process
    ctx = multiprocessing.get_context(start)
    procs = [ctx.Process(target=_fill, args=(str(tmp_path), w, budget)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    entries = _entries(tmp_path)
    assert len(entries) > 50
    for name, path in entries.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == name
    assert not list(tmp_path.rglob("*.tmp"))
    # Each process reported its puts at exit; the last report trimmed: no trim needed here.
    disk = DiskLRU(tmp_path, budget)
    assert disk.size() <= budget and disk.estimate() >= disk.size()


def test_a_collected_cache_whose_report_finds_the_lock_busy_reports_it_at_exit(tmp_path):
    """What the spawned variant above once caught in CI: a process's cache collected while
    another held the flock dropped its last report, so ``.size`` ran behind the folder."""
    disk = DiskLRU(tmp_path, 1 << 20)
    key, blob = _blob(1)
    with cache_module._Flock(tmp_path / ".lock"):  # another process trimming, say
        assert disk.put(key, blob) == 0  # below every flush threshold: reported later
        del disk
        gc.collect()
    assert DiskLRU(tmp_path, 1 << 20).estimate() == 0  # not reported yet ...
    cache_module._flush_all()  # ... until the exit hook
    assert DiskLRU(tmp_path, 1 << 20).estimate() == len(blob) == DiskLRU(tmp_path, 1 << 20).size()


def test_an_entry_queued_for_the_writer_is_served_before_it_reaches_the_disk(tmp_path, monkeypatch):
    """A cold pass outruns the writer thread; the next epoch must not fetch what is still queued."""
    import threading

    disk = DiskLRU(tmp_path, 1 << 20)
    release = threading.Event()
    real_put = disk.put
    monkeypatch.setattr(disk, "put", lambda key, data: (release.wait(10), real_put(key, data))[1])
    key, blob = _blob(7)
    disk.put_later(key, blob)
    assert not _entries(tmp_path) and disk.get(key) == blob  # from the queue
    release.set()
    disk.drain()
    assert list(_entries(tmp_path)) == [key] and disk.get(key) == blob  # from the file


def test_a_cache_folder_that_cannot_be_created_leaves_memory_only_with_one_warning(tmp_path, caplog):
    (tmp_path / "file").write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="orchestrator.stream.cache"):
        caches = [BlobCache(disk_dir=tmp_path / "file" / "blobs", disk_budget=1 << 20) for _ in range(2)]
    assert all(c.disk is None for c in caches)
    key, data = _blob(3)
    assert caches[0].get_or_fetch(key, lambda: data) == data
    assert caches[0].get_or_fetch(key, lambda: b"never") == data  # the memory tier still works
    assert len([r for r in caplog.records if "cannot use" in r.getMessage()]) == 1


def test_a_full_disk_degrades_to_fetching_with_one_warning(tmp_path):
    # RLIMIT_FSIZE makes every write past 2 kB fail (EFBIG, SIGXFSZ ignored), as a full disk does.
    r = _python(f"""
        import hashlib, logging, resource, signal
        from pathlib import Path
        logging.basicConfig(level=logging.WARNING)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        from orchestrator.stream.cache import BlobCache
        cache = BlobCache(memory_budget=1, disk_dir=Path({str(tmp_path)!r}), disk_budget=1 << 30)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
        for i in range(20):
            data = bytes([i]) * 10_000
            key = hashlib.sha256(data).hexdigest()
            assert cache.get_or_fetch(key, lambda: data) == data
            cache.disk.drain()  # the write was tried (a queued entry would be served from memory)
            assert cache.get_or_fetch(key, lambda: data) == data
        assert cache.stats.misses == 40, cache.stats
        print("served", cache.stats.bytes_fetched)
    """, {})
    assert r.returncode == 0, r.stderr
    assert "served 400000" in r.stdout
    assert r.stderr.count("cannot write to") == 1, r.stderr
    assert not _entries(tmp_path) and not list(tmp_path.rglob("*.tmp"))
