"""Side by side (issue 13): ours vs MosaicML Streaming, WebDataset, LitData, a naive loader, Ray Data, decode limit.

    python benchmarks/peers.py [--n 3000] [--rounds 3] [--systems ours-iter,mosaic,...] [--keep DIR]
                               [--json FILE] [--shard-mib 16] [--seed 0] [--timeout-s 900]

Needs the ``bench`` extra (``pip install -e '.[bench]'``; see pyproject.toml for why some peers are
installed with ``--no-deps``) and ``curl`` (WebDataset opens ``http://`` shards with it).

Data: ``--n`` demo images (``make_demo_data``, 2 workers) are ingested as dataset ``street{n/1000}k``
into ``s3://bench/store`` on ONE SeaweedFS server that this script starts on loopback (with its
Prometheus metrics endpoint on). The peers' copies are exported from that dataset, so every system
holds the same bytes: for each item (manifest order) the blob is read back (sha256 checked) and
written, as the original JPEG bytes, with its id and its boxes (the manifest's ``bbox`` of every
non-tag instance, float32 [N, 4], exactly what ``ItemBlock.item`` yields) into

* MDS shards (``streaming.MDSWriter``, columns id ``str``, jpeg ``bytes``, boxes ``bytes``: raw
  float32, because MDS's ``ndarray`` encoding refuses an item without boxes) uploaded to
  ``s3://bench/peers/<name>-s<MiB>/mds``;
* WebDataset tar shards (``webdataset.ShardWriter``; members ``<key>.jpg``, ``<key>.id.txt``,
  ``<key>.boxes.npy``) uploaded with boto3 to ``.../wds/shard-NNNNNN.tar``;
* LitData chunks (``litdata.optimize`` straight to ``s3://.../litdata``, samples
  ``{"id": str, "jpeg": bytes, "boxes": bytes}``, boxes as for MDS).

Shards/chunks are ``--shard-mib`` (default 16 MiB) for all three, not the peers' 64 MiB defaults:
the 3,000-image dataset is ~69 MB, which at 64 MiB would be one or two shards and leave one of the
two DataLoader workers idle under WebDataset (it splits by shard). With ``--keep DIR`` the images,
the SeaweedFS data and the exported shards live under DIR and are reused by the next run.

Every image is decoded the same way on every path: PIL, ``ImageOps.exif_transpose``, RGB, uint8
H×W×3 (``orchestrator.stream.decode.decode_image`` on ours; ``pil_decode`` here, the same steps,
for the others), so the checksums can agree.

Systems (``--systems``, comma list; default all), each in its peer's recommended configuration:

* ``ours-iter``: ``for item in store.dataset(name)`` with default options (prefetch 16, 8 fetch
  threads, the default node ``BlobCache``: memory tier plus the node's disk tier) on a copy of the dataset ingested with
  packed media (``ingest(pack=True)``): merged range GETs.
* ``ours-loose``: the same loop on the dataset ingested with one object per item (loose blobs,
  the layout of stores written before packs): a GET per item.
* ``ours-torch``: ``ds.dataloader(batch_size=32, num_workers=2)``, the recommended call: a
  ``DataLoader(batch_size=None, persistent_workers=True, prefetch_factor=2)`` whose two workers
  each read whole runs of their own shard and ship batches collated in the ``stream.batch``
  layout (flat boxes + offsets, ~15 tensors per batch).
* ``ours-ray``: ``ds.to_ray().iter_batches(batch_size=32)`` on a local Ray cluster started in the
  measured process (``ray.init(address="local")`` sized as ``orchestrator.ray_runtime`` sizes one).
  ``ours-ray-lazy`` (only when named): the same with the read workers' block arenas left to the
  first epoch (``ORCHESTRATOR_RAY_PREFAULT_ARENAS=0``), the A/B of ``BlockArena.prefault``.
* ``mosaic``: ``streaming.StreamingDataset(remote="s3://...", local=<fresh cache dir>,
  shuffle=False, batch_size=32)`` subclassed to decode in ``__getitem__`` (their documented
  pattern), in ``DataLoader(batch_size=32, num_workers=2, persistent_workers=True)``. The
  ``streaming`` package imports its vision datasets (and so torchvision) on ``import streaming``;
  the mirror's torchvision does not load with torch 2.13.0+cpu, so ``streaming.vision`` is replaced
  by an empty module before the import (``StreamingDataset`` does not use it).
* ``webdataset``: ``wds.WebDataset(<http URLs of the shards>, shardshuffle=False).map(decode)
  .batched(32)`` in ``wds.WebLoader(batch_size=None, num_workers=2, persistent_workers=True)``;
  WebDataset opens ``http://`` URLs with ``curl`` (its ``gopen_curl``), here the shards' plain
  URLs on the SeaweedFS S3 gateway (anonymous reads are allowed while it runs without identities),
  the ``aws``-less way to stream S3 shards. No local cache: every epoch streams the shards again.
* ``litdata``: ``litdata.StreamingDataset("s3://...", cache_dir=<fresh dir>, transform=decode)``
  in ``litdata.StreamingDataLoader(batch_size=32, num_workers=2, persistent_workers=True)``.
  LitData fetches chunks with obstore, whose client options it hard-codes; obstore refuses a
  plain-http endpoint unless the client option ``allow_http`` is set (``AWS_ALLOW_HTTP`` is not
  consulted once client options are given), so ``allow_http`` is added to
  ``litdata.streaming.downloader._OBSTORE_CLIENT_OPTIONS``.
* ``naive``: one boto3 ``get_object`` per item, PIL decode, in a plain loop over the manifest rows
  (like ``benchmarks/stream.py``'s naive loader, and like it with torch imported).
* ``ray-binary``: ``ray.data.read_binary_files("s3://bench/store/datasets/<name>/blobs",
  include_paths=True)`` (pyarrow ``S3FileSystem``) ``.map(decode)`` then ``iter_batches(32)``;
  ids and boxes are joined on the driver from the manifest by blob hash (read inside the timed
  epoch, since a Ray Data user needs the labels too).
* ``decode-limit``: the blobs' bytes held in memory (read before timing), decoded (and hashed, see
  below) by 2 forked processes (``multiprocessing.Pool(2)``, 32 items per task): the ceiling for
  2 cores; no store traffic.

The peers' DataLoaders hand batches over as lists of the items' numpy arrays (``collate_fn`` returns
the list: the images differ in size, so the default collate cannot stack them); ours ships its own
batch layout (tensors; images a list when their sizes differ, item ``i``'s boxes are rows
``instance_offsets[i]:instance_offsets[i + 1]``). Ray progress bars are turned off in both Ray runs
(non-interactive).

Method. Each (round, system) is a fresh subprocess (so "cold" means a fresh process with empty
in-process caches, an empty disk tier of our node cache: ``ORCHESTRATOR_CACHE_DIR`` is a folder
under the work dir emptied before every subprocess, and, for MosaicML and LitData, an emptied
local cache dir); rounds are
interleaved (all systems in round 1, then all in round 2, ...). A subprocess first imports and
connects (and starts Ray where used: "setup s", untimed), then runs two epochs: epoch 1 ("cold")
is timed from opening the dataset (building the loader) to the last item; epoch 2 ("warm") from
the start of the second pass over the same loader, so it sees whatever the system cached (ours:
the node cache, whose disk tier holds this dataset and outlives DataLoader and Ray workers;
MosaicML and LitData: their local shard cache;
WebDataset, naive and Ray Data: nothing). One consumer loop serves every system: for each item it
hashes the whole pixel array (xxh3-128, which reads every byte) and counts its boxes. The checksum
is sha256 over the sorted list of ``id|HxW|pixel digest|boxes as float32 hex`` lines, so it proves
that a system delivered exactly the same pixels and boxes for every item (order not required).

Figures per epoch: items/s (items / epoch wall time), time to first item (TTFI), the consumer's
peak RSS (``VmHWM``), its descendants' peak RSS (DataLoader workers, Ray's daemons and workers,
curl: ``VmHWM`` of each, sampled every 0.25 s, summed; forked workers count pages they share with
their parent, and each Ray process counts the object-store pages it touched, so the sum
overstates), the whole process tree's peak PSS (sampled each second, shared pages counted once),
its peak private memory (``RssAnon`` summed, every 0.25 s) and the peak of a memory cgroup the
measured process and everything it starts run in (``MemoryCgroup``: every page once, page cache
included, as a container limit counts it; where a cgroup can be made), with the growth of each
across warm epochs printed, S3 requests and bytes the server answered (SeaweedFS's
``SeaweedFS_s3_request_total`` by type, HEAD counted as GET by SeaweedFS; bytes:
``SeaweedFS_s3_bucket_traffic_sent_bytes_total``), and the SeaweedFS process's CPU seconds
(utime + stime from ``/proc/<pid>/stat``). The server shares the machine's cores with the
consumer. The table gives medians over rounds with [min–max].

Random access (``--getitem K``, default 300; 0 skips it): in each round, after the systems, a
fresh process per layout opens the packed and the loose copy and times ``ds[i]`` at ``K``
distinct random indices (the same indices for both; each item read once, so every call misses
the cache): one ranged GET of a pack against the loose layout's per-item GET (pyarrow: a HEAD
and a GET). Printed: p50 and p90 latency in ms (medians over rounds) and the server's requests.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stream import dataset_name, prep_store, prepare_images, write_subset  # noqa: E402

log = logging.getLogger("bench.peers")

MIB = 1 << 20
BUCKET = "bench"
STORE_URI = f"s3://{BUCKET}/store"
BATCH = 32
WORKERS = 2
HEARTBEAT_S = 30.0

SYSTEMS = ("ours-iter", "ours-loose", "ours-torch", "ours-ray", "mosaic", "webdataset", "litdata", "naive",
           "ray-binary",
           "decode-limit")
#: A/B variants of a system: measured only when ``--systems`` names them.
AB_SYSTEMS = ("ours-ray-lazy",)
CONFIG = {
    "ours-iter": "for item in store.dataset(name): defaults (prefetch 16, threads 8, node BlobCache); "
                 "packed media",
    "ours-loose": "as ours-iter, on the dataset ingested with loose blobs (one object per item)",
    "ours-torch": "ds.dataloader(batch_size=32, num_workers=2): workers collate (flat values + offsets), "
                  "DataLoader(batch_size=None, persistent_workers=True, prefetch_factor=2), shards by runs",
    "ours-ray": "ds.to_ray().iter_batches(batch_size=32), local Ray cluster",
    "ours-ray-lazy": "as ours-ray, block arenas left to the first epoch (ORCHESTRATOR_RAY_PREFAULT_ARENAS=0)",
    "mosaic": "StreamingDataset(remote=s3://..., local=fresh dir, shuffle=False, batch_size=32) + "
              "DataLoader(batch_size=32, num_workers=2, persistent_workers=True); MDS, shards --shard-mib",
    "webdataset": "WebDataset(http shard URLs via curl, shardshuffle=False).map(decode).batched(32) + "
                  "WebLoader(batch_size=None, num_workers=2, persistent_workers=True); no cache",
    "litdata": "StreamingDataset(s3://..., cache_dir=fresh dir, transform=decode) + StreamingDataLoader("
               "batch_size=32, num_workers=2, persistent_workers=True); obstore allow_http",
    "naive": "boto3 get_object per item + PIL, one process, no cache/prefetch",
    "ray-binary": "ray.data.read_binary_files(blob dir, include_paths=True).map(decode).iter_batches(32)",
    "decode-limit": "PIL decode of in-memory bytes, multiprocessing.Pool(2), 32 items/task",
}
USES_RAY = ("ours-ray", "ours-ray-lazy", "ray-binary")


# -- the same pixels and boxes everywhere ----------------------------------------------------------
def pil_decode(data: bytes) -> np.ndarray:
    """H×W×3 uint8 RGB, EXIF orientation applied: the steps of ``orchestrator.stream.decode``."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as img:
        ImageOps.exif_transpose(img, in_place=True)
        if img.mode != "RGB":
            img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "LA", "PA") else img.convert("RGB")
        return np.asarray(img, dtype=np.uint8)


