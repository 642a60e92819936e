"""The node blob cache's disk tier (stream.cache): on by default where ``ORCHESTRATOR_CACHE_DIR``
says, bounded without scanning on the hot path, safe for processes filling it at once, never
serving a byte that does not hash to its name, and never failing a read when it cannot write."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from orchestrator.errors import ConfigError
from orchestrator.stream import cache as cache_module
from orchestrator.stream.cache import BlobCache, DiskLRU, default_disk_budget, default_memory_budget
from tests.support.waiting import fork_rounds, join_or_fail


def _blob(i: int, size: int = 1000) -> tuple[str, bytes]:
    data = (i.to_bytes(4, "big") + b"orchestrator")[:16] * (size // 16 + 1)
    data = data[:size]
    return hashlib.sha256(data).hexdigest(), data


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


def _lmdb_put(directory: Path, key: str, data: bytes) -> None:
    """Write ``data`` under ``key`` behind the cache's back, as a torn write or a disk error would."""
    db = cache_module._environment(directory / cache_module._ENV_DIR, 1 << 20)
    with db.env.begin(write=True) as txn:
        txn.put(bytes.fromhex(key), data, db=db.blobs)


def test_the_count_is_exact_and_a_trim_evicts_the_least_recently_used(tmp_path, monkeypatch):
    footprint = cache_module._footprint(1000)
    disk = DiskLRU(tmp_path, budget=20 * footprint)
    for i in range(10):
        disk.put(*_blob(i))
    assert disk.estimate() == disk.size() == 10 * footprint and disk.count() == 10
    monkeypatch.setattr(cache_module, "_TOUCH_S", 0.0)  # every hit refreshes the entry's time
    time.sleep(0.01)
    assert disk.get(_blob(0)[0]) == _blob(0)[1]  # used again: now the most recent of the ten
    disk.drain()
    for i in range(10, 25):  # past the budget: a trim evicts the oldest down to 90% of it
        time.sleep(0.001)
        disk.put(*_blob(i))
    assert disk.estimate() == disk.size() <= 20 * footprint
    # Two trims (at the 21st and the 24th entry), each of the three least recently used: 1-3,
    # then 4-6. Entry 0, used again after them, stays.
    assert {name for name, _ in disk.items()} == {_blob(i)[0] for i in (0, *range(7, 25))}
    assert disk.get(_blob(0)[0]) == _blob(0)[1]


def test_another_process_sees_this_ones_entries_and_count(tmp_path):
    disk = DiskLRU(tmp_path, budget=1 << 20)
    for i in range(5):
        disk.put(*_blob(i))
    r = _python(f"""
        from pathlib import Path
        from orchestrator.stream.cache import DiskLRU
        disk = DiskLRU(Path({str(tmp_path)!r}), 1 << 20)
        print(disk.estimate(), disk.count(), disk.get({_blob(3)[0]!r}) is not None)
    """, {})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(5 * cache_module._footprint(1000)), "5", "True"]


def test_a_torn_or_foreign_entry_is_never_served(tmp_path):
    cache = BlobCache(memory_budget=1, disk_dir=tmp_path, disk_budget=1 << 20)
    key, data = _blob(1)
    assert cache.get_or_fetch(key, lambda: data) == data
    cache.disk.drain()  # written by the writer thread
    _lmdb_put(tmp_path, key, data[:500])  # what a power cut without fsync can leave behind
    assert cache.get_or_fetch(key, lambda: data) == data
    cache.disk.drain()
    assert cache.stats.misses == 2 and cache.stats.disk_hits == 0
    assert dict(cache.disk.items()) == {key: data}  # the torn entry was removed, then written again
    assert cache.get_or_fetch(key, lambda: b"never") == data and cache.stats.disk_hits == 1


