"""Store faults (issue 11): what each read path and ingest do when the SeaweedFS server is killed
-9 and restarted, or SIGSTOPped, in the middle of a run; and what verifying sha256 on read costs.

    python -m benchmarks.faults [--n 2000] [--restart-s 20] [--short-stall-s 10]
                                [--long-stall-s 60] [--deadline-s 30] [--request-timeout-s 10]
                                [--fault-at 0.25] [--work-dir DIR] [--no-ingest]

Data: ``--n`` demo images (``make_demo_data``, seed 0, 2 workers; drawn once and kept under
``--work-dir/demo`` for the next run) are ingested once as ``street``, as loose blobs (one object
per item, so that a fault placed after a share of the items still finds requests to hit; packed,
a few range requests fetch the whole dataset ahead), into a SeaweedFS of this script's own
(``tests.support.faulty_server.FaultyServer``: the server is killed -9, restarted on the same
port with the same data, SIGSTOPped and SIGCONTed). Every reader uses
``cache=BlobCache(memory_budget=1)``, so every item is fetched from the server during the fault.

Scenarios, in order (the fault is injected once ``--fault-at`` of the items have been delivered;
ingest faults once that share of the blobs is uploaded):

* ``clean``: ``for item in ds`` with no fault: the reference checksum and throughput.
* ``iter kill``: ``for item in ds``, server killed -9, restarted ``--restart-s`` later.
* ``iter stall short``: SIGSTOP for ``--short-stall-s`` (within the deadline).
* ``iter stall long``: SIGSTOP for ``--long-stall-s`` with ``retry_deadline=--deadline-s``:
  must raise ``StoreUnavailable`` instead of hanging (the issue saw a 150 s SIGSTOP hang a
  reader). The defaults (60 s stall, 30 s deadline, 10 s request timeout) keep a full run under
  ~10 minutes. One call gives up ``request_timeout + deadline`` (plus up to one more timeout)
  after the stall starts, but the iterator raises only once the fetches already running on its
  thread pool have ended, and a fetch thread that gave up first may have started another item
  with a fresh deadline: measured, the raise came 81 s after a 150 s SIGSTOP under a 30 s
  deadline, and with the 60 s default stall it comes when the stall ends (``fault→raise``).
  ``--deadline-s 120 --request-timeout-s 30 --long-stall-s 400`` tries the production policy.
* ``dataloader kill``: ``DataLoader(ds.to_pytorch(), num_workers=2)``, kill -9 and restart.
* ``ray kill``: ``ds.to_ray().iter_rows()``, kill -9 and restart.
* ``ingest kill``: kill -9 during the upload stage of a new ingest, restart: the ingest must
  commit the whole version (read back and checksummed).
* ``ingest dead``: kill -9 during the upload stage, no restart until the ingest returns, with
  ``retry_deadline=--deadline-s``: must end with one ``StoreUnavailable`` and no version.

Every scenario but the long stall and the dead ingest runs under the default 120 s deadline; all
use ``request_timeout=--request-timeout-s`` (a SIGSTOPped server turns into timed-out requests).

Per scenario: items expected, delivered (distinct), duplicates, skipped (``ds.skipped``); retries,
recovered calls, calls that gave up and the longest outage one call waited out (``retry_stats()``
of this process; for the DataLoader the sum of its two workers' counters, which each worker sends
back after its last item; for Ray, whose fetches run in Ray actors, only the wall time); items
delivered while the server was down (prefetched before the fault); seconds from the server being
back (restarted or SIGCONTed) to the next item delivered (ingest: to the version committed); wall
time; the exception (class and first line; behind Ray's or the DataLoader's wrapper, the
orchestrator error it carries) and "zero lost": no duplicate, nothing skipped, and either every
item delivered with the same data checksum as the clean run, or ``StoreUnavailable`` raised. The
data checksum is sha256 over the sorted ``(id, sha256(shape, pixels))`` of the delivered items.
"as expected" says whether the outcome (all delivered / raised) is the one the scenario calls for.

Last, the cost of verifying sha256 on read (``BlobStore.get``): ``hashlib.sha256`` of the demo
JPEG bytes against ``orchestrator.stream.decode.decode_image`` of the same bytes, per item.

Figures are printed, not asserted: the SeaweedFS server, Ray and the reader share this machine's
cores. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Our own Ray (never a cluster another process runs here): set before ray is imported anywhere.
RAY_TMP = tempfile.mkdtemp(prefix="rflt-", dir="/tmp")
os.environ.update(RAY_TMPDIR=RAY_TMP, RAY_USAGE_STATS_ENABLED="0", RAY_DATA_DISABLE_PROGRESS_BARS="1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # the driver's core worker's C++ notices
os.environ.pop("RAY_ADDRESS", None)

import numpy as np  # noqa: E402

import orchestrator  # noqa: E402
from orchestrator.errors import DatasetNotFound, StoreUnavailable  # noqa: E402
from orchestrator.retry import retry_stats  # noqa: E402
from orchestrator.store_location import S3_COMPAT_ENV, S3Credentials  # noqa: E402
from orchestrator.stream.cache import BlobCache  # noqa: E402
from tests.support.faulty_server import KEY, SECRET, FaultyServer  # noqa: E402

DATASET = "street"


# -- what arrived -------------------------------------------------------------------------------
class Delivery:
    """Items as they arrive: a digest per distinct id, duplicates, arrival times."""

    def __init__(self) -> None:
        self.digests: dict[str, str] = {}
        self.duplicates = 0
        self.times: list[float] = []

    def add(self, item_id: str, image: Any) -> None:
        now = time.monotonic()
        arr = np.ascontiguousarray(np.asarray(image))
        h = hashlib.sha256(f"{item_id}|{arr.shape}|{arr.dtype}|".encode())
        h.update(arr.tobytes())
        if item_id in self.digests:
            self.duplicates += 1
        self.digests[item_id] = h.hexdigest()
        self.times.append(now)

    def checksum(self) -> str:
        lines = "\n".join(f"{k} {v}" for k, v in sorted(self.digests.items()))
        return hashlib.sha256(lines.encode()).hexdigest()


@dataclass
class Outcome:
    scenario: str
    fault: str
    expected: int
    expect: str  # "all" (every item / the whole version) or "raise" (StoreUnavailable)
    delivered: int = 0
    duplicates: int = 0
    skipped: int = 0
    retries: int | None = None
    recovered: int | None = None
    gave_up: int | None = None
    longest_outage_s: float | None = None
    during_outage: int | None = None
    back_to_first_s: float | None = None
    fault_to_raise_s: float | None = None
    wall_s: float = 0.0
    exception: str | None = None
    store_unavailable: bool = False
    checksum_ok: bool | None = None
    fault_injected: bool = False
    zero_lost: bool = False
    as_expected: bool = False
    notes: list[str] = field(default_factory=list)

    def judge(self, all_delivered: bool) -> None:
        clean = self.duplicates == 0 and self.skipped == 0
        self.zero_lost = clean and ((all_delivered and self.checksum_ok is True) or self.store_unavailable)
        outcome = "all" if all_delivered and self.exception is None else "raise" if self.store_unavailable else "other"
        self.as_expected = self.zero_lost and outcome == self.expect and (self.fault_injected or self.expect == "all")
        if not self.fault_injected and self.fault != "none":
            self.notes.append("the fault was never injected: this scenario proved nothing")
            self.as_expected = False


def describe(exc: BaseException) -> tuple[str, bool]:
    """'Class: first line' of the error (the orchestrator error behind a Ray or DataLoader
    wrapper when there is one), and whether it is StoreUnavailable."""
    from orchestrator.ray_runtime import orchestrator_error_in

    inner = orchestrator_error_in(exc)
    shown = inner if inner is not None else exc
    text = str(getattr(shown, "message", None) or shown).strip()
    line = text.splitlines()[0] if text else ""
    label = f"{type(shown).__name__}: {line[:240]}"
    if inner is not None and inner is not exc:
        label += f" (raised as {type(exc).__name__})"
    return label, isinstance(inner, StoreUnavailable)


class Hung(Exception):
    """A scenario ran past --scenario-timeout-s (raised in the main thread by SIGALRM)."""


def _alarm(signum, frame):  # noqa: ARG001
    raise Hung("the scenario ran past --scenario-timeout-s: a reader hangs")


# -- the bench ----------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace, faulty: FaultyServer, demo: Path) -> None:
        self.args = args
        self.faulty = faulty
        self.demo = demo
        self.prefix = uuid.uuid4().hex[:10]
        self.expected_ids: list[str] = []
        self.clean_checksum: str | None = None

    def store(self, **options: float) -> orchestrator.Store:
        creds = S3Credentials(access_key=KEY, secret_key=SECRET, endpoint_url=self.faulty.server.endpoint_url)
        return orchestrator.connect(self.faulty.uri(self.prefix, **options), credentials=creds)

    def dataset(self, name: str = DATASET, **options: float) -> orchestrator.Dataset:
        """A fresh reader with no cache to speak of: every item comes from the server."""
        options.setdefault("request_timeout", self.args.request_timeout_s)
        return self.store(**options).dataset(name, cache=BlobCache(memory_budget=1))

    @property
    def fault_at(self) -> int:
        return max(1, int(self.args.n * self.args.fault_at))

    def inject(self, fault: str) -> Callable[[], None]:
        a = self.args
        if fault == "kill":
            return lambda: self.faulty.kill_and_restart_after(a.restart_s)
        if fault == "stall short":
            return lambda: self.faulty.stall_for(a.short_stall_s)
        if fault == "stall long":
            return lambda: self.faulty.stall_for(a.long_stall_s)
        raise ValueError(fault)

    # -- read scenarios -------------------------------------------------------------------------
    def read(self, scenario: str, path: str, fault: str, *, expect: str = "all",
             **options: float) -> Outcome:
        ds = self.dataset(**options)
        out = Outcome(scenario, fault, len(self.expected_ids), expect)
        inject = self.inject(fault) if fault != "none" else None
        items, worker_stats = self._items(ds, path)
        events_before = len(self.faulty.events)
        retry_stats().reset()  # this process's counters are this scenario's
        delivery = Delivery()
        raised_at = None
        started = time.monotonic()
        signal.alarm(int(self.args.scenario_timeout_s))
        try:
            for i, (item_id, image) in enumerate(items):
                delivery.add(item_id, image)
                if inject is not None and i == self.fault_at:
                    inject()
                    out.fault_injected = True
        except Exception as exc:  # recorded, not raised: the table shows it
            raised_at = time.monotonic()
            out.exception, out.store_unavailable = describe(exc)
        finally:
            signal.alarm(0)
        out.wall_s = time.monotonic() - started
        self.faulty.wait_idle(timeout=max(self.args.restart_s, self.args.long_stall_s) + 120)
        events = self.faulty.events[events_before:]
        self._timing(out, delivery, events, raised_at)
        if path == "ray":
            out.notes.append("retries happen in Ray actors: not counted here")
        elif path == "dataloader":
            self._counts(out, _sum_stats(worker_stats))
            if len(worker_stats) < 2:
                out.notes.append(f"retry counters from {len(worker_stats)} of 2 workers "
                                 "(a worker that raised sends none)")
        else:
            self._counts(out, retry_stats().as_dict())
        out.delivered = len(delivery.digests)
        out.duplicates = delivery.duplicates
        out.skipped = ds.skipped
        all_delivered = sorted(delivery.digests) == self.expected_ids
        if set(delivery.digests) - set(self.expected_ids):
            out.notes.append("items that are not in the dataset were delivered")
        if all_delivered and self.clean_checksum is not None:
            out.checksum_ok = delivery.checksum() == self.clean_checksum
        if scenario == "clean":
            self.clean_checksum = delivery.checksum()
            out.checksum_ok = all_delivered
            out.notes.append(f"{out.delivered / out.wall_s:.0f} items/s")
        out.judge(all_delivered)
        return out

    def _items(self, ds, path: str) -> tuple[Iterator[tuple[str, Any]], list[dict]]:
        """(id, image) pairs from one read path; the DataLoader's workers' retry counters
        are appended to the list as they arrive."""
        worker_stats: list[dict] = []
        if path == "iteration":
            return ((item["id"], item["image"]) for item in ds), worker_stats
        if path == "ray":
            return ((row["id"], row["image"]) for row in ds.to_ray().iter_rows()), worker_stats
        if path == "dataloader":
            from torch.utils.data import DataLoader

            loader = DataLoader(_with_worker_stats(ds.to_pytorch()), batch_size=1, num_workers=2,
                                collate_fn=_first)

            def pairs() -> Iterator[tuple[str, Any]]:
                for item in loader:
                    if "__retry_stats__" in item:
                        worker_stats.append(item["__retry_stats__"])
                        continue
                    yield item["id"], item["image"].numpy()

            return pairs(), worker_stats
        raise ValueError(path)

    @staticmethod
    def _counts(out: Outcome, stats: dict) -> None:
        out.retries, out.recovered, out.gave_up = (int(stats[k]) for k in ("retries", "recovered", "gave_up"))
        out.longest_outage_s = stats["longest_outage_s"]

    @staticmethod
    def _timing(out: Outcome, delivery: Delivery, events: list[tuple[str, float]],
                raised_at: float | None) -> None:
        down = next((t for e, t in events if e in ("killed", "stopped")), None)
        back = next((t for e, t in events if e in ("up", "continued")), None)
        if down is not None and raised_at is not None:
            out.fault_to_raise_s = raised_at - down
        if down is None or back is None:
            return
        out.during_outage = sum(1 for t in delivery.times if down < t < back)
        after = [t for t in delivery.times if t >= back]
        if after:
            out.back_to_first_s = after[0] - back

    # -- ingest scenarios -----------------------------------------------------------------------
    def ingest(self, scenario: str, *, restart: bool) -> Outcome:
        """A new dataset ingested from the demo folder; the server killed -9 once a share of
        its blobs is uploaded, then restarted ``--restart-s`` later or (``restart=False``) only
        after the ingest has returned."""
        a = self.args
        name = "street_" + scenario.replace(" ", "_")
        options: dict[str, float] = {"request_timeout": a.request_timeout_s}
        if not restart:
            options["retry_deadline"] = a.deadline_s
        store = self.store(**options)
        out = Outcome(scenario, "kill" if restart else "kill, no restart", len(self.expected_ids),
                      "all" if restart else "raise")
        watcher = _KillWhenUploaded(self.faulty, store, name, self.fault_at,
                                    a.restart_s if restart else None)
        events_before = len(self.faulty.events)
        retry_stats().reset()
        report = None
        started = time.monotonic()
        watcher.start()
        signal.alarm(int(a.scenario_timeout_s))
        try:
            # Loose: the fault lands once a share of the blobs is stored (one object per item).
            report = store.ingest(name, coco=self.demo / "annotations.json", images=self.demo / "images",
                                  pack=False)
        except Exception as exc:
            out.exception, out.store_unavailable = describe(exc)
        finally:
            signal.alarm(0)
            ended = time.monotonic()
            watcher.stop()
        out.wall_s = ended - started
        out.fault_injected = watcher.fired
        if watcher.fired and out.exception is not None:
            out.fault_to_raise_s = ended - watcher.fired_at
        self._counts(out, retry_stats().as_dict())
        out.notes.append("retries counted in the driver only (uploads run in Ray tasks)")
        if not restart and watcher.fired:
            self.faulty.restart_after(0)
        self.faulty.wait_idle(timeout=a.restart_s + 120)
        back = next((t for e, t in self.faulty.events[events_before:] if e == "up"), None)
        if restart and back is not None and report is not None:
            out.back_to_first_s = ended - back  # for ingest: server back -> version committed
        versions = self._versions(name)
        all_delivered = False
        if report is not None and report.committed:
            out.notes.append(f"committed version {report.version} with {report.items} items; "
                             f"{report.blobs_uploaded} blobs uploaded, {report.blobs_reused} re-used")
        if versions:
            ds = self.dataset(name)
            delivery = Delivery()
            for item in ds:
                delivery.add(item["id"], item["image"])
            out.delivered = len(delivery.digests)
            out.duplicates = delivery.duplicates
            out.skipped = ds.skipped
            all_delivered = sorted(delivery.digests) == self.expected_ids
            out.checksum_ok = all_delivered and delivery.checksum() == self.clean_checksum
            out.notes.append(f"versions now: {versions} (read back: {out.delivered} items)")
            if not restart:
                out.notes.append("a version was committed although the store was dead")
        else:
            out.notes.append("no version committed")
        out.judge(all_delivered)
        if not restart:  # dead: zero lost means raised and nothing committed
            out.zero_lost = out.store_unavailable and not versions
            out.as_expected = out.zero_lost and out.fault_injected
        return out

    def _versions(self, name: str) -> list[int]:
        try:
            return [v.version for v in self.store().versions(name)]
        except DatasetNotFound:
            return []


class _KillWhenUploaded(threading.Thread):
    """Polls the dataset's blob folder; once ``min_blobs`` are stored, kill -9 the server (and
    schedule its restart ``restart_s`` later, unless None)."""

    def __init__(self, faulty: FaultyServer, store: orchestrator.Store, name: str, min_blobs: int,
                 restart_s: float | None) -> None:
        super().__init__(name="kill-when-uploaded", daemon=True)
        self.faulty, self.store, self.name = faulty, store, name
        self.min_blobs, self.restart_s = min_blobs, restart_s
        self.fired = False
        self.fired_at = 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        import pyarrow.fs as pafs

        from orchestrator.store_location import filesystem_for

        fs = filesystem_for(self.store.location)
        folder = self.store.location.join("datasets", self.name, "blobs")
        while not self._stop_event.wait(0.25):
            try:
                infos = fs.get_file_info(pafs.FileSelector(folder, recursive=True, allow_not_found=True))
            except OSError:
                continue
            if sum(1 for i in infos if i.type == pafs.FileType.File) >= self.min_blobs:
                self.fired_at = time.monotonic()
                if self.restart_s is None:
                    self.faulty.kill()
                else:
                    self.faulty.kill_and_restart_after(self.restart_s)
                self.fired = True
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)


def _first(batch: list) -> Any:
    return batch[0]


def _with_worker_stats(inner: Any) -> Any:
    """``inner`` (a torch IterableDataset) followed, in each DataLoader worker, by one record of
    that worker's retry counters (a worker is a forked process: its counters are its own)."""
    from torch.utils.data import IterableDataset

    class WithWorkerStats(IterableDataset):
        def __iter__(self):
            retry_stats().reset()  # the fork copied the parent's counters
            yield from inner
            yield {"__retry_stats__": retry_stats().as_dict()}

    return WithWorkerStats()