def boxes_of(instances: list[dict] | None) -> np.ndarray:
    """The item's boxes as ``ItemBlock.item`` builds them: every non-tag instance's bbox, float32 [N, 4]."""
    geo = [i for i in instances or [] if i["kind"] != "tag"]
    return np.asarray([i["bbox"] for i in geo], dtype=np.float32).reshape(-1, 4)


def record_of(item_id: str, image: Any, boxes: Any) -> tuple[str, int]:
    """The consumer's work on one item: hash every pixel, count the boxes; (checksum line, boxes)."""
    import xxhash

    img = np.ascontiguousarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"item {item_id!r}: image {img.dtype} {img.shape}, not uint8 H×W×3")
    b = np.asarray(boxes, dtype="<f4").reshape(-1, 4)
    line = f"{item_id}|{img.shape[0]}x{img.shape[1]}|{xxhash.xxh3_128_hexdigest(img)}|{b.tobytes().hex()}"
    return line, len(b)


def boxes_from_bytes(data: bytes) -> np.ndarray:
    """Boxes stored as raw little-endian float32 (MDS's ndarray encoding refuses an empty array)."""
    return np.frombuffer(data, dtype="<f4").reshape(-1, 4)


def list_collate(batch: list) -> list:
    return batch


# -- measuring (in the consumer subprocess) ---------------------------------------------------------
def proc_mb(path: str, field: str) -> float | None:
    """A ``kB`` field of a /proc file in MB; None if the process or the field is gone."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def vm_hwm_mb(pid: int | str = "self") -> float | None:
    return proc_mb(f"/proc/{pid}/status", "VmHWM:")


def pss_mb(pid: int | str) -> float:
    return proc_mb(f"/proc/{pid}/smaps_rollup", "Pss:") or 0.0


def proc_cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_name(pid: int) -> str:
    """A process's name as its command line gives it (Ray's workers retitle themselves:
    ``ray::IDLE``, ``ray::ReadItems...``), else its ``comm``; "" when it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        first = argv[0].decode(errors="replace").split()[0] if argv and argv[0] else ""
        if first.startswith("ray::"):
            return "ray workers"
        if os.path.basename(first).startswith("python") and len(argv) > 1 and argv[1]:
            return os.path.basename(argv[1].decode(errors="replace"))  # the script or -m module
        if first:
            return os.path.basename(first)
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except (OSError, IndexError):
        return ""


def tree_cpu(root: int) -> dict[int, tuple[str, float]]:
    """(name, utime + stime in seconds) of ``root`` and every descendant, by pid."""
    out = {}
    for pid in [root, *descendants(root)]:
        try:
            out[pid] = ("consumer" if pid == root else proc_name(pid), proc_cpu_s(pid))
        except (OSError, IndexError, ValueError):
            continue
    return out


