"""A node-local, content-addressed blob cache: a small memory LRU in front of a disk LRU that every
process on the node shares, on by default, so it outlives DataLoader workers, Ray workers and
epochs.

Keyed by the blob's sha256 (hex), so an entry is valid for every dataset, version and process
that names the same hash: nothing is ever invalidated, only evicted. A blob the store has since
lost is still served from the cache: the bytes are the item's by hash.

Where it lives (``node_cache()``, what every reader uses unless ``StreamOptions(cache=...)``
names another): the disk tier is ``$ORCHESTRATOR_CACHE_DIR``, else
``$XDG_CACHE_HOME/orchestrator/blobs``, else ``~/.cache/orchestrator/blobs``, with a budget of
``$ORCHESTRATOR_CACHE_GB`` GB, else 10% of the free space there (at most 20 GiB).
``ORCHESTRATOR_CACHE_DIR=off`` turns the disk tier off (memory only); so does an explicit
``BlobCache(...)`` without ``disk_dir`` (fault tests use that for a cold cache). The location is
resolved in each process that builds the cache (a Ray worker on another node uses its own), and a
``BlobCache`` pickles as its settings: a copy in another process starts with an empty memory tier
over the same disk tier.

Why the memory tier is small when the disk tier is on: the disk tier's files sit in the OS page
cache, which every process on the node shares (one copy, evicted under memory pressure), while a
memory tier is per process: at 5% of RAM it was 8 Ray workers + 2 DataLoader workers x 5% = half
the RAM holding the same bytes ten times. A disk-tier hit costs an open/read and a sha256
(~100-200 us for a 23 kB JPEG on the 2-core dev machine, against ~1.1 ms to decode it), so the
memory tier holds what one process rereads soon: ``DISK_BACKED_MEMORY_BUDGET`` (256 MiB, at most
2.5% of RAM). At 64 MiB a 68 MB dataset read in a loop got no memory hits at all (an LRU smaller
than a cyclic pass evicts every entry before its reuse) and a warm pass paid a disk read per
item: ~25% of its items/s. A process fills it only with what it reads (a DataLoader worker with
its shard). Without a disk tier it stays 5% of RAM (64 MiB to 2 GiB).

The disk tier (``DiskLRU``):

* Writes are atomic: a temp file (dot-named, skipped by every listing) renamed into place;
  readers never see a partial file. Without fsync, so a power cut can leave a torn file behind
  a complete name; that is why every disk read is checked against its name (sha256): a mismatch
  is deleted and counted as a miss, never served. The check also covers a racing writer, a
  disk error and anything else that writes into the directory.
* A hit refreshes the file's mtime (the LRU clock, to the minute: ``_TOUCH_S``); eviction
  (oldest mtime first, down to 90% of the budget, so that trims are spaced by 10% of the budget)
  runs under an ``flock``, one process at a time. A file evicted while another process reads it
  is a miss there, never a wrong byte.
* Size accounting is approximate and bounded, and costs nothing per put that grows with the
  number of cached files: the directory's total is kept in ``.size`` (written under the flock);
  each process adds its own puts to it every ``_FLUSH_BYTES`` or ``_FLUSH_PUTS`` (at exit, and
  as soon as its last known total plus its own puts pass the budget), and trims when the total
  passes the budget. A full scan (stat of every file) happens only at a
  trim, once for a directory without ``.size``, and at most once per ``_RESCAN_S`` as a
  correction (bytes a killed process never reported, files removed by hand). So the directory
  can exceed its budget by at most the unreported puts of the processes writing to it.
* A failure to write (disk full, read-only home, no permission) never fails a read: it is logged
  once per process and directory, the disk tier stops writing in that process, and reads carry
  on from the store (and from entries already on disk).
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import logging
import multiprocessing.util
import os
import shutil
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.errors import ConfigError

log = logging.getLogger(__name__)

DISK_BACKED_MEMORY_BUDGET = 256 << 20  # per process when the disk tier is on (see module docstring)
WRITE_QUEUE_BYTES = 64 << 20  # disk writes waiting for a process's writer thread, at most
_FLUSH_BYTES = 1 << 20  # a process reports its puts to ``.size`` after this many bytes ...
_FLUSH_PUTS = 64  # ... or this many puts
_RESCAN_S = 3600.0  # at most this long between corrective full scans
_LOW_WATER = 0.9  # a trim evicts down to this fraction of the budget
_TOUCH_S = 60.0  # a hit refreshes an entry's mtime only if older than this (LRU to the minute)
_STALE_TMP_S = 600.0  # temp files older than this are a crashed writer's: removed at a trim
_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def _warn_once(what: str, directory: Path, message: str) -> None:
    """Log ``message`` once per process for this kind of failure in this directory."""
    with _warned_lock:
        if (what, str(directory)) in _warned:
            return
        _warned.add((what, str(directory)))
    log.warning(message)


def default_memory_budget(disk_tier: bool = False) -> int:
    """The memory tier's default: ``DISK_BACKED_MEMORY_BUDGET`` when a disk tier backs it (the
    page cache holds the rest, shared by all processes; at most 2.5% of RAM), else 5% of RAM,
    64 MiB to 2 GiB."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 8 << 30
    if disk_tier:
        return int(min(DISK_BACKED_MEMORY_BUDGET, max(16 << 20, ram // 40)))
    return int(min(2 << 30, max(64 << 20, ram // 20)))


def default_disk_dir() -> Path:
    """Where the node's disk tier lives unless ``ORCHESTRATOR_CACHE_DIR`` says otherwise (see
    ``node_disk_dir`` for the setting that can also turn it off)."""
    env = os.environ.get("ORCHESTRATOR_CACHE_DIR", "").strip()
    if env and env.lower() != "off":
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg) if xdg else Path.home() / ".cache") / "orchestrator" / "blobs"


def node_disk_dir() -> Path | None:
    """This node's disk tier, or None when ``ORCHESTRATOR_CACHE_DIR=off``."""
    if os.environ.get("ORCHESTRATOR_CACHE_DIR", "").strip().lower() == "off":
        return None
    return default_disk_dir()


def default_disk_budget(directory: Path) -> int:
    """``ORCHESTRATOR_CACHE_GB`` GB, else 10% of the free space where the cache lives, at most 20 GiB."""
    env = os.environ.get("ORCHESTRATOR_CACHE_GB", "").strip()
    if env:
        try:
            gb = float(env)
        except ValueError:
            gb = -1.0
        if not gb > 0:
            raise ConfigError(f"ORCHESTRATOR_CACHE_GB must be a number of GB > 0, got {env!r}",
                              hint="unset it for the default (10% of free space, at most 20 GiB), "
                                   "or set ORCHESTRATOR_CACHE_DIR=off to turn the disk cache off")
        return int(gb * 1e9)
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    return int(min(20 << 30, free // 10))


@dataclass
class CacheStats:
    """Counters for one process. ``bytes_fetched`` is what came from the store."""

    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    bytes_fetched: int = 0
    evictions: int = 0

    @property
    def hits(self) -> int:
        return self.memory_hits + self.disk_hits

    def as_dict(self) -> dict:
        return {"hits": self.hits, "memory_hits": self.memory_hits, "disk_hits": self.disk_hits,
                "misses": self.misses, "bytes_fetched": self.bytes_fetched, "evictions": self.evictions}


class MemoryLRU:
    """Thread-safe LRU of bytes with a byte budget (an entry larger than the budget is not kept)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.size = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: str, data: bytes) -> int:
        """Insert; returns how many entries were evicted."""
        if len(data) > self.budget:
            return 0
        evicted = 0
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return 0
            self._items[key] = data
            self.size += len(data)
            while self.size > self.budget:
                _, old = self._items.popitem(last=False)
                self.size -= len(old)
                evicted += 1
        return evicted

    def __len__(self) -> int:
        return len(self._items)


class DiskLRU:
    """Files named by their sha256 under ``directory`` (``<2 hex>/<hash>``), kept near ``budget``
    bytes, oldest mtime evicted first; shared safely by every process on the node (see the
    module docstring for what is guaranteed). Raises ``OSError`` only from the constructor (the
    directory cannot be created); ``get`` and ``put`` degrade to a miss and a no-op."""

    def __init__(self, directory: Path, budget: int) -> None:
        self.directory = Path(directory)
        self.budget = budget
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.directory / ".lock"
        self._size_path = self.directory / ".size"
        self._made: set[str] = set()  # shard folders this process knows exist
        self._pending = 0  # bytes put by this process and not yet added to ``.size``
        self._pending_puts = 0
        self._writable = True
        self._mutex = threading.Lock()
        # Writes not yet on disk (``put_later``), oldest first; ``get`` serves them from here.
        self._queue: dict[str, bytes] = {}
        self._queued = 0  # their bytes
        self._wake = threading.Condition(self._mutex)
        self._writer_pid = 0  # the process whose writer thread serves the queue
        with self._locked():
            self._known = self._read_size()[0]  # the total as of this process's last look
        _live.add(self)

    def put_later(self, key: str, data: bytes) -> None:
        """Queue the entry for this process's writer thread and return at once.

        Why: writing a file per blob on the fetch threads cost a cold pass ~40% of its items/s
        on 2 cores (measured on file://, 1,000 items); behind a queue the fetch threads go on.
        At most ``WRITE_QUEUE_BYTES`` wait: a write that would pass it is dropped (the entry is
        fetched again next time, never served wrong). ``drain`` (at exit, and before counting)
        waits for the queue."""
        with self._mutex:
            if self._queued + len(data) > WRITE_QUEUE_BYTES or not self._writable or key in self._queue:
                return
            self._queue[key] = data
            self._queued += len(data)
            if self._writer_pid != os.getpid():
                self._writer_pid = os.getpid()
                threading.Thread(target=self._write_queued, name="orchestrator-cache-writer", daemon=True).start()
            self._wake.notify()

    def _write_queued(self) -> None:
        while True:
            with self._mutex:
                while not self._queue:
                    self._wake.wait()
                key = next(iter(self._queue))
                data = self._queue[key]
            try:
                self.put(key, data)
            finally:
                with self._mutex:
                    del self._queue[key]
                    self._queued -= len(data)
                    self._wake.notify_all()

    def drain(self, timeout: float = 30.0) -> None:
        """Wait (at most ``timeout``) until every queued write is on disk."""
        deadline = time.monotonic() + timeout
        with self._mutex:
            while self._queue and self._writer_pid == os.getpid():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._wake.wait(left)

    def __del__(self) -> None:  # a dropped cache reports its puts too (atexit only sees live ones)
        # Never waits for the flock: the collector may run this in a thread that holds it (a
        # second flock on a new descriptor would wait for itself). A report that cannot take the
        # flock now is handed to the exit hook, which may wait.
        try:
            self.flush(wait=False)
            if self._pending:
                _orphans.append((self.directory, self.budget, self._pending))
        except Exception:  # noqa: BLE001 - best effort at collection time
            pass

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / key

    def get(self, key: str) -> bytes | None:
        """The entry's bytes if present and intact (sha256 == ``key``), else None. An entry this
        process queued and has not written yet is served from the queue: a cold pass that
        outran the writer thread would otherwise fetch those blobs again in the next epoch
        (measured: 160-180 of 3,000 items per warm epoch, on file://)."""
        with self._mutex:
            queued = self._queue.get(key)
        if queued is not None:
            return queued
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                st = os.fstat(fd)  # the size, and the mtime a hit refreshes only when stale
                data = os.read(fd, st.st_size + 1)
            finally:
                os.close(fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            _warn_once("read", self.directory, f"blob cache: cannot read {self.directory} ({exc}); "
                                               "reading from the store instead")
            return None
        if hashlib.sha256(data).hexdigest() != key:
            log.warning("blob cache: %s does not hash to its name (torn or foreign file); removed, "
                        "reading from the store instead", path)
            try:
                path.unlink()
            except OSError:
                pass
            return None
        if time.time() - st.st_mtime > _TOUCH_S:  # LRU clock, refreshed at most once per _TOUCH_S
            try:
                os.utime(path)
            except OSError:
                pass
        return data

    def put(self, key: str, data: bytes) -> int:
        """Write the entry (atomically) unless present; returns how many entries a trim evicted."""
        if not self._writable or len(data) > self.budget:
            return 0
        path = self._path(key)
        if os.path.exists(path):
            return 0
        tmp = path.parent / f".{key}.{uuid.uuid4().hex}.tmp"
        try:
            if path.parent.name not in self._made:
                path.parent.mkdir(exist_ok=True)
                self._made.add(path.parent.name)
            # os-level calls: ~50 us a file here, against ~155 us through pathlib's buffered
            # file object (its fstat, ioctl and buffer), which was most of a cold pass's writer.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            self._writable = False
            try:
                tmp.unlink()
            except OSError:
                pass
            _warn_once("write", self.directory,
                       f"blob cache: cannot write to {self.directory} ({exc}); this process stops "
                       "caching on disk and reads from the store (free space, or set "
                       "ORCHESTRATOR_CACHE_DIR to a writable folder, or to 'off')")
            return 0
        with self._mutex:
            self._pending += len(data)
            self._pending_puts += 1
            due = (self._pending >= _FLUSH_BYTES or self._pending_puts >= _FLUSH_PUTS
                   or self._known + self._pending > self.budget)
        return self.flush() if due else 0

    def flush(self, wait: bool = True) -> int:
        """Add this process's unreported puts to ``.size``; trim (or rescan) when due. Returns
        how many entries were evicted. ``wait=False``: give up (dropping the report) rather than
        wait for another holder of the flock."""
        with self._mutex:
            pending, self._pending, self._pending_puts = self._pending, 0, 0
        if not pending or not self.directory.is_dir():  # gone (removed with its contents): nothing to count
            return 0
        try:
            with _Flock(self._lock_path, wait):
                total, scanned = self._read_size()
                total += pending
                if total > self.budget:
                    return self._trim_locked()
                if time.time() - scanned > _RESCAN_S:
                    total, scanned = self._scan_size(), time.time()
                self._write_size(total, scanned)
                self._known = total
        except BlockingIOError:  # wait=False and the flock is busy: keep the report for later
            with self._mutex:
                self._pending += pending
        except OSError as exc:
            _warn_once("size", self.directory, f"blob cache: cannot update {self._size_path} ({exc})")
        return 0

    def trim(self) -> int:
        """Evict the least recently used files until the directory fits its budget (a full scan)."""
        self.flush()
        with self._locked():
            return self._trim_locked()

    def size(self) -> int:
        """The directory's bytes, by a full scan (for tests and tools; the hot path never scans)."""
        return self._scan_size()

    def estimate(self) -> int:
        """The running total in ``.size`` (what trims are decided by)."""
        with self._locked():
            return self._read_size()[0]

    def _locked(self) -> _Flock:
        return _Flock(self._lock_path)

    def _read_size(self) -> tuple[int, float]:
        """(bytes, time of the last full scan) from ``.size``; a directory without one (new, or
        written by an older version) is scanned once. Call under the flock."""
        try:
            doc = json.loads(self._size_path.read_text())
            return int(doc["bytes"]), float(doc["scanned"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            total, scanned = self._scan_size(), time.time()
            self._write_size(total, scanned)
            return total, scanned

    def _write_size(self, total: int, scanned: float) -> None:
        tmp = self.directory / f".size.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps({"bytes": total, "scanned": scanned}))
        os.replace(tmp, self._size_path)

    def _entries(self) -> list[tuple[float, int, str]]:
        """(mtime, size, path) of every entry; removes stale temp files of crashed writers."""
        out = []
        now = time.time()
        with os.scandir(self.directory) as top:
            subs = [d.path for d in top if not d.name.startswith(".") and d.is_dir(follow_symlinks=False)]
        for sub in subs:
            try:
                listing = os.scandir(sub)
            except FileNotFoundError:
                continue
            with listing:
                for f in listing:
                    try:
                        st = f.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if f.name.startswith("."):
                        if f.name.endswith(".tmp") and now - st.st_mtime > _STALE_TMP_S:
                            try:
                                os.unlink(f.path)
                            except OSError:
                                pass
                        continue
                    out.append((st.st_mtime, st.st_size, f.path))
        return out

    def _scan_size(self) -> int:
        return sum(size for _, size, _ in self._entries())

    def _trim_locked(self) -> int:
        entries = sorted(self._entries())
        total = sum(size for _, size, _ in entries)
        evicted = 0
        if total > self.budget:
            target = int(self.budget * _LOW_WATER)
            for _, size, path in entries:
                if total <= target:
                    break
                try:
                    os.unlink(path)
                    evicted += 1
                except FileNotFoundError:
                    pass
                total -= size
        self._write_size(total, time.time())
        self._known = total
        return evicted


class _Flock:
    """``with _Flock(path):`` holds an exclusive ``flock`` on ``path`` (created if absent)."""

    def __init__(self, path: Path, wait: bool = True) -> None:
        self.path = path
        self.wait = wait

    def __enter__(self) -> _Flock:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX if self.wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(self._fd)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)  # releases the lock


_live: weakref.WeakSet[DiskLRU] = weakref.WeakSet()
# (directory, budget, bytes) that collected disk tiers could not report without waiting for the
# flock (``DiskLRU.__del__``); reported at exit. A list: ``append`` needs no lock in ``__del__``.
_orphans: list[tuple[Path, int, int]] = []


def _flush_all() -> None:
    """Write every live disk tier's queued entries and report its puts, and those of collected
    ones (at process exit)."""
    for disk in list(_live):
        try:
            disk.drain()
            disk.flush()
        except Exception:  # noqa: BLE001 - exiting: a lost report is corrected by the next scan
            pass
    while _orphans:
        directory, budget, pending = _orphans.pop()
        try:
            heir = DiskLRU(directory, budget)
            heir._pending = pending
            heir.flush()
        except Exception:  # noqa: BLE001 - as above
            pass


def _reset_in_child() -> None:
    """After a fork the parent still reports its own puts: the child starts from zero (and with
    fresh locks, in case a parent thread held one at the fork)."""
    _orphans.clear()
    for disk in list(_live):
        disk._pending, disk._pending_puts, disk._mutex = 0, 0, threading.Lock()
        # The parent's writer thread and its queue stay with the parent.
        disk._queue, disk._queued, disk._wake = {}, 0, threading.Condition(disk._mutex)


class _ForkHook:
    """Anchor for ``multiprocessing.util.register_after_fork`` (it holds its object weakly)."""


_FORK_HOOK = _ForkHook()
atexit.register(_flush_all)
os.register_at_fork(after_in_child=_reset_in_child)
# A multiprocessing child (a DataLoader worker) ends with os._exit after its own finalizers, so
# atexit never runs there; its finalizer registry is cleared after the fork, then these hooks run.
multiprocessing.util.register_after_fork(
    _FORK_HOOK, lambda _: multiprocessing.util.Finalize(None, _flush_all, exitpriority=10))


@dataclass
class BlobCache:
    """The memory tier (always) plus a disk tier: ``disk_dir`` names one; ``node_disk=True``
    means this node's (``node_disk_dir()``, resolved in each process that builds the cache);
    neither: memory only. ``memory_budget=None``: ``default_memory_budget`` (smaller when a disk
    tier backs it). A disk tier that cannot be created is logged once and left out."""

    memory_budget: int | None = None
    disk_dir: Path | None = None
    disk_budget: int | None = None
    node_disk: bool = False
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        self.disk: DiskLRU | None = None
        directory = Path(self.disk_dir) if self.disk_dir is not None else (
            node_disk_dir() if self.node_disk else None)
        if directory is not None:
            budget = self.disk_budget if self.disk_budget is not None else default_disk_budget(directory)
            try:
                self.disk = DiskLRU(directory, budget)
            except OSError as exc:
                _warn_once("create", directory,
                           f"blob cache: cannot use {directory} ({exc}); caching in memory only "
                           "(set ORCHESTRATOR_CACHE_DIR to a writable folder, or to 'off')")
        memory = self.memory_budget if self.memory_budget is not None else default_memory_budget(
            disk_tier=self.disk is not None)
        self.memory = MemoryLRU(memory)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # a copy in another process starts empty, same settings
        return {"memory_budget": self.memory_budget, "disk_dir": self.disk_dir,
                "disk_budget": self.disk_budget, "node_disk": self.node_disk}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def get_or_fetch(self, key: str, fetch: Callable[[], bytes]) -> bytes:
        """The blob for ``key`` from memory, then disk, else ``fetch()`` (and cache it)."""
        data = self.lookup(key)
        if data is None:
            data = fetch()
            self.store(key, data)
        return data

    def lookup(self, key: str) -> bytes | None:
        """The blob for ``key`` from memory, then disk (counted as a hit), or None."""
        data = self.memory.get(key)
        if data is not None:
            with self._lock:
                self.stats.memory_hits += 1
            return data
        if self.disk is not None:
            data = self.disk.get(key)
            if data is not None:
                with self._lock:
                    self.stats.disk_hits += 1
                    self.stats.evictions += self.memory.put(key, data)
                return data
        return None

    def store(self, key: str, data: bytes) -> None:
        """Cache bytes just fetched from the store and verified against ``key`` (their sha256;
        counted as a miss and as bytes fetched)."""
        evicted = self.memory.put(key, data)
        if self.disk is not None:
            self.disk.put_later(key, data)
        with self._lock:
            self.stats.misses += 1
            self.stats.bytes_fetched += len(data)
            self.stats.evictions += evicted


_node_cache: BlobCache | None = None
_node_lock = threading.Lock()


def node_cache(memory_budget: int | None = None, disk_dir: Path | None = None,
               disk_budget: int | None = None) -> BlobCache:
    """This process's shared cache, created on first use: the given sizes, else the defaults;
    the disk tier is ``disk_dir``, else the node's (``node_disk_dir()``: on unless
    ``ORCHESTRATOR_CACHE_DIR=off``)."""
    global _node_cache
    with _node_lock:
        if _node_cache is None:
            _node_cache = BlobCache(memory_budget, disk_dir, disk_budget, node_disk=disk_dir is None)
        return _node_cache