def test_a_folder_of_the_file_per_blob_layout_is_cleared_of_it(tmp_path):
    key, data = _blob(1)
    (tmp_path / key[:2]).mkdir()
    (tmp_path / key[:2] / key).write_bytes(data)
    (tmp_path / ".size").write_text('{"bytes": 1000, "scanned": 0}')
    disk = DiskLRU(tmp_path, 1 << 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == [cache_module._ENV_DIR] and disk.count() == 0


def test_an_unusable_environment_starts_over(tmp_path, caplog):
    env = tmp_path / cache_module._ENV_DIR
    env.mkdir()
    (env / "data.mdb").write_bytes(b"\0" * 100)  # a creation cut short
    with caplog.at_level(logging.WARNING, logger="orchestrator.stream.cache"):
        disk = DiskLRU(tmp_path, 1 << 20)
    disk.put(*_blob(1))
    assert disk.get(_blob(1)[0]) == _blob(1)[1]
    assert any("starting it over" in r.getMessage() for r in caplog.records)


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
    disk = DiskLRU(tmp_path, budget)
    entries = disk.items()
    assert len(entries) > 50
    for name, data in entries:
        assert hashlib.sha256(data).hexdigest() == name
    assert disk.size() <= budget and disk.estimate() == disk.size()


def test_a_process_killed_while_writing_leaves_a_consistent_cache(tmp_path):
    """SIGKILL in the middle of a stream of writes (a DataLoader worker DataLoader terminates, an
    OOM kill): the entries committed before it are intact, the count matches them, and the next
    process writes (the dead one's lock is released)."""
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import hashlib, sys
        from pathlib import Path
        from orchestrator.stream.cache import DiskLRU
        disk = DiskLRU(Path({str(tmp_path)!r}), 1 << 30)
        for i in range(10**9):
            data = i.to_bytes(8, "big") * 5000
            disk.put(hashlib.sha256(data).hexdigest(), data)
            if i == 100:
                print("writing", flush=True)
    """)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    writer.kill()
    writer.wait()
    disk = DiskLRU(tmp_path, 1 << 30)
    entries = disk.items()
    assert len(entries) > 100
    assert all(hashlib.sha256(data).hexdigest() == name for name, data in entries)
    assert disk.estimate() == disk.size() == len(entries) * cache_module._footprint(40_000)
    disk.put(*_blob(1))
    assert disk.get(_blob(1)[0]) == _blob(1)[1]


def test_an_entry_queued_for_the_writer_is_served_before_it_reaches_the_disk(tmp_path, monkeypatch):
    """A cold pass outruns the writer thread; the next epoch must not fetch what is still queued."""

    disk = DiskLRU(tmp_path, 1 << 20)
    release = threading.Event()
    real_put = disk.put
    monkeypatch.setattr(disk, "put", lambda key, data: (release.wait(10), real_put(key, data))[1])
    key, blob = _blob(7)
    disk.put_later(key, blob)
    assert disk.count() == 0 and disk.get(key) == blob  # from the queue
    release.set()
    disk.drain()
    assert [name for name, _ in disk.items()] == [key] and disk.get(key) == blob  # from the environment


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
        print("served", cache.stats.bytes_fetched, "kept", cache.disk.count())
    """, {})
    assert r.returncode == 0, r.stderr
    assert "served 400000 kept 0" in r.stdout
    assert r.stderr.count("cannot write to") == 1, r.stderr


def test_a_cache_folder_on_a_network_file_system_is_refused_with_the_fix(tmp_path, monkeypatch, caplog):
    """LMDB's locks do not hold on NFS and its kind (a cluster's shared home, say)."""
    monkeypatch.setattr(cache_module, "filesystem_type", lambda path: "nfs4")
    with caplog.at_level(logging.WARNING, logger="orchestrator.stream.cache"):
        cache = BlobCache(disk_dir=tmp_path / "nfs-home-cache", disk_budget=1 << 20)
    assert cache.disk is None
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "network file system (nfs4)" in message and "ORCHESTRATOR_CACHE_DIR" in message


# -- forks: a DataLoader forks its workers while the parent's threads use the cache ------------

def _child_reads_and_writes(cache: BlobCache, first: int, results) -> None:
    """In a forked child: read what the parent wrote, write new entries, and report them."""
    seen = sum(cache.lookup(_blob(i)[0]) == _blob(i)[1] for i in range(20))
    for i in range(first, first + 20):
        cache.store(*_blob(i))
    cache.disk.drain()
    results.put((os.getpid(), seen))


def _hold_in_a_thread(enter: Callable[[], AbstractContextManager]) -> tuple[threading.Event, threading.Thread]:
    """Enter ``enter()`` in another thread and stay inside until the returned event is set."""
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        with enter():
            inside.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert inside.wait(10)
    return release, holder