def cpu_by_name(after: dict[int, tuple[str, float]], before: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds each kind of process in the tree spent between two ``tree_cpu`` snapshots
    (processes that ended in between are missed; Ray's workers and DataLoader's persist)."""
    out: dict[str, float] = {}
    for pid, (name, cpu) in after.items():
        spent = cpu - before.get(pid, (name, 0.0))[1]
        out[name or "?"] = out.get(name or "?", 0.0) + spent
    return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.01}


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's threads, summed by thread name (``comm``)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (from the ppid of each /proc entry)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def status_mb(pid: int | str, fields: tuple[str, ...]) -> dict[str, float] | None:
    """The named ``/proc/<pid>/status`` fields (kB lines) in MB, or None when the process is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in fields:
                    out[name] = int(value.split()[0]) / 1024
    except (OSError, ValueError):
        return None
    return out


class MemoryCgroup:
    """A memory cgroup of its own for one measured subprocess and everything it starts (Ray's
    daemons and workers, DataLoader workers, curl): its peak usage per epoch counts every page
    once, as a container's memory limit or the kernel's OOM killer counts it.

    Why: summed ``VmHWM`` counts a shared page once per process that touched it (Ray's object
    store, pages a forked worker shares with its parent); PSS is sampled, so it misses short
    peaks. The cgroup's own high-water mark (cgroup v1 ``memory.max_usage_in_bytes``, reset by
    writing 0; v2 ``memory.peak``, reset by writing to it on kernels that allow it) has neither
    flaw; it also counts the page cache the tree's reads and writes bring in (the node cache's
    file), charged once, when first touched. Needs a writable memory cgroup hierarchy (root in a
    container, or a delegated one); otherwise every figure is ``None`` and the report says so."""

    ENV = "PEERS_CGROUP"

    def __init__(self, path: Path, v1: bool) -> None:
        self.path = path
        self.peak_file = path / ("memory.max_usage_in_bytes" if v1 else "memory.peak")

    @classmethod
    def create(cls, name: str) -> MemoryCgroup | None:
        """A new child of this process's memory cgroup, or None where none can be made."""
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            _, controllers, rel = line.split(":", 2)
            if "memory" in controllers.split(","):
                roots = [(Path("/sys/fs/cgroup/memory"), True)]
            elif controllers == "":  # the unified (v2) hierarchy, mounted alone or beside v1
                roots = [(Path("/sys/fs/cgroup"), False), (Path("/sys/fs/cgroup/unified"), False)]
            else:
                continue
            for root, v1 in roots:
                parent = root / rel.lstrip("/")
                if not (parent / ("memory.max_usage_in_bytes" if v1 else "memory.current")).exists():
                    continue
                try:
                    (parent / name).mkdir(exist_ok=True)
                    cg = cls(parent / name, v1)
                    cg.reset()
                    return cg
                except OSError:
                    continue
        return None

    @classmethod
    def from_env(cls) -> MemoryCgroup | None:
        """(measured subprocess) Join the cgroup ``run_child`` made, first thing."""
        where = os.environ.get(cls.ENV)
        if not where:
            return None
        path = Path(where)
        try:
            (path / "cgroup.procs").write_text(str(os.getpid()))
        except OSError:
            return None
        return cls(path, (path / "memory.max_usage_in_bytes").exists())

    def reset(self) -> None:
        self.peak_file.write_text("0")

    def peak_mb(self) -> float | None:
        try:
            return int(self.peak_file.read_text()) / 2**20
        except (OSError, ValueError):
            return None

    def remove(self, wait_s: float = 10.0) -> None:
        """Best effort: waits up to ``wait_s`` for processes still in it (Ray's daemons exit a
        moment after the driver), then leaves it."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.path.rmdir()
                return
            except OSError:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.2)


class TreeSampler(threading.Thread):
    """Per epoch: peak ``VmHWM`` of each descendant and peak private (anonymous) memory of the
    whole tree (every 0.25 s), and peak PSS of the whole tree (every 1 s).

    Why three: ``VmHWM`` summed over processes counts a shared page once per process that touched
    it: Ray's driver and read workers each count the object-store pages they wrote or read, though
    the store is one fixed-size shared segment. PSS counts every page once (shared pages split
    between their processes) but costs ~2 ms a process to read, so it is sampled less often;
    the private sum (``RssAnon``) is what a leak in any one process grows."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="tree-sampler")
        self.root = os.getpid()
        self.lock = threading.Lock()
        self.halt = threading.Event()
        self.reset()

    def reset(self) -> None:
        with getattr(self, "lock", threading.Lock()):
            self.child_peak: dict[int, float] = {}
            self.pss_peak = 0.0
            self.private_peak = 0.0

    def run(self) -> None:
        tick = 0
        pss_every = 0 if os.environ.get("PEERS_TREE_PSS") == "off" else 4  # A/B of the sampler's own cost
        while not self.halt.wait(0.25):
            self.sample(pss=pss_every > 0 and tick % pss_every == 0)
            tick += 1

    def sample(self, pss: bool = True) -> None:
        pids = descendants(self.root)
        status = {pid: st for pid in [self.root, *pids] if (st := status_mb(pid, ("VmHWM", "RssAnon")))}
        private = sum(st.get("RssAnon", 0.0) for st in status.values())
        total = sum(pss_mb(pid) for pid in [self.root, *pids]) if pss else 0.0
        with self.lock:
            for pid in pids:
                if "VmHWM" in status.get(pid, {}):
                    self.child_peak[pid] = max(status[pid]["VmHWM"], self.child_peak.get(pid, 0.0))
            self.pss_peak = max(self.pss_peak, total)
            self.private_peak = max(self.private_peak, private)

    def result(self) -> dict:
        with self.lock:
            peaks = list(self.child_peak.values())
            return {"workers": len(peaks), "workers_peak_rss_mb_sum": sum(peaks),
                    "workers_peak_rss_mb_max": max(peaks, default=0.0), "tree_pss_peak_mb": self.pss_peak,
                    "tree_private_peak_mb": self.private_peak}


class ServerProbe:
    """The SeaweedFS process's CPU time and its S3 request and byte counters."""

    def __init__(self, pid: int, metrics_url: str) -> None:
        self.pid = pid
        self.url = metrics_url

    def read(self) -> dict:
        import urllib.request

        text = urllib.request.urlopen(self.url, timeout=10).read().decode()
        out = {"cpu_s": proc_cpu_s(self.pid), "GET": 0, "PUT": 0, "LIST": 0, "other": 0, "bytes_sent": 0}
        for line in text.splitlines():
            if line.startswith("SeaweedFS_s3_request_total{"):
                labels, value = line.rsplit(" ", 1)
                kind = labels.split('type="', 1)[1].split('"', 1)[0] if 'type="' in labels else "other"
                code = labels.split('code="', 1)[1].split('"', 1)[0] if 'code="' in labels else "?"
                out[kind if kind in out else "other"] += int(float(value))
                out[f"{kind}:{code}"] = out.get(f"{kind}:{code}", 0) + int(float(value))
            elif line.startswith("SeaweedFS_s3_bucket_traffic_sent_bytes_total{"):
                out["bytes_sent"] += int(float(line.rsplit(" ", 1)[1]))
        return out

    @staticmethod
    def delta(after: dict, before: dict) -> dict:
        return {k: after[k] - before.get(k, 0) for k in after}


class Consumer:
    """The one consumer loop: records each item's checksum line and counts items and boxes."""

    def __init__(self, t_start: float) -> None:
        self.t_start = t_start
        self.lines: list[str] = []
        self.boxes = 0
        self.ttfi = float("nan")

    def add(self, item_id: str, image: Any, boxes: Any) -> None:
        self.add_record(*record_of(item_id, image, boxes))

    def add_record(self, line: str, nboxes: int) -> None:
        if not self.lines:
            self.ttfi = time.perf_counter() - self.t_start
        self.lines.append(line)
        self.boxes += nboxes

    def checksum(self) -> str:
        return hashlib.sha256("\n".join(sorted(self.lines)).encode()).hexdigest()

    def unique_ids(self) -> int:
        return len({line.split("|", 1)[0] for line in self.lines})


# -- the systems -----------------------------------------------------------------------------------
class System:
    """``setup`` (untimed), ``open`` (timed in epoch 1), ``iterate(epoch)`` -> (id, image, boxes)."""

    def __init__(self, spec: dict) -> None:
        self.spec = spec

    def setup(self) -> None:
        pass

    def open(self) -> None:
        pass

    def iterate(self, epoch: int) -> Iterator[tuple[str, Any, Any]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def s3_client():
    import boto3
    import botocore.config

    return boto3.client(
        "s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"], region_name=os.environ.get("AWS_REGION"),
        config=botocore.config.Config(s3={"addressing_style": "path"}, max_pool_connections=16))


def manifest_items(store, name: str) -> list[tuple[str, str, str, np.ndarray]]:
    """(item_id, blob sha256, object key, boxes) per item, in manifest order."""
    rows = store.dataset(name).manifest_rows(["item_id", "blob", "instances"]).to_pylist()
    blobs = store.blobs(name)
    return [(r["item_id"], r["blob"], blobs.path(r["blob"])[len(BUCKET) + 1:], boxes_of(r["instances"]))
            for r in rows]


def init_ray(arenas: bool = False) -> None:
    """A local Ray cluster started as ``orchestrator.ray_runtime.ensure_ray`` starts one (never
    attached to another cluster on this machine; ``arenas``: as for ``ds.to_ray()``), with its
    read workers warmed up before the first epoch: "Ray is up"."""
    import ray.data

    from orchestrator.adapters.ray import arena_warm_up
    from orchestrator.ray_runtime import start_local_ray

    start_local_ray(wait_warm=True, prepare=arena_warm_up() if arenas else None)
    ray.data.DataContext.get_current().enable_progress_bars = False


class OursIter(System):
    def setup(self) -> None:
        import orchestrator

        self.store = orchestrator.connect(STORE_URI)

    @property
    def name(self) -> str:
        """The packed copy (the default layout), unless this system reads the loose one."""
        return self.spec["name"] if self.spec["system"] == "ours-loose" else self.spec["packed_name"]

    def open(self) -> None:
        self.ds = self.store.dataset(self.name)

    def iterate(self, epoch: int):
        for item in self.ds:
            yield item["id"], item["image"], item["boxes"]

    def extra(self) -> dict:
        return {"cache": self.ds.cache_stats(), "skipped": self.ds.skipped}


class OursTorch(OursIter):
    def setup(self) -> None:
        import torch.utils.data  # noqa: F401  (a training process has torch loaded; as for mosaic, naive)

        super().setup()

    def open(self) -> None:
        self.ds = self.store.dataset(self.name)
        self.loader = self.ds.dataloader(batch_size=BATCH, num_workers=WORKERS)

    def iterate(self, epoch: int):
        for batch in self.loader:
            images, boxes, offsets = batch["image"], batch["boxes"].numpy(), batch["instance_offsets"].tolist()
            for i, item_id in enumerate(batch["id"]):
                yield item_id, images[i].numpy(), boxes[offsets[i]:offsets[i + 1]]

    def extra(self) -> dict:
        """Both workers' store requests and cache counters, summed (``TorchItems.fetch_stats``)."""
        return {"fetch": self.loader.dataset.fetch_stats()}


class OursRay(OursIter):
    def setup(self) -> None:
        super().setup()
        init_ray(arenas=True)

    def open(self) -> None:
        self.rds = self.store.dataset(self.name).to_ray()

    def iterate(self, epoch: int):
        for batch in self.rds.iter_batches(batch_size=BATCH):
            yield from zip(batch["id"], batch["image"], batch["boxes"])

    def extra(self) -> dict:
        return {}


class OursRayLazyArenas(OursRay):
    """``ours-ray`` whose warm-up leaves the read workers' block arenas to the first epoch: what
    ``BlockArena.prefault`` is worth."""

    def setup(self) -> None:
        os.environ["ORCHESTRATOR_RAY_PREFAULT_ARENAS"] = "0"
        super().setup()


def import_mosaic():
    """``streaming`` without its vision datasets: ``import streaming`` imports them, and they import
    torchvision, which does not load with torch 2.13.0+cpu here. ``StreamingDataset`` does not use them."""
    if "streaming" not in sys.modules:
        sys.modules.setdefault("streaming.vision", types.ModuleType("streaming.vision"))
    import streaming

    return streaming


_MOSAIC_CLASS = None


def mosaic_items_class():
    """``StreamingDataset`` subclassed to decode in ``__getitem__`` (MosaicML's documented pattern)."""
    global _MOSAIC_CLASS
    if _MOSAIC_CLASS is None:
        streaming = import_mosaic()

        class MosaicItems(streaming.StreamingDataset):
            def __getitem__(self, idx: int) -> dict:
                s = super().__getitem__(idx)
                return {"id": s["id"], "image": pil_decode(s["jpeg"]), "boxes": boxes_from_bytes(s["boxes"])}

        MosaicItems.__qualname__ = "MosaicItems"
        globals()["MosaicItems"] = MosaicItems
        _MOSAIC_CLASS = MosaicItems
    return _MOSAIC_CLASS


class ShardLoaderSystem(System):
    """A peer read through its own DataLoader of item dicts, with a local shard cache that each
    run starts without (``self.loader``, ``self.cache``)."""

    def iterate(self, epoch: int):
        for batch in self.loader:
            for s in batch:
                yield s["id"], s["image"], s["boxes"]

    def close(self) -> None:
        shutil.rmtree(self.cache, ignore_errors=True)


class Mosaic(ShardLoaderSystem):
    def setup(self) -> None:
        import torch.utils.data  # noqa: F401

        import_mosaic()
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        self.cache = Path(self.spec["cache_dir"]) / "mosaic"
        shutil.rmtree(self.cache, ignore_errors=True)

    def open(self) -> None:
        import torch.utils.data

        ds = mosaic_items_class()(remote=f"s3://{BUCKET}/{self.spec['peers_prefix']}/mds", local=str(self.cache),
                                  shuffle=False, batch_size=BATCH)
        self.loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=WORKERS,
                                                  collate_fn=list_collate, persistent_workers=True)