def _sum_stats(stats: list[dict]) -> dict:
    return {"retries": sum(s["retries"] for s in stats), "recovered": sum(s["recovered"] for s in stats),
            "gave_up": sum(s["gave_up"] for s in stats),
            "longest_outage_s": max((s["longest_outage_s"] for s in stats), default=0.0)}


# -- sha256 vs decode ---------------------------------------------------------------------------
def sha256_cost(images: Path, sample: int) -> dict:
    """Per-item cost of sha256 over the JPEG bytes vs decoding them (best of a few passes)."""
    from orchestrator.stream.decode import decode_image

    files = sorted(images.iterdir())[:sample]
    blobs = [f.read_bytes() for f in files]

    def best(fn: Callable[[bytes], Any], passes: int) -> float:
        times = []
        for _ in range(passes):
            t0 = time.perf_counter()
            for b in blobs:
                fn(b)
            times.append(time.perf_counter() - t0)
        return min(times)

    sha = best(lambda b: hashlib.sha256(b).digest(), 5)
    dec = best(decode_image, 3)
    nbytes = sum(len(b) for b in blobs)
    return {"items": len(blobs), "mean_jpeg_kb": round(nbytes / len(blobs) / 1e3, 1),
            "sha256_us_per_item": round(sha / len(blobs) * 1e6, 1),
            "decode_us_per_item": round(dec / len(blobs) * 1e6, 1),
            "sha256_mb_per_s": round(nbytes / sha / 1e6), "sha256_pct_of_decode": round(100 * sha / dec, 2)}