def test_fork_during_cache_traffic_never_hangs_the_child(tmp_path):
    """Parent threads keep reading and writing the cache (both tiers) while the parent forks
    children that use it at once. Before the fork gate, the first round hung: the child closing
    the environment it inherited waited for a parent write transaction's thread, which the
    child does not have. Every child must finish, see the parent's entries, and leave its own
    where the parent sees them."""
    cache = BlobCache(memory_budget=1 << 20, disk_dir=tmp_path, disk_budget=64 << 20)
    for i in range(20):
        cache.store(*_blob(i))
    cache.disk.drain()
    stop = threading.Event()

    def churn(offset: int) -> None:
        n = 0
        while not stop.is_set():
            key, data = _blob(10_000 + offset + n % 500, 3000)
            cache.store(key, data)
            cache.disk.put(*_blob(20_000 + offset + n % 500, 2000))  # a write transaction now
            cache.lookup(_blob(n % 20)[0])
            n += 1

    threads = [threading.Thread(target=churn, args=(k * 1000,), daemon=True) for k in range(3)]
    for t in threads:
        t.start()
    results = multiprocessing.get_context("fork").Queue()
    try:
        fork_rounds(_child_reads_and_writes, lambda r, k: (cache, 1000 + 100 * (2 * r + k), results), 12,
                    "(forked during cache traffic)")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    reports = [results.get(timeout=10) for _ in range(24)]
    assert all(seen == 20 for _, seen in reports), reports
    for first in range(1000, 1000 + 100 * 24, 100):
        for i in range(first, first + 20):
            assert cache.disk.get(_blob(i)[0]) == _blob(i)[1], f"a child's entry {i} is missing"


def test_fork_while_a_write_transaction_is_open_waits_for_it(tmp_path):
    """Deterministic form of the hang: a parent thread holds a write transaction across the
    fork; the fork waits until it commits, and the child then opens its own environment."""
    disk = DiskLRU(tmp_path, 64 << 20)
    disk.put(*_blob(1))
    release, holder = _hold_in_a_thread(lambda: disk._db.begin(write=True))
    threading.Timer(0.3, release.set).start()
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    cache = BlobCache(memory_budget=1 << 20, disk_dir=tmp_path, disk_budget=64 << 20)
    started = time.monotonic()
    procs = [ctx.Process(target=_child_reads_and_writes, args=(cache, 100, results))]
    procs[0].start()
    assert time.monotonic() - started >= 0.2, "the fork did not wait for the open transaction"
    holder.join(10)
    join_or_fail(procs, "after a fork during a write transaction")
    assert cache.disk.get(_blob(100)[0]) == _blob(100)[1]


def test_a_lock_held_by_a_parent_thread_at_the_fork_is_free_in_the_child(tmp_path):
    """The memory tier's lock held by another parent thread at the fork (a prefetch thread in a
    lookup): the child's lookups must not wait for a thread it does not have."""
    cache = BlobCache(memory_budget=1 << 20)
    cache.store(*_blob(1))
    release, holder = _hold_in_a_thread(lambda: cache.memory._lock)
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    proc = ctx.Process(target=lambda: results.put(cache.lookup(_blob(1)[0]) == _blob(1)[1]))
    proc.start()
    release.set()
    holder.join(10)
    join_or_fail([proc], "on a lock a parent thread held at the fork")
    assert results.get(timeout=10) is True


def test_a_child_forked_past_the_gate_wait_reads_without_the_disk_tier(tmp_path, monkeypatch):
    """A transaction open past the gate's wait (blocked on another process): the child must not
    touch the inherited environment; it reads without the disk tier (from the store), never hangs."""
    monkeypatch.setattr(cache_module._GATE, "wait_s", 0.2)
    disk = DiskLRU(tmp_path, 64 << 20)
    disk.put(*_blob(1))
    release, holder = _hold_in_a_thread(lambda: disk._db.begin())
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()

    def child() -> None:
        disk.put_later(*_blob(2))
        disk.drain()
        # The writer turned writing off (one warning), not died with the write queued.
        results.put((disk.get(_blob(1)[0]), cache_module._GATE.quiet_at_fork, disk._writable))

    try:
        proc = ctx.Process(target=child)
        proc.start()
        join_or_fail([proc], "after the gate's wait ran out")
    finally:
        release.set()
        holder.join(10)
    assert results.get(timeout=10) == (None, False, False)
    assert disk.get(_blob(1)[0]) == _blob(1)[1]  # the parent's environment is untouched
    assert disk.get(_blob(2)[0]) is None