def wds_decode(sample: dict) -> dict:
    return {"id": sample["id.txt"].decode(), "image": pil_decode(sample["jpg"]),
            "boxes": np.load(io.BytesIO(sample["boxes.npy"]))}


class WebDataset(System):
    def setup(self) -> None:
        import torch.utils.data  # noqa: F401
        import webdataset  # noqa: F401

    def open(self) -> None:
        import webdataset as wds

        ds = (wds.WebDataset(self.spec["wds_urls"], shardshuffle=False).map(wds_decode)
              .batched(BATCH, collation_fn=list_collate, partial=True))
        # collate_fn: hand the batch lists over as they are (the default would turn arrays into tensors)
        self.loader = wds.WebLoader(ds, batch_size=None, num_workers=WORKERS, collate_fn=list_collate,
                                    persistent_workers=True)

    def iterate(self, epoch: int):
        for batch in self.loader:
            for s in batch:
                yield s["id"], s["image"], s["boxes"]


def litdata_decode(sample: dict) -> dict:
    return {"id": sample["id"], "image": pil_decode(sample["jpeg"]), "boxes": boxes_from_bytes(sample["boxes"])}


def import_litdata():
    """``litdata`` with ``allow_http`` added to the obstore client options it hard-codes: obstore
    refuses a plain-http endpoint (SeaweedFS on loopback) without it."""
    import litdata
    import litdata.streaming.downloader as downloader

    opts = getattr(downloader, "_OBSTORE_CLIENT_OPTIONS", None)
    if isinstance(opts, dict):
        downloader._OBSTORE_CLIENT_OPTIONS = {**opts, "allow_http": "true"}
    return litdata


class LitData(ShardLoaderSystem):
    def setup(self) -> None:
        import torch.utils.data  # noqa: F401

        import_litdata()
        self.cache = Path(self.spec["cache_dir"]) / "litdata"
        shutil.rmtree(self.cache, ignore_errors=True)
        self.cache.mkdir(parents=True)

    def open(self) -> None:
        import litdata

        ds = litdata.StreamingDataset(f"s3://{BUCKET}/{self.spec['peers_prefix']}/litdata", cache_dir=str(self.cache),
                                      transform=litdata_decode)
        self.loader = litdata.StreamingDataLoader(ds, batch_size=BATCH, num_workers=WORKERS,
                                                  collate_fn=list_collate, persistent_workers=True)



