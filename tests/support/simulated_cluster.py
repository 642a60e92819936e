"""An autoscaling Ray cluster on one machine, with Ray's fake multi-node node provider.

The head node runs the autoscaler ("monitor") with a ``fake_multinode`` provider: when the
cluster's demand exceeds what it has, the autoscaler "launches" a worker node by starting
another raylet (with the worker type's resources) on this machine, and it terminates that
raylet once the node has been idle for ``idle_timeout_minutes``.

``ray.cluster_utils.AutoscalingCluster`` is not used: it runs ``ray stop --force`` (which kills
every Ray cluster on the machine) and loads an ``example.yaml`` that the wheel does not ship.
``ray.cluster_utils.Cluster`` is not used for the head either: it writes (and on shutdown
deletes) the machine-wide ``/tmp/ray/ray_current_cluster`` file that ``ray.init("auto")``
reads. Here the head runs in its own process (``python -m tests.support.simulated_cluster
head ...``, its own process group) with its own GCS port and its own short temp dir, so other
clusters on the machine (the test session's, other users') are left alone; on exit everything
it started is stopped: the head's processes, and the fake worker nodes (started by the monitor,
found by the cluster's temp dir in their command lines and by the head's process group).

Nothing here calls ``ray.init`` in the calling process; node counts are read from the GCS
in a subprocess (``nodes``/``watch`` sub-commands), which does not connect a driver.

    with autoscaling_cluster(head_cpus=1, worker_types={"cpu_worker": {
            "resources": {"CPU": 4}, "min_workers": 0, "max_workers": 2}},
            idle_timeout_minutes=0.1, tmp_dir=tmp_path) as cluster:
        subprocess.run([...], env=cluster.env)  # os.environ + RAY_ADDRESS=cluster.address
        cluster.nodes(), cluster.worker_count(), cluster.actors(), cluster.watch(path)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HEAD_TYPE = "ray.head.default"  # the fake provider's name for the head node type

# The head's object store, and the default for worker types that set none: small, so that a
# few simulated nodes do not claim most of the machine's memory (/dev/shm).
DEFAULT_OBJECT_STORE_BYTES = 300 * 1024 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ip() -> str:
    import ray._private.services

    return ray._private.services.get_node_ip_address()


def make_config(head_cpus: int, worker_types: dict[str, dict], idle_timeout_minutes: float,
                gcs_address: str, *, upscaling_speed: float = 1.0,
                head_object_store_bytes: int = DEFAULT_OBJECT_STORE_BYTES) -> dict[str, Any]:
    """The autoscaler config: Ray's fake_multi_node/example.yaml (not in the wheel) with the
    given node types. ``provider.gcs_address`` points the fake worker nodes at this cluster's
    GCS (the provider's default is <node ip>:6379, which may be someone else's cluster).

    ``worker_types``: ``{name: {"resources": {"CPU": n, ...}, "min_workers": a,
    "max_workers": b}}``; ``node_config`` is filled in, and ``object_store_memory`` (a
    resource for the fake provider) defaults to a small store."""
    types: dict[str, dict] = {}
    for name, spec in worker_types.items():
        spec = copy.deepcopy(spec)
        if name == HEAD_TYPE:
            raise ValueError(f"{HEAD_TYPE!r} is the head's node type")
        spec.setdefault("node_config", {})
        spec.setdefault("min_workers", 0)
        spec.setdefault("resources", {}).setdefault("object_store_memory", DEFAULT_OBJECT_STORE_BYTES)
        types[name] = spec
    types[HEAD_TYPE] = {"resources": {"CPU": head_cpus, "GPU": 0}, "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": f"fake-{os.getpid()}",
        "max_workers": sum(int(t.get("max_workers", 0)) for t in types.values()),
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            # launch_multiple stays False (the provider's default: one node per launch request,
            # the autoscaler asks again for the rest): with True the v1 autoscaler overshot
            # max_workers by one node (then removed it as "max_workers_per_type").
        },
        "available_node_types": types,
        "head_node_type": HEAD_TYPE,
        "auth": {},
        "upscaling_speed": upscaling_speed,
        "idle_timeout_minutes": idle_timeout_minutes,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


@dataclass
class SimulatedCluster:
    address: str  # GCS address, for RAY_ADDRESS / ray.init(address=...)
    temp_dir: Path  # the cluster's Ray temp dir (sessions, logs, sockets)
    config_path: Path
    config: dict[str, Any]
    head_pid: int
    env: dict[str, str] = field(default_factory=dict)  # os.environ with RAY_ADDRESS set

    def _query(self, what: str, timeout: float) -> list[dict]:
        r = subprocess.run([sys.executable, "-m", "tests.support.simulated_cluster", what,
                            self.address], check=False, capture_output=True, text=True, timeout=timeout,
                           cwd=REPO, env=_clean_env())
        if r.returncode != 0:
            raise RuntimeError(f"reading the {what} failed: {r.stderr[-2000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    def nodes(self, timeout: float = 60) -> list[dict]:
        """Alive nodes, read from the GCS in a subprocess (see ``alive_nodes``)."""
        return self._query("nodes", timeout)

    def actors(self, timeout: float = 60) -> list[dict]:
        """Alive actors and their nodes, read from the GCS in a subprocess."""
        return self._query("actors", timeout)

    def worker_count(self) -> int:
        return sum(1 for n in self.nodes() if not n["is_head"])

    def watch(self, out: Path, interval: float = 0.5) -> subprocess.Popen:
        """Start a subprocess that appends one JSON line per poll to ``out``:
        ``{"t": unix time, "workers": alive worker nodes, "nodes": [...]}``. Terminate it when
        done (``proc.terminate()``)."""
        return subprocess.Popen([sys.executable, "-m", "tests.support.simulated_cluster", "watch",
                                 self.address, str(out), "--interval", str(interval)],
                                cwd=REPO, env=_clean_env(), stdout=subprocess.DEVNULL,
                                stderr=open(str(out) + ".err", "w"))

    def monitor_log(self) -> str:
        """The autoscaler's log (launches, terminations, idle nodes), for failure messages."""
        logs = sorted(self.temp_dir.glob("session_*/logs/monitor.log"))
        return "\n".join(p.read_text(errors="replace") for p in logs)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _processes_of(temp_dir: Path, pgid: int | None) -> list[int]:
    """PIDs (not ours) whose command line names ``temp_dir`` or that are in process group
    ``pgid``: the head's processes and the fake worker nodes'."""
    needle = str(temp_dir).encode()
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            in_group = pgid is not None and os.getpgid(pid) == pgid
        except (OSError, ProcessLookupError):
            continue
        if not cmd:  # zombie / kernel thread
            continue
        if needle in cmd or in_group:
            found.append(pid)
    return found


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _stop_all(temp_dir: Path, pgid: int | None, grace: float = 10.0) -> list[int]:
    """SIGTERM, then SIGKILL after ``grace`` s, every process of the cluster; returns the PIDs
    that were still there for SIGKILL."""
    pids = _processes_of(temp_dir, pgid)
    _kill(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        left = _processes_of(temp_dir, pgid)
        if not left:
            return []
        time.sleep(0.2)
    left = _processes_of(temp_dir, pgid)
    _kill(left, signal.SIGKILL)
    time.sleep(0.5)
    return left


def stop_processes_naming(path: Path | str, grace: float = 10.0) -> list[int]:
    """Stop every process whose command line names ``path`` (a unique temp dir of ours, e.g. a
    private RAY_TMPDIR); returns the PIDs that needed SIGKILL."""
    return _stop_all(Path(path), None, grace)


@contextlib.contextmanager
def autoscaling_cluster(head_cpus: int, worker_types: dict[str, dict], idle_timeout_minutes: float,
                        tmp_dir: Path | str, *, upscaling_speed: float = 1.0,
                        update_interval_s: int = 1, start_timeout: float = 120.0,
                        ) -> Iterator[SimulatedCluster]:
    """Start a head of ``head_cpus`` CPUs whose autoscaler adds/removes fake worker nodes of
    ``worker_types`` (see ``make_config``), yield it, and stop everything it started.

    ``idle_timeout_minutes`` may be a fraction (the schema says "number", minimum 0; the
    autoscaler multiplies it by 60): 0.1 removes a node after 6 s idle. The autoscaler loop
    runs every ``update_interval_s`` (AUTOSCALER_UPDATE_INTERVAL_S; Ray's default is 5 s).
    The config, and the cluster's logs after exit, are kept in ``tmp_dir``."""
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    # Unix socket paths (<temp>/session_<date>_<pid>/sockets/plasma_store) must stay under
    # 107 bytes, so the Ray temp dir is a short one in /tmp, not pytest's tmp_path.
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-as-", dir="/tmp"))
    port = _free_port()
    address = f"{_node_ip()}:{port}"
    config = make_config(head_cpus, worker_types, idle_timeout_minutes, address,
                         upscaling_speed=upscaling_speed)
    config_path = tmp_dir / "autoscaling.yaml"
    config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    ready = tmp_dir / "head.ready"
    ready.unlink(missing_ok=True)
    env = _clean_env()
    env.update({
        "RAY_FAKE_CLUSTER": "1",  # the fake provider refuses to start without it
        "AUTOSCALER_UPDATE_INTERVAL_S": str(update_interval_s),
        "AUTOSCALER_METRIC_PORT": str(_free_port()),  # not the default 44217 (other clusters)
    })
    head_log = open(tmp_dir / "head.log", "w")  # noqa: SIM115 (closed in the finally below)
    head = subprocess.Popen(
        [sys.executable, "-m", "tests.support.simulated_cluster", "head", "--config", str(config_path),
         "--temp-dir", str(temp_dir), "--port", str(port), "--num-cpus", str(head_cpus),
         "--ready-file", str(ready)],
        cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=head_log, stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: killpg-able, apart from pytest's
    )
    pgid = head.pid
    try:
        deadline = time.monotonic() + start_timeout
        while not ready.exists():
            if head.poll() is not None:
                raise RuntimeError(f"the head exited ({head.returncode}):\n"
                                   f"{(tmp_dir / 'head.log').read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the head did not start in {start_timeout} s")
            time.sleep(0.2)
        address = ready.read_text().strip()
        yield SimulatedCluster(address=address, temp_dir=temp_dir, config_path=config_path,
                               config=config, head_pid=head.pid,
                               env={**_clean_env(), "RAY_ADDRESS": address})
    finally:
        # The head process stops its own processes on SIGTERM; the fake worker nodes were
        # started by the monitor without a reaper, so they are found and stopped here.
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)
            try:
                head.wait(60)
            except subprocess.TimeoutExpired:
                head.kill()
                head.wait(10)
        _stop_all(temp_dir, pgid)
        head_log.close()
        with contextlib.suppress(Exception):
            shutil.copytree(temp_dir, tmp_dir / "ray-temp", symlinks=True,
                            ignore=shutil.ignore_patterns("sockets", "*.sock", "runtime_resources"),
                            ignore_dangling_symlinks=True)
        shutil.rmtree(temp_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Sub-commands, run as `python -m tests.support.simulated_cluster ...` (in subprocesses).


def _run_head(args: argparse.Namespace) -> int:
    """Start the head (GCS, raylet, autoscaler) in this process's group; write the GCS address
    to --ready-file; on SIGTERM/SIGINT or stdin EOF stop all of the head's processes."""
    import threading

    import ray._private.node
    import ray._private.parameter
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    assert os.environ.get("RAY_FAKE_CLUSTER") == "1", "the fake provider needs RAY_FAKE_CLUSTER=1"
    params = ray._private.parameter.RayParams(
        temp_dir=args.temp_dir,
        gcs_server_port=args.port,
        num_cpus=args.num_cpus,
        num_gpus=0,
        object_store_memory=args.object_store_bytes,
        autoscaling_config=args.config,
        include_dashboard=False,
        # Ray starts a (minimal) dashboard head even so: on a free port, not 8265; the agents'
        # ports are picked by the OS, not the defaults (52365, ...) other clusters may hold.
        dashboard_port=_free_port(),
        dashboard_agent_listen_port=0,
        min_worker_port=0,
        max_worker_port=0,
        # As `RAY_FAKE_CLUSTER=1 ray start --head` does: the head gets the node id the fake
        # provider lists for it, so the autoscaler matches the head's load to the head.
        env_vars={"RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID},
    )
    node = ray._private.node.Node(params, head=True, shutdown_at_exit=False, spawn_reaper=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def stdin_closed() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=stdin_closed, daemon=True).start()
    tmp = args.ready_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(node.gcs_address)
    os.replace(tmp, args.ready_file)
    print(f"head up at {node.gcs_address}, session {node.get_session_dir_path()}", flush=True)
    stop.wait()
    print("stopping the head", flush=True)
    node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
    return 0


@contextlib.contextmanager
def _gcs_state(address: str):
    """Ray's GCS tables for ``address`` without a driver (ray.init is not called)."""
    from ray._private.state import GlobalState
    from ray._raylet import GcsClientOptions

    state = GlobalState()
    state._initialize_global_state(GcsClientOptions.create(
        address, None, allow_cluster_id_nil=True, fetch_cluster_id_if_nil=False))
    try:
        yield state
    finally:
        state.disconnect()


def alive_nodes(address: str) -> list[dict]:
    """Alive nodes of the cluster at ``address``, from the GCS node table (no driver)."""
    with _gcs_state(address) as state:
        table = state.node_table()
    out = []
    for n in table:
        if not n.get("Alive"):
            continue
        resources = n.get("Resources", {})
        out.append({
            "node_id": n["NodeID"],
            "is_head": bool(n.get("IsHead") or "node:__internal_head__" in resources),
            "cpus": resources.get("CPU", 0),
        })
    return out


def alive_actors(address: str) -> list[dict]:
    """Alive actors of the cluster at ``address`` with their node (e.g. to say what keeps a
    node from being idle), from the GCS actor table."""
    with _gcs_state(address) as state:
        table = state.actor_table(None, actor_state_name="ALIVE")
    return [{"class": a["ActorClassName"], "name": a["Name"], "detached": a["IsDetached"],
             "node_id": a["Address"]["NodeID"], "pid": a["Pid"]} for a in table.values()]


def _watch(args: argparse.Namespace) -> int:
    with open(args.out, "a") as f:
        while True:
            try:
                nodes = alive_nodes(args.address)
                line = {"t": time.time(), "workers": sum(not n["is_head"] for n in nodes),
                        "nodes": nodes}
            except Exception as exc:  # noqa: BLE001 (the cluster may be going down)
                line = {"t": time.time(), "error": repr(exc)[:500]}
            f.write(json.dumps(line) + "\n")
            f.flush()
            time.sleep(args.interval)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.support.simulated_cluster")
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("head")
    h.add_argument("--config", required=True)
    h.add_argument("--temp-dir", required=True)
    h.add_argument("--port", type=int, required=True)
    h.add_argument("--num-cpus", type=int, required=True)
    h.add_argument("--object-store-bytes", type=int, default=DEFAULT_OBJECT_STORE_BYTES)
    h.add_argument("--ready-file", required=True)
    for name in ("nodes", "actors"):
        sub.add_parser(name).add_argument("address")
    w = sub.add_parser("watch")
    w.add_argument("address")
    w.add_argument("out")
    w.add_argument("--interval", type=float, default=0.5)
    args = p.parse_args(argv)
    if args.cmd == "head":
        return _run_head(args)
    if args.cmd in ("nodes", "actors"):
        print(json.dumps((alive_nodes if args.cmd == "nodes" else alive_actors)(args.address)))
        return 0
    return _watch(args)


if __name__ == "__main__":
    sys.exit(main())
