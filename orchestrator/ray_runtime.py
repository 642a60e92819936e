"""Attach to Ray: the running cluster if there is one, else a local one sized for this machine.

A local cluster gets more logical CPUs than cores: Ray Data stages and Ray Train workers each
reserve CPUs, and on a 2-core laptop an exact count lets train workers starve the data stages.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.errors import OrchestratorError

log = logging.getLogger(__name__)

#: Set when this process started its own local cluster (``ensure_ray``), not attached to one.
_STARTED_LOCAL = threading.Event()
#: Read tasks at once on a cluster this process attached to (``StreamOptions.ray_fetch_actors``).
ATTACHED_READ_CONCURRENCY = 8


def local_cpus() -> int:
    """Logical CPUs for a local cluster: ``ORCHESTRATOR_RAY_CPUS`` or four times the cores
    (min 8): room for the train workers and every data stage at once."""
    env = os.environ.get("ORCHESTRATOR_RAY_CPUS")
    if env:
        return max(1, int(env))
    return max(8, 4 * (os.cpu_count() or 1))


#: Object-store bytes a local cluster gets per read task its pipelines run at once.
OBJECT_STORE_PER_READ_SLOT = 512 * 2**20


def local_object_store_bytes() -> int:
    """The object store of a local cluster: ``ORCHESTRATOR_RAY_OBJECT_STORE_MB``, else 512 MiB
    per concurrent read task (``max(2, cores)``; 1 GiB on 2 cores), never more than Ray's own
    default (30% of the machine's memory).

    Why not Ray's default (7 GB on a 23 GB laptop): a streaming pipeline holds a few blocks per
    read task (a 512-item block of full-size images is ~180 MB); the rest of a big store is only
    ever touched, page by page, as blocks land in new places, and every Ray process counts each
    store page it touched in its RSS for good. Measured (``benchmarks/peers.py --systems ours-ray
    --epochs 5``, 3,000 full-size images, 2 cores): summed peak RSS grew +14.7% across four warm
    epochs with the default store and +4.1% with 1 GiB (PSS +7.3% against +1.9%), same items/s
    cold and warm; at 512 MiB Ray spilled blocks to disk and warm epochs fell from ~1,500 to
    ~1,070 items/s."""
    env = os.environ.get("ORCHESTRATOR_RAY_OBJECT_STORE_MB")
    if env:
        try:
            mb = int(env)
        except ValueError:
            mb = 0
        if mb < 80:  # Ray's own floor is 75 MB
            from orchestrator.errors import OrchestratorError

            raise OrchestratorError(f"ORCHESTRATOR_RAY_OBJECT_STORE_MB={env!r} is not a size in MB of at least 80",
                                    hint="set it to a whole number of MB, e.g. 2048, or unset it")
        return mb * 2**20
    from ray._common.utils import get_system_memory
    from ray._private import ray_constants

    from orchestrator.machine import usable_cores

    want = max(2, usable_cores()) * OBJECT_STORE_PER_READ_SLOT
    ray_default = min(int(ray_constants.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION * get_system_memory()),
                      ray_constants.DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES)
    return min(want, ray_default)


def running_cluster_address() -> tuple[str | None, bool]:
    """The cluster to attach to: ``RAY_ADDRESS`` (explicit), else the one ``ray start --head``
    recorded on this machine; (None, False) if neither. Deliberately not Ray's ``"auto"``
    process scan, which attaches to any Ray process it finds, another user's private or
    simulated cluster included."""
    explicit = os.environ.get("RAY_ADDRESS")
    if explicit:
        return explicit, True
    return _recorded_address(), False


def _recorded_address() -> str | None:
    from ray._private.utils import read_ray_address

    return read_ray_address()


#: Variables Ray Train (V2) puts in the runtime environment of its controller, and so of its
#: workers: ``ENV_VARS_TO_PROPAGATE`` in ``ray.train.v2._internal.constants`` (Ray 2.60), each
#: when set in the driver's environment, and ``RAY_WARN_BLOCKING_GET_INSIDE_ASYNC`` ("0" unless set).
TRAIN_PROPAGATED_ENV = (
    "RAY_TRAIN_V2_ENABLED", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "RAY_TRAIN_COLLECTIVE_TIMEOUT_S",
    "RAY_TRAIN_COLLECTIVE_WARN_INTERVAL_S", "RAY_TRAIN_CHECKPOINT_UPLOAD_WARN_INTERVAL_S",
    "RAY_TRAIN_ENABLE_PRINT_PATCH", "RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING",
    "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING", "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION",
    "RAY_TRAIN_STATE_ACTOR_RECONCILIATION_INTERVAL_S", "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC",
    "TORCHFT_LIGHTHOUSE", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S",
    "NCCL_RAS_ADDR",
)
TRAIN_ENV_DEFAULTS = {"RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0"}


def task_env() -> dict:
    """The runtime environment our read tasks (and ``warm_up``'s) ask for: the variables Ray
    Train adds for its controller and workers (``TRAIN_PROPAGATED_ENV``), on top of the job's.

    Why: a task inherits its caller's runtime environment and runs only in a worker process
    started for exactly that environment (Ray compares the serialized text). A train worker's
    environment is the job's plus Train's variables, so read tasks submitted by a train
    worker's pipeline could use none of the job's warm workers: epoch 1's first batch of the
    first Ray Train run waited for new worker processes (5.9-8.6 s after ``iter_batches``, 2
    cores). Asked for explicitly, the same variables give the same environment text wherever
    the task is submitted (the driver, Train's dataset actor, a train worker), so all read
    tasks and the warm-up share one pool of workers."""
    env = {name: os.environ[name] for name in TRAIN_PROPAGATED_ENV if name in os.environ}
    for name, value in TRAIN_ENV_DEFAULTS.items():
        env.setdefault(name, value)
    return {"env_vars": env}


def _job_env() -> dict:
    """The job's runtime environment: this process's S3 variables (or their defaults)."""
    from orchestrator.store_location import S3_COMPAT_ENV

    return {"env_vars": {k: os.environ.get(k, v) for k, v in S3_COMPAT_ENV.items()}}


#: Ray's loggers whose INFO and WARNING lines (cluster start, token-auth notice, Ray Data's
#: execution plans and progress blocks every few seconds) are hidden unless this process logs INFO.
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.air", "ray.util")


def ray_log_level() -> int:
    """The level for Ray's own loggers: INFO when this process logs INFO (the CLI's ``-v``, or a
    library user's logging config), else ERROR: errors always show, chatter never."""
    return logging.INFO if logging.getLogger().isEnabledFor(logging.INFO) else logging.ERROR


def quiet_ray_logs() -> int:
    """Apply ``ray_log_level`` to Ray's loggers now (again after ``ray.init``, which sets its
    own); returns the level. Ray Data's logger keeps writing everything to its session log file
    (``.../logs/ray-data/ray-data.log``): only its console handler is turned down."""
    import ray.data  # noqa: F401 - its import configures the ray.data logger, which is undone here
    from ray.data._internal.logging import SessionFileHandler

    level = ray_log_level()
    for name in RAY_LOGGERS:
        if name == "ray.data":
            for handler in logging.getLogger(name).handlers:
                if not isinstance(handler, SessionFileHandler):
                    handler.setLevel(level)
        else:
            logging.getLogger(name).setLevel(level)
    return level


def ensure_ray(prepare: Callable[[], object] | None = None) -> None:
    """Connect once per process; idempotent: attach to the cluster ``running_cluster_address``
    names, else start a local one (``start_local_ray``, whose warm-up runs ``prepare`` in each
    read worker).

    Token authentication (on by default since Ray 2.52): for the cluster ``ray start`` recorded
    on this machine, this process authenticates with the machine's token as Ray's own
    ``address="auto"`` would (``RAY_AUTH_MODE=token`` when a token exists); Ray never sends it to
    an explicit ``RAY_ADDRESS`` by itself, so there the user sets ``RAY_AUTH_MODE`` (and the
    token), unless that address is the recorded one. A cluster that answers but refuses the
    connection is reported as such, with the fix;
    only one that does not answer at all is "gone" (and, when merely recorded, replaced by a
    local one)."""
    import ray

    from orchestrator.errors import OrchestratorError

    if ray.is_initialized():
        return
    runtime_env = _job_env()
    address, explicit = running_cluster_address()
    if address and not explicit and not _answers(address):
        # A cluster recorded here that is gone: ray.init would retry it for ~20 s first.
        log.info("the Ray cluster recorded at %s does not answer; starting a local one", address)
        address = None
    if address:
        level = quiet_ray_logs()
        if not explicit or address == _recorded_address():  # the cluster `ray start` made here
            _authenticate_like_auto()
        try:
            from orchestrator.optional import native_logs_hidden

            with native_logs_hidden():  # Ray's C++ retry warnings while a connection is refused
                ray.init(address=address, log_to_driver=False, runtime_env=runtime_env, logging_level=level)
            quiet_ray_logs()
            log.info("attached to the Ray cluster at %s", address)
            return
        except (ConnectionError, RuntimeError) as exc:  # Ray's AuthenticationError is a RuntimeError
            where = f"RAY_ADDRESS={address}" if explicit else f"{address} (recorded by `ray start`)"
            if _answers(address):
                raise OrchestratorError(
                    f"the Ray cluster at {where} answers but refused this connection: {_first_line(exc)}",
                    hint=_auth_hint()) from None
            if explicit:
                raise OrchestratorError(
                    f"no Ray cluster answers at {where}: {_first_line(exc)}",
                    hint="start it (`ray start --head`) or unset RAY_ADDRESS to run locally",
                ) from None
            log.info("the Ray cluster recorded at %s does not answer; starting a local one", address)
    start_local_ray(prepare=prepare)


def _auth_hint() -> str:
    import ray

    return ("it uses token authentication (Ray's default): set RAY_AUTH_MODE=token and give this "
            "process the cluster's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, "
            "as `ray start` wrote it on the head node); or it runs another Ray version than this "
            f"process ({ray.__version__})")


def _authenticate_like_auto() -> None:
    """Turn token authentication on for this process when a token exists on this machine and
    RAY_AUTH_MODE is unset: what ``ray.init(address="auto")`` does for the cluster it finds
    here (Ray-internal helper, checked against Ray 2.60; without it, a plain attach retried
    ``InvalidAuthToken`` for 20 s)."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # pragma: no cover - an older or newer Ray: let ray.init decide
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _answers(address: str, timeout: float = 2.0) -> bool:
    """Whether anything accepts a TCP connection at ``host:port`` (a cluster that is up)."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def start_local_ray(wait_warm: bool = False, prepare: Callable[[], object] | None = None) -> None:
    """Start a local Ray cluster for this process (``local_cpus`` logical CPUs, an object store
    of ``local_object_store_bytes``, the S3 variables and the worker setup hook in the job's
    runtime environment), then ``warm_up`` its read workers: in a background thread, or before
    returning with ``wait_warm`` (benchmarks: the first epoch then starts with Ray up).
    ``prepare``: as for ``warm_up`` (a ``to_ray`` pipeline's: ``adapters.ray.arena_warm_up``)."""
    import ray

    runtime_env = _job_env()
    # The raylet lets only "cores" worker processes start at once and warns on the driver's
    # terminal ("N PYTHON worker processes have been started ... 4x the maximum expected startup
    # concurrency") whenever a run's actors outnumber them, which a training run with its data
    # stages always does on a laptop; the local cluster's logical CPU count is the honest bound.
    os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(local_cpus()))
    # Only on a cluster of our own: under `ray job submit` the job's runtime environment is set
    # already, and adding a setup hook to it fails the job's runtime-env setup.
    runtime_env["worker_process_setup_hook"] = "orchestrator.ray_runtime.prepare_worker"
    store_bytes = local_object_store_bytes()
    ray.init(address="local", num_cpus=local_cpus(), object_store_memory=store_bytes,
             include_dashboard=False, log_to_driver=False, runtime_env=runtime_env, logging_level=quiet_ray_logs())
    quiet_ray_logs()
    _STARTED_LOCAL.set()
    log.info("started a local Ray cluster with %d logical CPUs and a %d MiB object store",
             local_cpus(), store_bytes // 2**20)
    if wait_warm:
        warm_up(read_concurrency(), prepare=prepare)
    else:
        warm_up_later(read_concurrency(), prepare=prepare)


def warm_up_later(workers: int, prepare: Callable[[], object] | None = None) -> None:
    """``warm_up(workers, prepare=prepare)`` in a background thread, on a local cluster this
    process started (an attached cluster's workers are its operator's business); returns at once."""
    if _STARTED_LOCAL.is_set():
        threading.Thread(target=warm_up, args=(workers,), kwargs={"prepare": prepare}, name="orchestrator-ray-warm-up",
                         daemon=True).start()


def warm_up_for_training(num_workers: int) -> None:
    """Before a fit on a local cluster this process started: ``warm_up_later`` the read workers
    its pipelines run at once (``num_workers`` train workers, all on this node, each running
    ``read_concurrency()`` read tasks), while Ray Train starts its controller and workers.

    Why: every read task runs in a ``task_env`` worker; with only ``start_local_ray``'s
    ``read_concurrency()`` of them, two train workers' pipelines shared two processes and their
    tasks waited for one (``benchmarks/train_ingest.py``, 2 cores, noisy: pipeline-only Ray Train
    epoch 2 at 318-685 samples/s against 377-934 before ``task_env``, when the first epoch had
    started a process per task). Ray started more for the waiting tasks, but they came up after
    the wait and idle. Measured here: ``warm_up(4)`` with two warm takes ~2 s; Ray Train's own
    start-up takes 8-10 s."""
    warm_up_later(num_workers * read_concurrency())


def read_concurrency() -> int:
    """How many read tasks a pipeline runs at once unless ``ray_fetch_actors`` says: the cores
    (at least 2) on a local cluster this process started, else ``ATTACHED_READ_CONCURRENCY``.

    Why not more on a laptop: each task is the SDK reader with its own fetch and decode threads,
    and each needs a worker process (~1-3 s of CPU to start here). At 8 on 2 cores the first
    epoch through Ray delivered 141-159 items/s with 5-11 s to the first item; at 2, 243-285
    items/s (3,000 items on file://, read workers warm), warm epochs alike."""
    from orchestrator.machine import usable_cores

    if _STARTED_LOCAL.is_set():
        return max(2, usable_cores())
    return ATTACHED_READ_CONCURRENCY


def _hold(seconds: float, map_store: bool = False, prepare: Callable[[], object] | None = None) -> int:
    if map_store:
        map_object_store()
    if prepare is not None:
        prepare()
    time.sleep(seconds)
    return os.getpid()


#: Linux's madvise advice that faults a range in, writable, without touching its contents (5.14+).
MADV_POPULATE_WRITE = 23


def map_object_store() -> int:
    """Map every page of this node's Ray object store into this process now (Linux
    ``MADV_POPULATE_WRITE`` on the store's shared mapping); returns the bytes mapped, 0 where it
    cannot (another OS, an older kernel, no store mapping).

    Why: a Ray process maps the whole store but takes a page fault for each 4 KiB page the first
    time it writes or reads there, and each read worker writes every block (hundreds of MB) into
    pages it has not touched until it has touched the whole store: in a pipeline's first epoch
    that was 260-320k faults and ~1 s of system time in two read workers on 2 cores (3,000
    full-size images), and a process's RSS grew with every epoch as blocks landed in pages it had
    not touched yet. Mapped at start, in one call (~0.2 s a GiB once the pages exist), the first
    epoch's faults fell to ~100k and each process's share of the store is whole from the start.
    The store's memory itself does not change: its pages are shared, counted once by the kernel,
    and the first call allocates all of them (the store's full size, which a streaming epoch of
    full-size images fills anyway). Only on a local cluster this process started, whose store it
    sized (``local_object_store_bytes``); an attached cluster's store can be far bigger.
    ``ORCHESTRATOR_RAY_MAP_STORE=0`` leaves the store to be mapped page by page, as Ray does."""
    import ctypes

    import numpy as np
    import ray

    try:
        ray.put(np.zeros(1 << 20, np.uint8))  # a store object (not inlined): the store is mapped after it
        with open("/proc/self/maps") as f:
            maps = f.read().splitlines()
        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, AttributeError, TypeError):  # no /proc (macOS), no CDLL(None) (Windows)
        return 0
    mapped = 0
    for line in maps:
        parts = line.split()
        if len(parts) < 6 or not parts[1].endswith("s") or not os.path.basename(parts[5]).startswith("plasma"):
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_POPULATE_WRITE) == 0:
            mapped += end - start
    return mapped


def warm_up(workers: int, timeout_s: float = 120.0, prepare: Callable[[], object] | None = None) -> int:
    """Start ``workers`` of this job's worker processes (each imports the read path on start:
    ``prepare_worker``) and Ray Data's cluster-wide actors now, so that a pipeline's first
    epoch does not wait for them. ``ensure_ray`` runs it in a background thread after starting
    a local cluster. Returns how many distinct workers answered (best effort: never raises).

    ``prepare``: a picklable callable each warmed worker also runs, once: how a higher layer
    readies the workers for its pipelines without this module importing it (a ``to_ray``
    pipeline's ``adapters.ray.arena_warm_up``, which writes the block arenas).

    Measured before (2 cores, local cluster idle for 15 s after ``ray.init``): the first read
    task started 2.6 s after iteration began (Ray Data's autoscaling coordinator actor was being
    created) and the second worker process only at 7 s."""
    try:
        import ray

        anchor_data_actors()
        map_store = _STARTED_LOCAL.is_set() and os.environ.get("ORCHESTRATOR_RAY_MAP_STORE", "1") != "0"
        if map_store:
            map_object_store()
        hold = ray.remote(num_cpus=0)(_hold).options(runtime_env=task_env())
        seen: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(seen) < workers and time.monotonic() < deadline:
            # Tasks that overlap make Ray start a worker for each; a second round finds them idle.
            seen.update(ray.get([hold.remote(0.5, map_store, prepare) for _ in range(workers)],
                                timeout=max(1.0, deadline - time.monotonic())))
        return len(seen)
    except Exception:  # noqa: BLE001 - a warm-up is an optimisation; the pipeline starts workers itself
        log.debug("Ray warm-up failed", exc_info=True)
        return 0


#: What a worker imports when it starts (``prepare_worker``), before any task reaches it.
WORKER_MODULES = ("ray.data", "orchestrator.adapters.ray")


def prepare_worker() -> None:
    """Ray's ``worker_process_setup_hook``: import the read path while the worker starts.

    A fresh worker spends about a second importing Ray Data, pyarrow's dataset layer and the
    reader; done in its first read task, that second is the first item's wait in a pipeline's
    first epoch. Workers start with the cluster (and the job), so it is paid before anyone
    waits. An import error is left for the task that needs the module to raise."""
    import importlib

    for name in WORKER_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # pragma: no cover - raised again, with context, where it is used
            log.debug("could not pre-import %s", name, exc_info=True)
    freeze_startup_objects()


@functools.cache
def freeze_startup_objects() -> int:
    """Once per process: collect, then move every object alive now (a Ray worker's imports:
    Ray, Ray Data, pyarrow, the reader; over a million objects) out of reach of Python's cyclic
    garbage collector (``gc.freeze``); returns how many. Called by ``prepare_worker`` and by the
    first read task of a worker the setup hook did not prepare (an attached cluster).

    Why: a read task allocates many short-lived objects, so the collector's full collections
    run every few hundred items and each walked all of those imported objects, which never
    become garbage. In a pipeline's first epoch (``perf`` over the whole machine, 3,000 full-size
    images, 2 cores) the read workers spent ~11% of their samples in ``gc_collect_main`` and its
    visitors; frozen, ~3%. ``benchmarks/peers.py --systems ours-ray`` in interleaved pairs
    (3 each): cold epoch 644/811/852 items/s before, 941/876/953 after. Frozen objects are still
    freed by reference counting; only cycles among them would stay (module-level objects do
    not form garbage cycles in practice)."""
    import gc

    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def anchor_data_actors() -> None:
    """Create Ray Data's two cluster-wide detached actors (stats, actor locations) from this
    process, so they live on the driver's node.

    Ray Data creates them on first use, on the node of whichever process uses it first, and they
    never exit. Our train workers run their own pipelines; on a fresh autoscaling cluster that
    would pin them to an added worker node, which then never counts as idle and is never
    removed. Best effort: these are Ray-internal functions (checked against Ray 2.60)."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
        from ray.data._internal.execution.node_trackers.actor_location import (
            get_or_create_actor_location_tracker,
        )
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError:  # pragma: no cover - a Ray version without them
        log.warning("Ray Data internals moved: its stats actors may pin an autoscaled node")
        return
    get_or_create_stats_actor()
    get_or_create_actor_location_tracker()
    get_or_create_autoscaling_coordinator()


_RAISED = re.compile(r"^orchestrator\.errors\.(\w+): (.*?)(?:\n  fix: (.*))?(?:\n  reason: (\w+))?$",
                     re.MULTILINE)


def orchestrator_error_in(exc: BaseException) -> OrchestratorError | None:
    """The orchestrator error behind a failure that crossed Ray (a task, a Ray Data stage, a
    train worker), or None.

    Ray wraps a stage's exception as ``RayTaskError(UserCodeException)`` and keeps the original
    only as traceback text, so a ``StoreUnavailable`` in a fetch actor would reach the user as a
    160-line Ray report. This walks the cause chain and, failing that, reads the last
    ``orchestrator.errors.X: message`` line (and its ``fix:`` line) back into the same class.
    """
    from orchestrator import errors

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, errors.OrchestratorError):
            return current
        current = current.__cause__ or getattr(current, "cause", None)
    matches = list(_RAISED.finditer(str(exc)))
    for match in reversed(matches):
        cls = getattr(errors, match.group(1), None)
        if isinstance(cls, type) and issubclass(cls, errors.OrchestratorError):
            found = cls.__new__(cls)
            errors.OrchestratorError.__init__(found, match.group(2), hint=match.group(3))
            if issubclass(cls, errors.ItemError):
                found.reason = match.group(4) or "unreadable"
            return found
    return None