class Naive(System):
    def setup(self) -> None:
        import torch.utils.data  # noqa: F401  (a training process has torch loaded)

        import orchestrator

        self.store = orchestrator.connect(STORE_URI)
        self.client = s3_client()

    def open(self) -> None:
        self.items = manifest_items(self.store, self.spec["name"])

    def iterate(self, epoch: int):
        for item_id, _blob, key, boxes in self.items:
            data = self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
            yield item_id, pil_decode(data), boxes


def ray_decode_row(row: dict) -> dict:
    return {"path": row["path"], "image": pil_decode(row["bytes"])}


class RayBinary(System):
    def setup(self) -> None:
        import orchestrator

        self.store = orchestrator.connect(STORE_URI)
        init_ray()

    def open(self) -> None:
        import pyarrow.fs
        import ray.data

        self.by_blob: dict[str, list[tuple[str, np.ndarray]]] = {}
        for item_id, blob, _key, boxes in manifest_items(self.store, self.spec["name"]):
            self.by_blob.setdefault(blob, []).append((item_id, boxes))
        endpoint = os.environ["AWS_ENDPOINT_URL"]
        fs = pyarrow.fs.S3FileSystem(access_key=os.environ["AWS_ACCESS_KEY_ID"],
                                     secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                                     region=os.environ.get("AWS_REGION", "us-east-1"),
                                     endpoint_override=endpoint.split("://", 1)[1],
                                     scheme=endpoint.split("://", 1)[0])
        root = f"{BUCKET}/store/datasets/{self.spec['name']}/blobs"
        self.rds = ray.data.read_binary_files(root, filesystem=fs, include_paths=True).map(ray_decode_row)

    def iterate(self, epoch: int):
        for batch in self.rds.iter_batches(batch_size=BATCH):
            for path, image in zip(batch["path"], batch["image"]):
                for item_id, boxes in self.by_blob[path.rsplit("/", 1)[1]]:
                    yield item_id, image, boxes


_DECODE_ITEMS: list[tuple[str, bytes, np.ndarray]] = []


def decode_limit_task(start: int) -> list[tuple[str, int]]:
    return [record_of(item_id, pil_decode(data), boxes) for item_id, data, boxes in _DECODE_ITEMS[start:start + BATCH]]


class DecodeLimit(System):
    def setup(self) -> None:
        import orchestrator

        store = orchestrator.connect(STORE_URI)
        client = s3_client()
        _DECODE_ITEMS.clear()
        for item_id, _blob, key, boxes in manifest_items(store, self.spec["name"]):
            _DECODE_ITEMS.append((item_id, client.get_object(Bucket=BUCKET, Key=key)["Body"].read(), boxes))

    def records(self, epoch: int):
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
            for records in pool.imap_unordered(decode_limit_task, range(0, len(_DECODE_ITEMS), BATCH)):
                yield from records


CLASSES = {"ours-iter": OursIter, "ours-loose": OursIter, "ours-torch": OursTorch, "ours-ray": OursRay,
           "ours-ray-lazy": OursRayLazyArenas,
           "mosaic": Mosaic,
           "webdataset": WebDataset, "litdata": LitData, "naive": Naive, "ray-binary": RayBinary,
           "decode-limit": DecodeLimit}


def measure(spec: dict) -> dict:
    """(subprocess) Setup, then ``spec["epochs"]`` timed epochs of one system."""
    cgroup = MemoryCgroup.from_env()
    probe = ServerProbe(spec["weed_pid"], spec["metrics_url"])
    load_start = os.getloadavg()[0]
    system = CLASSES[spec["system"]](spec)
    t0 = time.perf_counter()
    system.setup()
    setup_s = time.perf_counter() - t0
    base_rss = vm_hwm_mb()
    sampler = TreeSampler()
    sampler.start()
    epochs = []
    try:
        for epoch in range(spec["epochs"]):
            sampler.sample()
            sampler.reset()
            cgroup_ok = cgroup is not None
            if cgroup_ok:
                try:
                    cgroup.reset()
                except OSError:  # a kernel whose memory.peak cannot be reset: no per-epoch figure
                    cgroup_ok = False
            before = probe.read()
            cpu_before, threads_before = tree_cpu(os.getpid()), thread_cpu()
            consumer = Consumer(time.perf_counter())
            if epoch == 0:
                system.open()  # timed: opening the dataset is part of the cold epoch
                open_s = time.perf_counter() - consumer.t_start
            if hasattr(system, "records"):
                for line, nboxes in system.records(epoch):
                    consumer.add_record(line, nboxes)
            else:
                for item_id, image, boxes in system.iterate(epoch):
                    consumer.add(item_id, image, boxes)
            seconds = time.perf_counter() - consumer.t_start
            after = probe.read()
            cpu = cpu_by_name(tree_cpu(os.getpid()), cpu_before)
            threads = {k: round(v - threads_before.get(k, 0.0), 2) for k, v in thread_cpu().items()}
            sampler.sample()
            n = len(consumer.lines)
            epochs.append({
                "epoch": epoch + 1, "items": n, "unique_ids": consumer.unique_ids(), "boxes": consumer.boxes,
                "seconds": seconds, "items_per_s": n / seconds if seconds else 0.0, "ttfi_s": consumer.ttfi,
                "checksum": consumer.checksum(), "server": ServerProbe.delta(after, before),
                "open_s": open_s if epoch == 0 else 0.0,
                "consumer_peak_rss_mb": vm_hwm_mb(), **sampler.result(),
                "tree_cgroup_peak_mb": cgroup.peak_mb() if cgroup_ok else None,
                "loadavg_1min_end": os.getloadavg()[0],  # other load on the machine shows here
                # CPU seconds by kind of process in the tree, and by thread of the consumer
                "cpu_s": cpu, "consumer_threads_cpu_s": {k: v for k, v in threads.items() if v >= 0.05},
            })
            print(f"  epoch {epoch + 1}: {n} items in {seconds:.2f} s", file=sys.stderr, flush=True)
        extra = system.extra() if hasattr(system, "extra") else {}
    finally:
        sampler.halt.set()
        system.close()
    return {"system": spec["system"], "round": spec["round"], "setup_s": setup_s, "base_rss_mb": base_rss,
            "loadavg_1min_start": load_start, "epochs": epochs, "extra": extra}


def measure_getitem(spec: dict) -> dict:
    """(subprocess) ``ds[i]`` at ``spec["k"]`` distinct random indices of one layout's copy."""
    import random

    import orchestrator

    probe = ServerProbe(spec["weed_pid"], spec["metrics_url"])
    name = spec["packed_name"] if spec["layout"] == "packed" else spec["name"]
    ds = orchestrator.connect(STORE_URI).dataset(name)
    ds[0]  # opens the manifest and its first row group: not part of an item's latency
    indices = random.Random(spec["seed"]).sample(range(1, len(ds)), min(spec["k"], len(ds) - 1))
    before = probe.read()
    latencies = []
    for i in indices:
        t0 = time.perf_counter()
        item = ds[i]
        latencies.append(time.perf_counter() - t0)
        assert item["image"] is not None
    server = ServerProbe.delta(probe.read(), before)
    ms = np.asarray(latencies) * 1000
    return {"layout": spec["layout"], "k": len(indices), "p50_ms": float(np.percentile(ms, 50)),
            "p90_ms": float(np.percentile(ms, 90)), "mean_ms": float(ms.mean()), "server": server}