# -- driver -------------------------------------------------------------------------------------
def prepare_demo(work: Path, n: int) -> Path:
    """``work/demo-<n>`` with ``n`` demo images (seed 0), drawn once and reused."""
    from orchestrator.dev.demo import make_demo_data

    demo = work / f"demo-{n}"
    marker = demo / "drawn.json"
    if marker.exists():
        print(f"reusing {n:,} demo images in {demo}", flush=True)
        return demo
    print(f"drawing {n:,} demo images (2 workers) into {demo} ...", flush=True)
    t0 = time.perf_counter()
    make_demo_data(demo, n, 0, workers=2)
    marker.write_text(json.dumps({"n": n, "seed": 0}))
    print(f"drew {n:,} demo images in {time.perf_counter() - t0:.1f} s", flush=True)
    return demo


def start_ray() -> None:
    """A local Ray of our own (address="local"), quiet: ensure_ray() then reuses it."""
    import ray
    import ray.data

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, runtime_env={"env_vars": dict(S3_COMPAT_ENV)})
    ray.data.DataContext.get_current().enable_progress_bars = False
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


def fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def print_table(results: list[Outcome]) -> None:
    cols = [("scenario", 18), ("fault", 16), ("expect", 6), ("delivered", 11), ("dup", 4),
            ("skip", 4), ("retries", 7), ("recov", 5), ("gave up", 7), ("in outage", 9),
            ("back→next s", 11), ("fault→raise s", 13), ("wall s", 7), ("exception", 28), ("zero lost", 9),
            ("as expected", 11)]
    header = " ".join(f"{c:<{w}}" for c, w in cols)
    print(header)
    print("-" * len(header))
    for r in results:
        exc = "none" if r.exception is None else r.exception.split(":", 1)[0]
        cells = [r.scenario, r.fault, r.expect, f"{r.delivered}/{r.expected}", str(r.duplicates),
                 str(r.skipped), fmt(r.retries), fmt(r.recovered), fmt(r.gave_up), fmt(r.during_outage),
                 fmt(r.back_to_first_s, ".1f"), fmt(r.fault_to_raise_s, ".1f"), f"{r.wall_s:.1f}", exc[:28],
                 "PASS" if r.zero_lost else "FAIL", "yes" if r.as_expected else "NO"]
        print(" ".join(f"{c:<{w}}" for c, (_, w) in zip(cells, cols)))
    print()
    for r in results:
        lines = ([f"exception: {r.exception}"] if r.exception else []) + r.notes
        if r.longest_outage_s:
            lines.append(f"longest outage one call waited out: {r.longest_outage_s:.1f} s")
        if lines:
            print(f"{r.scenario}:")
            for line in lines:
                print(f"  {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="items (default: %(default)s)")
    parser.add_argument("--restart-s", type=float, default=20.0,
                        help="seconds between kill -9 and restart (default: %(default)s)")
    parser.add_argument("--short-stall-s", type=float, default=10.0,
                        help="SIGSTOP within the deadline (default: %(default)s)")
    parser.add_argument("--long-stall-s", type=float, default=60.0,
                        help="SIGSTOP past the deadline (default: %(default)s)")
    parser.add_argument("--deadline-s", type=float, default=30.0,
                        help="retry_deadline of the long-stall and dead-ingest scenarios "
                             "(the others run under the default, 120 s; default: %(default)s)")
    parser.add_argument("--request-timeout-s", type=float, default=10.0,
                        help="request_timeout of every scenario (default: %(default)s)")
    parser.add_argument("--fault-at", type=float, default=0.25,
                        help="share of items delivered (or blobs uploaded) when the fault hits")
    parser.add_argument("--scenario-timeout-s", type=float, default=420.0,
                        help="a scenario running longer is reported as hung (default: %(default)s)")
    parser.add_argument("--sha-sample", type=int, default=500, help="images timed for sha256 vs decode")
    parser.add_argument("--no-ingest", action="store_true", help="skip the two ingest scenarios")
    parser.add_argument("--only", help="comma list of scenarios to run (e.g. 'clean,iter stall long')")
    parser.add_argument("--work-dir", type=Path, help="keep demo images here (default: a temp dir)")
    parser.add_argument("--verbose", action="store_true", help="show the retry warnings")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    if not args.verbose:  # one warning per retried call at the first attempt: hundreds per fault
        logging.getLogger("orchestrator.retry").setLevel(logging.ERROR)
    signal.signal(signal.SIGALRM, _alarm)
    # The torch adapter wraps the reader's read-only arrays (once per DataLoader worker).
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

    temp_work = args.work_dir is None
    work = (args.work_dir or Path(tempfile.mkdtemp(prefix="bench-faults-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    seaweed = work / f"seaweed-{uuid.uuid4().hex[:8]}"
    results: list[Outcome] = []
    cost: dict | None = None
    faulty = None
    try:
        demo = prepare_demo(work, args.n)
        start_ray()
        faulty = FaultyServer(seaweed).start()
        os.environ.update(faulty.env())
        print(f"SeaweedFS on {faulty.server.endpoint_url}; work dir {work}", flush=True)
        bench = Bench(args, faulty, demo)
        t0 = time.perf_counter()
        # Loose: each read scenario puts its fault after a share of the items, which needs one
        # request per item (packed, a few range requests fetch the whole dataset ahead).
        report = bench.store().ingest(DATASET, coco=demo / "annotations.json", images=demo / "images",
                                      pack=False)
        print(f"ingested {report.items:,} items in {time.perf_counter() - t0:.1f} s", flush=True)
        bench.expected_ids = sorted(bench.store().dataset(DATASET).item_ids())

        plan: list[tuple[str, Callable[[], Outcome]]] = [
            ("clean", lambda: bench.read("clean", "iteration", "none")),
            ("iter kill", lambda: bench.read("iter kill", "iteration", "kill")),
            ("iter stall short", lambda: bench.read("iter stall short", "iteration", "stall short")),
            ("iter stall long", lambda: bench.read("iter stall long", "iteration", "stall long",
                                                   expect="raise", retry_deadline=args.deadline_s)),
            ("dataloader kill", lambda: bench.read("dataloader kill", "dataloader", "kill")),
            ("ray kill", lambda: bench.read("ray kill", "ray", "kill")),
        ]
        if not args.no_ingest:  # last: the ingest path's retries are the newest code
            plan += [("ingest kill", lambda: bench.ingest("ingest kill", restart=True)),
                     ("ingest dead", lambda: bench.ingest("ingest dead", restart=False))]
        if args.only:
            wanted = {w.strip() for w in args.only.split(",")}
            plan = [(label, run) for label, run in plan if label in wanted or label == "clean"]
        for label, run in plan:
            print(f"{label} ...", flush=True)
            try:
                out = run()
            except Exception as exc:  # the bench itself failed (server would not restart, ...)
                out = Outcome(label, "?", len(bench.expected_ids), "?",
                              exception=f"benchmark error: {exc!r}"[:300])
            results.append(out)
            verdict = "zero lost" if out.zero_lost else "ITEMS LOST OR WRONG"
            print(f"  {out.delivered}/{out.expected} delivered, {out.skipped} skipped, "
                  f"{out.wall_s:.1f} s, {out.exception or 'no exception'}: {verdict}", flush=True)
        print("sha256 vs decode ...", flush=True)
        cost = sha256_cost(demo / "images", args.sha_sample)
    finally:
        if faulty is not None:
            try:
                faulty.stop()
            except Exception as exc:  # a server already down: nothing to stop
                print(f"stopping SeaweedFS: {exc!r}", flush=True)
        shutil.rmtree(seaweed, ignore_errors=True)
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if temp_work:
            shutil.rmtree(work, ignore_errors=True)

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(f"\n{args.n:,} demo items, SeaweedFS on loopback, BlobCache(memory_budget=1); "
          f"kill -9 / SIGSTOP after {args.fault_at:.0%} of the items (ingest: of the blobs); "
          f"restart after {args.restart_s:.0f} s; stalls {args.short_stall_s:.0f} s (120 s deadline) and "
          f"{args.long_stall_s:.0f} s ({args.deadline_s:.0f} s deadline); request timeout "
          f"{args.request_timeout_s:.0f} s; {os.cpu_count()} cores\n")
    print_table(results)
    if cost:
        print(f"\nsha256 on read: {cost['sha256_us_per_item']:.0f} µs per item ({cost['sha256_mb_per_s']} MB/s) "
              f"vs decode {cost['decode_us_per_item']:.0f} µs: {cost['sha256_pct_of_decode']:.1f}% of decode "
              f"({cost['items']} demo JPEGs, mean {cost['mean_jpeg_kb']} kB)")
    print(json.dumps({"settings": settings, "scenarios": [asdict(r) for r in results], "sha256": cost}))


if __name__ == "__main__":
    try:
        main()
    finally:
        shutil.rmtree(RAY_TMP, ignore_errors=True)
