"""A node-local, content-addressed blob cache: memory LRU in front of an optional disk LRU.

Keyed by the blob's sha256, so an entry is valid for every dataset, version and process that
names the same hash: nothing is ever invalidated, only evicted. Both tiers have a byte budget.

The disk tier is shared by every process on the node (DataLoader workers, Ray workers): entries
are written to a temp file and renamed into place (readers never see partial files), a hit
refreshes the file's mtime (the LRU clock), and eviction runs under an ``flock`` so that only one
process trims at a time. A process that loses a race (a file evicted between listing and
reading) just counts a miss.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

_TRIM_EVERY = 64  # puts between full directory scans (the running total is an estimate)


def default_memory_budget() -> int:
    """5% of RAM, between 64 MiB and 2 GiB."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 8 << 30
    return int(min(2 << 30, max(64 << 20, ram // 20)))


def default_disk_dir() -> Path:
    env = os.environ.get("ORCHESTRATOR_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "orchestrator" / "blobs"


def default_disk_budget(directory: Path) -> int:
    """10% of the free space where the cache lives, at most 20 GiB."""
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
    """Files named by hash under ``directory``, trimmed to ``budget`` bytes, oldest mtime first."""

    def __init__(self, directory: Path, budget: int) -> None:
        self.directory = Path(directory)
        self.budget = budget
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.directory / ".lock"
        self._approx = self._scan_size()
        self._puts = 0

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / key

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            os.utime(path)  # LRU clock
        except FileNotFoundError:
            pass
        return data

    def put(self, key: str, data: bytes) -> int:
        if len(data) > self.budget:
            return 0
        path = self._path(key)
        if path.exists():
            return 0
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{key}.{uuid.uuid4().hex}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self._approx += len(data)
        self._puts += 1
        if self._approx > self.budget or self._puts % _TRIM_EVERY == 0:
            return self.trim()
        return 0

    def _entries(self) -> list[tuple[float, int, Path]]:
        out = []
        for sub in self.directory.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                if f.name.startswith("."):
                    continue
                try:
                    st = f.stat()
                except FileNotFoundError:
                    continue
                out.append((st.st_mtime, st.st_size, f))
        return out

    def _scan_size(self) -> int:
        return sum(size for _, size, _ in self._entries())

    def trim(self) -> int:
        """Evict the least recently used files until the directory fits its budget."""
        evicted = 0
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = sorted(self._entries(), key=lambda e: e[0])
            total = sum(size for _, size, _ in entries)
            for _, size, path in entries:
                if total <= self.budget:
                    break
                try:
                    path.unlink()
                    evicted += 1
                except FileNotFoundError:
                    pass
                total -= size
            self._approx = total
        return evicted

    def size(self) -> int:
        return self._scan_size()


@dataclass
class BlobCache:
    """Memory tier (always) plus disk tier (optional); see module docstring."""

    memory_budget: int = field(default_factory=default_memory_budget)
    disk_dir: Path | None = None
    disk_budget: int | None = None
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        self.memory = MemoryLRU(self.memory_budget)
        self.disk: DiskLRU | None = None
        if self.disk_dir is not None:
            budget = self.disk_budget if self.disk_budget is not None else default_disk_budget(Path(self.disk_dir))
            self.disk = DiskLRU(Path(self.disk_dir), budget)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # a copy in another process starts empty, same settings
        return {"memory_budget": self.memory_budget, "disk_dir": self.disk_dir,
                "disk_budget": self.disk_budget}

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
        """Cache bytes just fetched from the store (counted as a miss and as bytes fetched)."""
        evicted = self.memory.put(key, data)
        if self.disk is not None:
            evicted += self.disk.put(key, data)
        with self._lock:
            self.stats.misses += 1
            self.stats.bytes_fetched += len(data)
            self.stats.evictions += evicted


_node_cache: BlobCache | None = None
_node_lock = threading.Lock()


def node_cache(memory_budget: int | None = None, disk_dir: Path | None = None,
               disk_budget: int | None = None) -> BlobCache:
    """This process's shared cache (created on first use with the given or default sizes)."""
    global _node_cache
    with _node_lock:
        if _node_cache is None:
            _node_cache = BlobCache(
                memory_budget if memory_budget is not None else default_memory_budget(),
                disk_dir, disk_budget,
            )
        return _node_cache