def report_getitem(results: list[dict]) -> dict:
    if not results:
        return {}
    out = {}
    print("\nds[i] at random indices (each item once, cold cache); medians [min–max] over rounds:")
    for layout in ("packed", "loose"):
        mine = [r for r in results if r["layout"] == layout]
        p50, p90 = [r["p50_ms"] for r in mine], [r["p90_ms"] for r in mine]
        gets = statistics.median(r["server"]["GET"] / r["k"] for r in mine)
        out[layout] = {"p50_ms": p50, "p90_ms": p90, "gets_per_item": gets}
        print(f"  {layout:<7} p50 {spread(p50, '{:.2f}')} ms, p90 {spread(p90, '{:.2f}')} ms, "
              f"{gets:.2f} requests per item")
    return out


# -- export the peers' copies (subprocess) ----------------------------------------------------------
def litdata_export_item(index: int, src: str) -> dict:
    """Item ``index`` of the export: id, the blob's bytes, boxes as raw float32 bytes."""
    meta = json.loads((Path(src) / f"{index:06d}.json").read_text())
    return {"id": meta["id"], "jpeg": (Path(src) / f"{index:06d}.jpg").read_bytes(),
            "boxes": np.asarray(meta["boxes"], dtype="<f4").reshape(-1, 4).tobytes()}


