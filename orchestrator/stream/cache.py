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

The disk tier (``DiskLRU``) is one LMDB environment (``blobs.lmdb/`` in the folder): entries keyed
by the blob's sha256, with their last-use times and the running total in the same transactions.

* Why LMDB and not a file per blob (the layout before): creating a file cost ~160-300 us of
  kernel time here (ext4 inode allocation), ~15-20% of a cold DataLoader epoch on 2 cores (1,000
  items/s with the disk tier off against 780-890 with it on, measured side by side); an LMDB put
  costs ~20 us, and the writer thread commits up to ``_WRITE_BATCH`` of them at once. A hit is
  one read transaction (~4 us) and a sha256.
* Writes are transactions: a reader never sees a partial entry, and a process killed mid-write
  leaves the environment as of its last commit (LMDB's write lock is process-shared and robust).
  Commits are not fsynced (a cache loses nothing it cannot fetch again), so a power cut can
  leave a torn entry: that is why every read is checked against its name (sha256); a mismatch
  is removed and counted as a miss, never served.
* Accounting is exact: each write transaction adds the entries' page footprint to the total it
  keeps; when the total passes the budget the same transaction evicts the least recently used
  entries down to 90% of the budget (so that trims are spaced by 10% of the budget). A hit
  refreshes the entry's time at most once per ``_TOUCH_S`` (queued for the writer thread).
  LMDB reuses freed pages: the file grows to about the budget and stays there.
* Reads map the file: pages a process has read count in its RSS as shared, file-backed pages
  (the OS page cache, reclaimable), as they count in the page cache with plain reads.
* A failure to write (disk full, read-only home, no permission) never fails a read: it is logged
  once per process and directory, the disk tier stops writing in that process, and reads carry
  on from the store (and from entries already on disk).
* A folder holding the file-per-blob layout of earlier versions is cleared of it on first use.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import logging
import multiprocessing.util
import os
import shutil
import struct
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from orchestrator.errors import ConfigError
from orchestrator.fork_safety import ForkGate, ForkSafeLock

log = logging.getLogger(__name__)

DISK_BACKED_MEMORY_BUDGET = 256 << 20  # per process when the disk tier is on (see module docstring)
WRITE_QUEUE_BYTES = 64 << 20  # disk writes waiting for a process's writer thread, at most
_LOW_WATER = 0.9  # a trim evicts down to this fraction of the budget
_TOUCH_S = 60.0  # a hit refreshes an entry's mtime only if older than this (LRU to the minute)
_warned: set[tuple[str, str]] = set()
_warned_lock = ForkSafeLock()


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
        self._lock = ForkSafeLock()

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
    """Blobs in one LMDB environment under ``directory`` (``blobs.lmdb/``), kept within
    ``budget`` bytes, least recently used evicted first; shared safely by every process on the
    node (see the module docstring for what is guaranteed). Raises ``OSError`` only from the
    constructor (the directory or the environment cannot be created); ``get`` and ``put``
    degrade to a miss and a no-op."""

    def __init__(self, directory: Path, budget: int) -> None:
        self.directory = Path(directory)
        self.budget = budget
        self.directory.mkdir(parents=True, exist_ok=True)
        self._writable = True
        self._mutex = threading.Lock()
        # Writes not yet in the environment (``put_later``), oldest first; ``get`` serves them
        # from here. ``_touches``: keys whose LRU time a hit refreshes; ``_drops``: entries
        # found corrupt. Both are written by the writer thread with the next batch.
        self._queue: dict[str, bytes] = {}
        self._queued = 0  # their bytes
        self._touches: set[str] = set()
        self._drops: set[str] = set()
        self._writing = False
        self._wake = threading.Condition(self._mutex)
        self._writer_pid = 0
        self._db_pid = 0
        _remove_legacy_layout(self.directory)
        self._db  # noqa: B018 - opened here, so that a folder that cannot hold one fails now
        _live.add(self)

    @property
    def _db(self) -> _Env:
        """This process's environment (reopened in a forked child)."""
        if self._db_pid != os.getpid():
            self._env_handle = _environment(self.directory / _ENV_DIR, self.budget)
            self._db_pid = os.getpid()
        return self._env_handle

    # -- the writer thread ---------------------------------------------------------------------

    def put_later(self, key: str, data: bytes) -> None:
        """Queue the entry for this process's writer thread and return at once.

        Why: a write on the fetch threads stalls them (each a write transaction; before LMDB,
        a file per blob cost a cold pass ~40% of its items/s on 2 cores). At most
        ``WRITE_QUEUE_BYTES`` wait: a write that would pass it is dropped (the entry is fetched
        again next time, never served wrong). ``drain`` (at exit, and before counting) waits
        for the queue."""
        with self._mutex:
            if self._queued + len(data) > WRITE_QUEUE_BYTES or not self._writable or key in self._queue:
                return
            self._queue[key] = data
            self._queued += len(data)
            self._wake_writer()

    def _wake_writer(self) -> None:
        """Start this process's writer thread if needed and wake it (holding ``_mutex``)."""
        if self._writer_pid != os.getpid():
            self._writer_pid = os.getpid()
            threading.Thread(target=self._write_queued, name="orchestrator-cache-writer", daemon=True).start()
        self._wake.notify()

    def _write_queued(self) -> None:
        """Write queued entries, touches and drops in batches: one transaction (and one commit)
        per ``_WRITE_BATCH`` entries instead of one per blob."""
        while True:
            with self._mutex:
                while not (self._queue or self._touches or self._drops):
                    self._wake.wait()
                batch = list(itertools.islice(self._queue.items(), _WRITE_BATCH))
                touches, self._touches = self._touches, set()
                drops, self._drops = self._drops, set()
                self._writing = True
            try:
                self._write(batch, touches, drops)
            finally:
                with self._mutex:
                    for key, data in batch:
                        del self._queue[key]
                        self._queued -= len(data)
                    self._writing = False
                    self._wake.notify_all()

    def drain(self, timeout: float = 30.0) -> None:
        """Wait (at most ``timeout``) until every queued write is in the environment."""
        deadline = time.monotonic() + timeout
        with self._mutex:
            while ((self._queue or self._touches or self._drops or self._writing)
                   and self._writer_pid == os.getpid()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._wake.wait(left)

    # -- reads and writes ----------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        """The entry's bytes if present and intact (sha256 == ``key``), else None. An entry this
        process queued and has not written yet is served from the queue: a cold pass that
        outran the writer thread would otherwise fetch those blobs again in the next epoch
        (measured: 160-180 of 3,000 items per warm epoch, on file://)."""
        with self._mutex:
            queued = self._queue.get(key)
        if queued is not None:
            return queued
        k = _key(key)
        try:
            with self._db.begin() as txn:
                data = txn.get(k, db=self._db.blobs)
                used = txn.get(k, db=self._db.atime) if data is not None else None
        except lmdb.Error as exc:
            _warn_once("read", self.directory, f"blob cache: cannot read {self.directory} ({exc}); "
                                               "reading from the store instead")
            return None
        if data is None:
            return None
        if hashlib.sha256(data).hexdigest() != key:
            log.warning("blob cache: the entry for %s in %s does not hash to its name (a torn write "
                        "after a power cut, or a disk error); removed, reading from the store instead",
                        key, self.directory)
            with self._mutex:
                self._drops.add(key)
                self._wake_writer()
            return None
        if used is None or time.time() - _TIME.unpack(used)[0] > _TOUCH_S:  # LRU clock, to the minute
            with self._mutex:
                self._touches.add(key)
                self._wake_writer()
        return data

    def put(self, key: str, data: bytes) -> int:
        """Write the entry now unless present; returns how many entries a trim evicted."""
        return self._write([(key, data)], (), ())

    def _write(self, entries: list[tuple[str, bytes]], touches: Iterable[str], drops: Iterable[str]) -> int:
        """One write transaction: new entries (skipping present ones and any larger than the
        budget), refreshed LRU times, removed corrupt entries, then a trim when the total
        passes the budget. Returns how many entries the trim evicted. A failure (disk full,
        read-only) is logged once and turns writing off in this process."""
        if not self._writable:
            return 0
        now = _TIME.pack(time.time())
        try:
            db = self._db  # raises in a child that inherited it mid-transaction (``_reset_in_child``)
            with db.begin(write=True) as txn:
                total = _total(txn, db)
                for key in drops:
                    old = txn.pop(_key(key), db=db.blobs)
                    if old is not None:
                        txn.delete(_key(key), db=db.atime)
                        total -= _footprint(len(old))
                for key, data in entries:
                    if len(data) > self.budget:
                        continue
                    if txn.put(_key(key), data, db=db.blobs, overwrite=False):
                        txn.put(_key(key), now, db=db.atime)
                        total += _footprint(len(data))
                for key in touches:
                    if txn.get(_key(key), db=db.atime) is not None:
                        txn.put(_key(key), now, db=db.atime)
                evicted, total = _evict(txn, db, total, self.budget) if total > self.budget else (0, total)
                txn.put(_TOTAL, _COUNT.pack(total), db=db.meta)
            return evicted
        except lmdb.MapFullError:
            # More pages than the map holds (a smaller budget set earlier on this directory, or
            # small blobs' page overhead): make room once, then give up on this batch.
            try:
                with db.begin(write=True) as txn:
                    _, total = _evict(txn, db, _total(txn, db), self.budget // 2)
                    txn.put(_TOTAL, _COUNT.pack(total), db=db.meta)
                return 0
            except lmdb.Error as exc:
                failure: Exception = exc
        except lmdb.Error as exc:
            failure = exc
        self._writable = False
        _warn_once("write", self.directory,
                   f"blob cache: cannot write to {self.directory} ({failure}); this process stops "
                   "caching on disk and reads from the store (free space, or set "
                   "ORCHESTRATOR_CACHE_DIR to a writable folder, or to 'off')")
        return 0

    # -- accounting ----------------------------------------------------------------------------

    def trim(self) -> int:
        """Evict least recently used entries until the total fits the budget."""
        with self._db.begin(write=True) as txn:
            total = _total(txn, self._db)
            evicted, total = _evict(txn, self._db, total, self.budget) if total > self.budget else (0, total)
            txn.put(_TOTAL, _COUNT.pack(total), db=self._db.meta)
        return evicted

    def size(self) -> int:
        """The entries' bytes on disk (pages), by a full scan (for tests and tools)."""
        with self._db.begin() as txn:
            return sum(_footprint(len(value)) for _, value in txn.cursor(db=self._db.blobs))

    def estimate(self) -> int:
        """The running total that trims are decided by (kept in the same transactions as the
        entries, so it equals ``size()``)."""
        with self._db.begin() as txn:
            return _total(txn, self._db)

    def count(self) -> int:
        """How many entries there are (not ``__len__``: an empty cache must not be falsy)."""
        with self._db.begin() as txn:
            return txn.stat(self._db.blobs)["entries"]

    def items(self) -> list[tuple[str, bytes]]:
        """Every entry as (name, bytes) as stored, unchecked (for tests and tools)."""
        with self._db.begin() as txn:
            return [(key.hex() if len(key) == 32 else key.decode(), value)
                    for key, value in txn.cursor(db=self._db.blobs)]


def _key(key: str) -> bytes:
    """The LMDB key of a blob: its sha256 as 32 bytes (any other name as UTF-8)."""
    if len(key) == 64:
        try:
            return bytes.fromhex(key)
        except ValueError:
            pass
    return key.encode()


def _footprint(length: int) -> int:
    """Bytes an entry of ``length`` takes in the environment: a value past half a page lives
    in its own pages (16-byte header), a small one shares a leaf page (~key + header)."""
    if length > _PAGE // 2:
        return -(-(length + 16) // _PAGE) * _PAGE
    return length + 48


def _total(txn: lmdb.Transaction, db: _Env) -> int:
    raw = txn.get(_TOTAL, db=db.meta)
    return _COUNT.unpack(raw)[0] if raw is not None else 0


def _evict(txn: lmdb.Transaction, db: _Env, total: int, budget: int) -> tuple[int, int]:
    """Remove least recently used entries (down to ``_LOW_WATER`` of ``budget``, so that trims
    are spaced by a tenth of the budget); returns (evicted, new total)."""
    target = int(budget * _LOW_WATER)
    order = sorted((_TIME.unpack(used)[0], bytes(key)) for key, used in txn.cursor(db=db.atime))
    evicted = 0
    for _, key in order:
        if total <= target:
            break
        old = txn.pop(key, db=db.blobs)
        txn.delete(key, db=db.atime)
        if old is not None:
            total -= _footprint(len(old))
            evicted += 1
    return evicted, max(0, total)


@dataclass
class _Env:
    env: lmdb.Environment
    blobs: Any  # lmdb's named databases (its type is private)
    atime: Any
    meta: Any

    @contextmanager
    def begin(self, write: bool = False) -> Iterator[lmdb.Transaction[bytes]]:
        """A transaction through ``_GATE``: a fork waits until none is open (see
        ``_reset_in_child``)."""
        with _GATE.operation(), self.env.begin(write=write) as txn:
            yield txn


_ENV_DIR = "blobs.lmdb"
_PAGE = 4096
_TIME = struct.Struct("<d")
_COUNT = struct.Struct("<q")
_TOTAL = b"bytes"
_WRITE_BATCH = 64  # entries per write transaction of the writer thread
# One environment per folder per process (LMDB's rule: opening one twice in a process breaks its
# locks); a forked child opens its own (the parent's must not be used after a fork).
_envs: dict[Path, _Env] = {}
_envs_lock = ForkSafeLock()
# Every transaction of this process passes it, so a fork happens with none open.
_GATE = ForkGate()
# Environments a child inherited while a transaction was still open (``_reset_in_child``): kept,
# never closed or reopened, in that process.
_inherited_busy: dict[Path, _Env] = {}


def _environment(path: Path, budget: int) -> _Env:
    """This process's environment at ``path`` (created if absent), with a map large enough for
    ``budget``. Raises OSError when it cannot be opened, ``lmdb.Error`` in a child that
    inherited it mid-transaction (readers treat that as a miss, writers stop writing)."""
    key = path.absolute()
    if key in _inherited_busy:
        raise lmdb.Error(f"{path} was inherited from the parent process mid-transaction; this "
                         "process reads from the store instead")
    with _envs_lock:
        db = _envs.get(key)
        if db is None:
            path.mkdir(parents=True, exist_ok=True)
            try:
                db = _open(path, budget)
            except (lmdb.InvalidError, lmdb.CorruptedError, lmdb.VersionMismatchError) as exc:
                # Not an environment this LMDB can use (a creation cut short by a full disk, a
                # power cut, another LMDB version): a cache starts over.
                log.warning("blob cache: %s is unusable (%s); starting it over", path, exc)
                shutil.rmtree(path, ignore_errors=True)
                path.mkdir(parents=True, exist_ok=True)
                try:
                    db = _open(path, budget)
                except lmdb.Error as again:
                    raise OSError(f"cannot open the cache environment {path}: {again}") from None
            except lmdb.Error as exc:
                raise OSError(f"cannot open the cache environment {path}: {exc}") from None
            _envs[key] = db
        if db.env.info()["map_size"] < _map_size(budget):
            try:
                db.env.set_mapsize(_map_size(budget))
            except lmdb.Error:
                pass  # another thread's transaction is open: the map stays; a full map trims
        return db


#: File systems whose locks LMDB cannot rely on (shared homes on clusters are often one of them).
_NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
               "9p", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse")


def filesystem_type(path: Path) -> str | None:
    """The type of the file system holding ``path`` (longest mount point in /proc/self/mounts), or
    None where that cannot be read (not Linux)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    target = str(Path(path).resolve())
    best, kind = "", None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best, kind = point, fields[2]
    return kind


def _open(path: Path, budget: int) -> _Env:
    kind = filesystem_type(path)
    if kind in _NETWORK_FS:
        raise lmdb.Error(f"it is on a network file system ({kind}), where the cache's locks do not hold; "
                         "set ORCHESTRATOR_CACHE_DIR to a local disk (e.g. /tmp or a node-local SSD)")
    # No fsync (sync, metasync): a cache loses nothing it cannot fetch again; a power cut can
    # leave a torn entry, which the sha256 check on every read catches.
    env = lmdb.open(str(path), map_size=_map_size(budget), max_dbs=3, max_readers=_MAX_READERS,
                    sync=False, metasync=False, meminit=False, lock=True)
    env.reader_check()  # slots of readers that died (a killed worker) free their pages
    return _Env(env, env.open_db(b"blobs"), env.open_db(b"atime"), env.open_db(b"meta"))


def _map_size(budget: int) -> int:
    """Address space (not disk) for a budget: twice it, for page overhead and the old pages a
    transaction keeps until no reader needs them."""
    return max(64 << 20, 2 * budget + (64 << 20))


_MAX_READERS = 1024  # concurrent read transactions across the node's processes and threads


_live: weakref.WeakSet[DiskLRU] = weakref.WeakSet()


def _remove_legacy_layout(directory: Path) -> None:
    """Remove the file-per-blob layout of earlier versions (``<2 hex>/<sha256>`` files, ``.size``,
    ``.lock``) from a cache folder now kept in LMDB: its bytes would otherwise stay on disk,
    outside every budget."""
    if not (directory / ".size").exists():
        return
    with os.scandir(directory) as listing:
        legacy = [e.path for e in listing if len(e.name) == 2 and e.is_dir(follow_symlinks=False)]
    for folder in legacy:
        shutil.rmtree(folder, ignore_errors=True)
    for name in (".size", ".lock"):
        try:
            os.unlink(directory / name)
        except OSError:
            pass


def _flush_all() -> None:
    """Write every live disk tier's queued entries (at process exit)."""
    for disk in list(_live):
        try:
            disk.drain()
        except Exception:  # noqa: BLE001 - exiting: an entry not written is fetched again next time
            pass


def _reset_in_child() -> None:
    """After a fork the child opens its own environments (LMDB's rule) and starts with empty
    queues and fresh locks (a parent thread may have held one at the fork); the parent's writer
    thread and its queue stay with the parent.

    It must close the inherited environments first (py-lmdb refuses a second open of the same
    files in a process). That is safe only with no transaction open: py-lmdb's ``close`` waits
    for the thread owning an open write transaction, which does not exist in the child (a
    DataLoader worker hung there for good), and aborting an inherited read transaction frees a
    reader slot the parent still uses. ``_GATE`` makes the fork wait until none is open; if one
    stayed open past its wait (blocked on another process), the child keeps the inherited
    environments untouched and reads without the disk tier."""
    for key, db in _envs.items():
        if not _GATE.quiet_at_fork:
            _inherited_busy[key] = db
            continue
        # Releases only what this process holds (its own reader slots and fcntl locks: none
        # yet); the parent's stay.
        try:
            db.env.close()
        except lmdb.Error:
            pass
    if not _GATE.quiet_at_fork and _envs:
        log.warning("blob cache: forked while a cache transaction stayed open for %.0f s; this "
                    "process reads without the disk tier", _GATE.wait_s)
    _envs.clear()
    for disk in list(_live):
        disk._mutex = threading.Lock()
        disk._queue, disk._queued, disk._touches, disk._drops = {}, 0, set(), set()
        disk._writing, disk._wake = False, threading.Condition(disk._mutex)
        disk._db_pid = 0


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
        self._lock = ForkSafeLock()

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
_node_lock = ForkSafeLock()


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