def export_peers(spec: dict) -> dict:
    """MDS, WebDataset and LitData copies of dataset ``spec["name"]`` on the same S3."""
    import orchestrator

    store = orchestrator.connect(STORE_URI)
    client = s3_client()
    work = Path(spec["work"])
    prefix = spec["peers_prefix"]
    shard_bytes = spec["shard_mib"] * MIB
    src = work / "peers-src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    t0 = time.perf_counter()
    items = manifest_items(store, spec["name"])
    total = 0
    for i, (item_id, blob, key, boxes) in enumerate(items):
        data = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        if hashlib.sha256(data).hexdigest() != blob:
            raise SystemExit(f"blob of {item_id} does not match its hash")
        total += len(data)
        (src / f"{i:06d}.jpg").write_bytes(data)
        (src / f"{i:06d}.json").write_text(json.dumps({"id": item_id, "boxes": boxes.tolist()}))
    out: dict[str, Any] = {"items": len(items), "jpeg_bytes": total, "read_s": time.perf_counter() - t0}
    for sub in ("mds", "wds", "litdata"):  # a re-export replaces what is there
        listing = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/{sub}/")
        for page in listing:
            for obj in page.get("Contents", []):
                client.delete_object(Bucket=BUCKET, Key=obj["Key"])

    t0 = time.perf_counter()
    streaming = import_mosaic()
    local = work / "export-mds"
    shutil.rmtree(local, ignore_errors=True)
    with streaming.MDSWriter(out=(str(local), f"s3://{BUCKET}/{prefix}/mds"), size_limit=shard_bytes,
                             columns={"id": "str", "jpeg": "bytes", "boxes": "bytes"}) as writer:
        for i in range(len(items)):
            s = litdata_export_item(i, str(src))
            writer.write({"id": s["id"], "jpeg": s["jpeg"], "boxes": s["boxes"]})
    shutil.rmtree(local, ignore_errors=True)
    out["mds_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    import webdataset as wds

    local = work / "export-wds"
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    with wds.ShardWriter(str(local / "shard-%06d.tar"), maxsize=shard_bytes, maxcount=10**9, encoder=False,
                         verbose=0) as writer:
        for i in range(len(items)):
            s = litdata_export_item(i, str(src))
            npy = io.BytesIO()
            np.save(npy, boxes_from_bytes(s["boxes"]))
            writer.write({"__key__": f"{i:06d}", "jpg": s["jpeg"], "id.txt": s["id"].encode(),
                          "boxes.npy": npy.getvalue()})
    shards = sorted(local.glob("shard-*.tar"))
    for shard in shards:
        client.upload_file(str(shard), BUCKET, f"{prefix}/wds/{shard.name}")
    shutil.rmtree(local, ignore_errors=True)
    out["wds_keys"] = [f"{prefix}/wds/{s.name}" for s in shards]
    out["wds_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    import functools

    litdata = import_litdata()
    litdata.optimize(fn=functools.partial(litdata_export_item, src=str(src)), inputs=list(range(len(items))),
                     output_dir=f"s3://{BUCKET}/{prefix}/litdata", chunk_bytes=shard_bytes, num_workers=WORKERS,
                     mode="overwrite", verbose=False)
    out["litdata_s"] = time.perf_counter() - t0

    for sub in ("mds", "wds", "litdata"):
        objs = [o for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/{sub}/")
                for o in page.get("Contents", [])]
        out[f"{sub}_objects"] = len(objs)
        out[f"{sub}_bytes"] = sum(o["Size"] for o in objs)
    shutil.rmtree(src, ignore_errors=True)
    return out


# -- driver ----------------------------------------------------------------------------------------
def run_child(args: list[str], what: str, errlog: Path, timeout_s: float) -> dict:
    """Run this script with ``args``; heartbeat while it runs; its last JSON stdout line. The
    child's node blob cache (``ORCHESTRATOR_CACHE_DIR``) is an empty folder under the work dir,
    so every measured run starts cold, and nothing lands in the user's cache folder."""
    cmd = [sys.executable, __file__, *args]
    cache_dir: Path | str = errlog.parent / "blob-cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    Path(cache_dir).mkdir(parents=True)
    if os.environ.get("PEERS_DISK_CACHE") == "off":  # A/B of the disk tier's cost on a cold pass
        cache_dir = "off"
    cgroup = MemoryCgroup.create(f"peers-{os.getpid()}-{time.monotonic_ns()}")
    env = {**os.environ, "ORCHESTRATOR_CACHE_DIR": str(cache_dir)}
    if cgroup is not None:
        env[MemoryCgroup.ENV] = str(cgroup.path)
    t0 = time.perf_counter()
    with open(errlog, "a") as err:
        err.write(f"\n=== {what}: {' '.join(cmd)}\n")
        err.flush()
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
                                    env=env)
            out = _wait(proc, what, errlog, timeout_s, t0)
        finally:
            if cgroup is not None:
                cgroup.remove()
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed with exit status {proc.returncode}; see {errlog}")
    return json.loads(next(line for line in reversed(out.strip().splitlines()) if line.startswith("{")))


def _wait(proc: subprocess.Popen, what: str, errlog: Path, timeout_s: float, t0: float) -> str:
    """``proc``'s stdout once it exits, with a heartbeat line while it runs; killed past the limit."""
    while True:
        try:
            return proc.communicate(timeout=HEARTBEAT_S)[0]
        except subprocess.TimeoutExpired:
            elapsed = time.perf_counter() - t0
            if elapsed > timeout_s:
                os.killpg(proc.pid, 9)
                proc.communicate()
                raise RuntimeError(f"{what} ran past {timeout_s:.0f} s and was killed; see {errlog}") from None
            print(f"  ... {what}: {elapsed:.0f} s", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000, help="demo images (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="comma list (default: all but A/B variants): " + ",".join(SYSTEMS + AB_SYSTEMS))
    parser.add_argument("--keep", type=Path, help="keep images, SeaweedFS data and shards under DIR, reuse them")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--shard-mib", type=int, default=16, help="MDS/tar/LitData shard size (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2,
                        help="epochs per run: 1 cold + warm ones; 4 shows peak RSS across warm epochs "
                             "(default: %(default)s)")
    parser.add_argument("--timeout-s", type=float, default=900, help="per measured subprocess (default: %(default)s)")
    parser.add_argument("--prep", help=argparse.SUPPRESS)
    parser.add_argument("--export", help=argparse.SUPPRESS)
    parser.add_argument("--getitem", type=int, default=300,
                        help="random ds[i] calls per layout and round (0: skip; default: %(default)s)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--getitem-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    if args.prep:
        p = json.loads(args.prep)
        print(json.dumps(prep_store(p["uri"], Path(p["coco"]), Path(p["images"]), p["size"], p["pack"])), flush=True)
        return
    if args.export:
        print(json.dumps(export_peers(json.loads(args.export))), flush=True)
        return
    if args.one:
        print(json.dumps(measure(json.loads(args.one))), flush=True)
        return
    if args.getitem_one:
        print(json.dumps(measure_getitem(json.loads(args.getitem_one))), flush=True)
        return

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS) - set(AB_SYSTEMS))
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; known: {', '.join(SYSTEMS + AB_SYSTEMS)}")
    import importlib.util

    need = {"mosaic": "streaming", "webdataset": "webdataset", "litdata": "litdata"}
    missing = [f"{s} ({need[s]})" for s in systems if s in need and importlib.util.find_spec(need[s]) is None]
    if missing or importlib.util.find_spec("xxhash") is None:
        raise SystemExit(f"not installed: {', '.join(missing) or 'xxhash'}; pip install -e '.[bench]' and "
                         "pip install --no-deps -r benchmarks/peers-nodeps.txt")
    if "webdataset" in systems and shutil.which("curl") is None:
        raise SystemExit("webdataset reads http:// shards with curl, which is not on PATH")

    from orchestrator.dev.seaweed import SeaweedServer

    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    work = (args.keep or Path(tempfile.mkdtemp(prefix="bench-peers-"))).resolve()
    errlog = work / "subprocess-stderr.log"
    print(f"work dir {work}; subprocess stderr goes to {errlog}", flush=True)
    name = dataset_name(args.n)
    runs: list[dict] = []
    failures: list[dict] = []
    getitems: list[dict] = []
    try:
        demo = prepare_images(work, args.n, args.seed)
        coco, data_bytes = write_subset(demo, args.n)
        metrics_port = free_port()
        with SeaweedServer(work / "seaweed", metrics_port=metrics_port) as s3:
            s3.create_bucket(BUCKET, BUCKET, BUCKET)
            os.environ.update(s3.env(BUCKET, BUCKET))  # inherited by every subprocess
            os.environ["S3_ENDPOINT_URL"] = s3.endpoint_url  # MosaicML Streaming's endpoint variable
            print(f"SeaweedFS on {s3.endpoint_url} (pid {s3.pid}, metrics on :{metrics_port}, "
                  f"started in {s3.startup_seconds or 0:.1f} s)", flush=True)
            for pack in (False, True):
                job = {"uri": STORE_URI, "coco": str(coco), "images": str(demo / "images"), "size": args.n,
                       "pack": pack}
                r = run_child(["--prep", json.dumps(job)], f"ingest {name}", errlog,
                              args.timeout_s)
                print(f"{'ingested' if r['ingested'] else 'reusing'} {r['name']}: {r['items']:,} items"
                      + (f" in {r['seconds']:.1f} s" if r["ingested"] else ""), flush=True)
            peers_prefix = f"peers/{name}-s{args.shard_mib}"
            marker = work / f"peers-{name}-s{args.shard_mib}.json"
            if marker.exists():
                export = json.loads(marker.read_text())
                print(f"reusing the exported MDS/WebDataset/LitData copies ({marker.name})", flush=True)
            elif {"mosaic", "webdataset", "litdata"} & set(systems):
                print("exporting MDS, WebDataset and LitData copies ...", flush=True)
                job = {"name": name, "work": str(work), "shard_mib": args.shard_mib, "peers_prefix": peers_prefix}
                export = run_child(["--export", json.dumps(job)], "export", errlog, args.timeout_s)
                marker.write_text(json.dumps(export))
            else:
                export = {}
            if export:
                print(f"exported {export['items']:,} items ({export['jpeg_bytes'] / 1e6:.1f} MB of JPEG): "
                      f"MDS {export['mds_objects']} objects {export['mds_bytes'] / 1e6:.1f} MB, "
                      f"WebDataset {export['wds_objects']} {export['wds_bytes'] / 1e6:.1f} MB, "
                      f"LitData {export['litdata_objects']} {export['litdata_bytes'] / 1e6:.1f} MB", flush=True)
            base = {"name": name, "packed_name": f"{name}-packed", "n": args.n, "epochs": args.epochs,
                    "weed_pid": s3.pid,
                    "metrics_url": f"http://127.0.0.1:{metrics_port}/metrics", "peers_prefix": peers_prefix,
                    "wds_urls": [f"{s3.endpoint_url}/{BUCKET}/{k}" for k in export.get("wds_keys", [])],
                    "cache_dir": str(work / "cache")}
            for rnd in range(1, args.rounds + 1):
                for system in systems:
                    what = f"round {rnd}/{args.rounds} {system}"
                    print(f"{what} ...", flush=True)
                    spec = {**base, "system": system, "round": rnd}
                    try:
                        r = run_child(["--one", json.dumps(spec)], what, errlog, args.timeout_s)
                    except RuntimeError as exc:
                        print(f"  FAILED: {exc}", flush=True)
                        failures.append({"system": system, "round": rnd, "error": str(exc)})
                        continue
                    runs.append(r)
                    print("  " + " | ".join(
                        f"epoch {e['epoch']}: {e['items_per_s']:.0f} items/s, TTFI {e['ttfi_s']:.2f} s, "
                        f"{e['server']['GET']} GETs, {e['server']['bytes_sent'] / 1e6:.1f} MB"
                        + (f", cgroup peak {e['tree_cgroup_peak_mb']:.0f} MB" if e.get("tree_cgroup_peak_mb") else "")
                        for e in r["epochs"]) + f" | setup {r['setup_s']:.1f} s, open {r['epochs'][0]['open_s']:.2f} s"
                        " (in TTFI) | load "
                        f"{r['loadavg_1min_start']:.1f}->{r['epochs'][-1]['loadavg_1min_end']:.1f}", flush=True)
                    print("  CPU s " + " | ".join(
                        f"epoch {e['epoch']}: " + ", ".join(f"{k} {v:.1f}" for k, v in list(e["cpu_s"].items())[:6])
                        + f"; server {e['server']['cpu_s']:.1f}" for e in r["epochs"]), flush=True)
                for layout in ("packed", "loose") if args.getitem else ():
                    spec = {**base, "layout": layout, "k": args.getitem, "seed": args.seed + rnd}
                    r = run_child(["--getitem-one", json.dumps(spec)], f"round {rnd} ds[i] {layout}", errlog,
                                  args.timeout_s)
                    getitems.append({**r, "round": rnd})
                    print(f"round {rnd}/{args.rounds} ds[i] {layout}: p50 {r['p50_ms']:.2f} ms, p90 "
                          f"{r['p90_ms']:.2f} ms, {r['server']['GET']} GETs for {r['k']} items", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    summary = report(runs, failures, systems, args, data_bytes)
    summary["getitem"] = report_getitem(getitems)
    if args.json:
        args.json.write_text(json.dumps({
            "n": args.n, "rounds": args.rounds, "shard_mib": args.shard_mib, "seed": args.seed,
            "cores": os.cpu_count(), "dataset": name, "jpeg_bytes": data_bytes, "config": CONFIG,
            "export": export, "summary": summary, "runs": runs, "failures": failures, "getitem": getitems,
        }, indent=1))
        print(f"\nwrote {args.json}")


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    if not values:
        return "-"
    med = fmt.format(statistics.median(values))
    return med if len(values) == 1 else f"{med} [{fmt.format(min(values))}–{fmt.format(max(values))}]"


def report(runs: list[dict], failures: list[dict], systems: list[str], args, data_bytes: int) -> dict:
    summary: dict[str, dict] = {}
    # The checksum most epochs agree on; a system that delivered anything else is marked.
    counts = Counter(e["checksum"] for r in runs for e in r["epochs"])
    reference = counts.most_common(1)[0][0] if counts else None
    for system in systems:
        mine = [r for r in runs if r["system"] == system]
        if not mine:
            continue
        cold = [r["epochs"][0] for r in mine]
        warm = [e for r in mine for e in r["epochs"][1:]]
        checksums = sorted({e["checksum"] for r in mine for e in r["epochs"]})

        def med(epochs: list[dict], key) -> float | None:
            return statistics.median([key(e) for e in epochs]) if epochs else None

        summary[system] = {
            "config": CONFIG[system],
            "cold_items_per_s": [e["items_per_s"] for e in cold],
            "warm_items_per_s": [e["items_per_s"] for e in warm],
            "cold_ttfi_s": [e["ttfi_s"] for e in cold], "warm_ttfi_s": [e["ttfi_s"] for e in warm],
            "setup_s": [r["setup_s"] for r in mine],
            "consumer_peak_rss_mb": max(e["consumer_peak_rss_mb"] for r in mine for e in r["epochs"]),
            "workers_peak_rss_mb_sum": max(e["workers_peak_rss_mb_sum"] for r in mine for e in r["epochs"]),
            "workers_peak_rss_mb_max": max(e["workers_peak_rss_mb_max"] for r in mine for e in r["epochs"]),
            "workers": max(e["workers"] for r in mine for e in r["epochs"]),
            "tree_pss_peak_mb": max(e["tree_pss_peak_mb"] for r in mine for e in r["epochs"]),
            "cold_gets": med(cold, lambda e: e["server"]["GET"]), "warm_gets": med(warm, lambda e: e["server"]["GET"]),
            "cold_lists": med(cold, lambda e: e["server"]["LIST"]),
            "cold_mb": med(cold, lambda e: e["server"]["bytes_sent"] / 1e6),
            "warm_mb": med(warm, lambda e: e["server"]["bytes_sent"] / 1e6),
            "cold_server_cpu_s": med(cold, lambda e: e["server"]["cpu_s"]),
            "warm_server_cpu_s": med(warm, lambda e: e["server"]["cpu_s"]),
            "items": sorted({e["items"] for r in mine for e in r["epochs"]}),
            "boxes": sorted({e["boxes"] for r in mine for e in r["epochs"]}),
            "checksums": checksums,
            # Peak RSS of the consumer plus its workers (VmHWM) at the end of each warm epoch,
            # per round: flat (issue 14: within 5%) when warm epochs neither leak nor grow.
            "warm_peak_rss_mb": [[e["consumer_peak_rss_mb"] + e["workers_peak_rss_mb_sum"] for e in r["epochs"][1:]]
                                 for r in mine],
            # The same epochs' peak PSS and peak private memory of the tree (``TreeSampler``).
            "warm_pss_mb": [[e["tree_pss_peak_mb"] for e in r["epochs"][1:]] for r in mine],
            "warm_private_mb": [[e.get("tree_private_peak_mb", 0.0) for e in r["epochs"][1:]] for r in mine],
            # The same epochs' peak of the tree's own memory cgroup (``MemoryCgroup``; None without one).
            "warm_cgroup_mb": [[e.get("tree_cgroup_peak_mb") or 0.0 for e in r["epochs"][1:]] for r in mine],
        }
    print(f"\n{args.n:,} demo images ({data_bytes / 1e6:.1f} MB of JPEG) on one SeaweedFS on loopback, "
          f"{args.rounds} interleaved round(s), {os.cpu_count()} cores; cold = epoch 1 of a fresh process, "
          "warm = epoch 2 of the same loader; medians [min–max] over rounds\n")
    header = (f"{'system':<13} {'cold items/s':>18} {'warm items/s':>18} {'TTFI cold/warm s':>16} {'setup s':>7} "
              f"{'RSS MB':>6} {'workers MB':>10} {'tree PSS':>8} {'GETs cold/warm':>14} {'MB cold/warm':>12} "
              f"{'srv CPU s c/w':>13}  checksum")
    print(header)
    print("-" * len(header))

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else fmt.format(v)

    for system, s in summary.items():
        ok = "same" if len(s["checksums"]) == 1 and s["checksums"][0] == reference else "DIFFERS"
        ttfi = (f"{statistics.median(s['cold_ttfi_s']):.2f}/"
                + (f"{statistics.median(s['warm_ttfi_s']):.2f}" if s["warm_ttfi_s"] else "-"))
        print(f"{system:<13} {spread(s['cold_items_per_s']):>18} {spread(s['warm_items_per_s']):>18} {ttfi:>16} "
              f"{statistics.median(s['setup_s']):>7.1f} "
              f"{s['consumer_peak_rss_mb']:>6.0f} {s['workers_peak_rss_mb_sum']:>10.0f} {s['tree_pss_peak_mb']:>8.0f} "
              f"{num(s['cold_gets'], '{:.0f}') + '/' + num(s['warm_gets'], '{:.0f}'):>14} "
              f"{num(s['cold_mb'], '{:.1f}') + '/' + num(s['warm_mb'], '{:.1f}'):>12} "
              f"{num(s['cold_server_cpu_s'], '{:.2f}') + '/' + num(s['warm_server_cpu_s'], '{:.2f}'):>13}  "
              f"{','.join(c[:12] for c in s['checksums'])} ({ok})")
    print("\nsetup s: imports, connect, Ray start (untimed, before epoch 1); RSS MB: the consumer's peak "
          "(VmHWM); workers MB: sum of its descendants' peaks (DataLoader workers, Ray daemons and workers, curl); "
          "tree PSS: peak PSS of the whole process tree (sampled each second); GETs: GET+HEAD requests SeaweedFS "
          "answered in the epoch; MB: bytes it sent; srv CPU: its CPU seconds.")
    for key, what in (("warm_peak_rss_mb", "peak RSS (consumer + workers, VmHWM summed: a shared page per process)"),
                      ("warm_pss_mb", "peak PSS of the tree (every page once; sampled each second)"),
                      ("warm_private_mb", "peak private memory of the tree (RssAnon summed, sampled every 0.25 s)"),
                      ("warm_cgroup_mb", "peak memory of the tree's own cgroup (every page once, page cache "
                                         "included, as a container limit counts it)")):
        growth = {k: [(r[-1] / r[0] - 1) * 100 for r in s[key] if len(r) > 1 and r[0]] for k, s in summary.items()}
        if any(growth.values()):
            print(f"{what} from the first to the last warm epoch (epochs 2-{args.epochs}): "
                  + "; ".join(f"{k} {s[key][0][0]:.0f}->{s[key][0][-1]:.0f} MB, "
                              f"{spread(growth[k], '{:+.1f}')}%" for k, s in summary.items() if growth[k]))
    if runs and not any(e.get("tree_cgroup_peak_mb") for r in runs for e in r["epochs"]):
        print("the tree's cgroup peak was not measured: no writable memory cgroup here (see MemoryCgroup)")
    loads = [r["loadavg_1min_start"] for r in runs] + [e["loadavg_1min_end"] for r in runs for e in r["epochs"]]
    if loads:
        print(f"1-minute load average at the runs' starts and epochs' ends: {spread(loads, '{:.1f}')} "
              f"({os.cpu_count()} cores; counts this benchmark, SeaweedFS and any other work on the machine)")
    print("items/boxes per epoch: " + "; ".join(
        f"{k} {'/'.join(map(str, s['items']))}/{'/'.join(map(str, s['boxes']))}" for k, s in summary.items()))
    print("\nconfigurations:")
    for system in summary:
        print(f"  {system:<13} {CONFIG[system]}")
    same = bool(summary) and all(s["checksums"] == [reference] for s in summary.values())
    if summary:
        verdict = "every system and epoch delivered" if same else "NOT every system delivered"
        print(f"\nchecksum {reference}: {verdict} the same items, pixels and boxes")
    for f in failures:
        print(f"FAILED: {f['system']} round {f['round']}: {f['error']}")
    return {"checksum_reference": reference, "all_checksums_agree": same, "systems": summary}


if __name__ == "__main__":
    main()
