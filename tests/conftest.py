"""Session fixtures: one SeaweedFS S3 server, one local Ray cluster, small demo data.

Every store test runs against both backends through the ``store_uri`` fixture: a fresh
``file://`` folder and a fresh ``s3://`` prefix on the session's SeaweedFS server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUCKET = "orchestrator-test"
S3_KEY = "test-access"
S3_SECRET = "test-secret"


def pytest_configure(config: pytest.Config) -> None:
    # The session's Ray head listens on loopback only; token auth would need the token handed to
    # every CLI subprocess, which is what `ray job submit` users get from their cluster instead.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # No preemption watcher actor with each of Ray Train's worker groups (it watches for a cloud
    # spot-instance notice; ~1-2 s of CPU per start on 2 cores); the suite starts ~40 of them.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # The node blob cache's disk tier (on by default) lives in a folder of this session, never in
    # the user's home; set before the session's Ray cluster starts, so its workers inherit it.
    # Content-addressed: a blob an earlier test read stays readable after a test deletes it from
    # its store, so a test that needs a cold cache passes its own
    # ``StreamOptions(cache=BlobCache(...))`` (memory only unless it names a ``disk_dir``).
    global _SESSION_CACHE
    _SESSION_CACHE = tempfile.mkdtemp(prefix="orchestrator-test-cache-")
    os.environ["ORCHESTRATOR_CACHE_DIR"] = _SESSION_CACHE


_SESSION_CACHE: str | None = None


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SESSION_CACHE is not None:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 server (SeaweedFS) on loopback for the whole session, with one bucket.

    The AWS variables are exported so that subprocesses (the CLI) reach the same server.
    """
    from orchestrator.dev.seaweed import SeaweedServer

    server = SeaweedServer(tmp_path_factory.mktemp("seaweed"))
    server.start()
    server.create_bucket(BUCKET, S3_KEY, S3_SECRET)
    saved = {k: os.environ.get(k) for k in server.env(S3_KEY, S3_SECRET)}
    os.environ.update(server.env(S3_KEY, S3_SECRET))
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop(timeout=1)  # throwaway data: no 15 s graceful shutdown at the session's end


@pytest.fixture(scope="session")
def faulty_seaweed(tmp_path_factory: pytest.TempPathFactory):
    """A SeaweedFS server of its own that fault tests kill -9, restart and SIGSTOP (see
    tests/support/faulty_server.py); the session's ``seaweed`` server is never touched."""
    from tests.support.faulty_server import FaultyServer

    server = FaultyServer(tmp_path_factory.mktemp("faulty-seaweed")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    """One local Ray cluster for the session, started in this process with a dashboard (for
    `ray job submit`); CLI subprocesses attach to it through RAY_ADDRESS instead of starting their
    own. More logical CPUs than cores, see ray_runtime. Teardown stops this cluster only."""
    import ray

    from orchestrator.store_location import S3_COMPAT_ENV

    os.environ.pop("RAY_ADDRESS", None)
    dashboard_port = _free_port()
    # The dashboard's job agent listens on a fixed port (52365) that ray.init cannot change; when
    # another Ray cluster on the machine holds it, `ray job submit` gets "No available agent".
    # Give this cluster's agent a free port instead (test-only: RayParams' default argument).
    from ray._private import parameter

    original, agent_port = parameter.RayParams.__init__, _free_port()

    def with_free_agent_port(self, *args, **kwargs):
        kwargs.setdefault("dashboard_agent_listen_port", agent_port)
        original(self, *args, **kwargs)

    parameter.RayParams.__init__ = with_free_agent_port
    try:
        ray.init(num_cpus=8, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=dashboard_port, log_to_driver=False,
                 runtime_env={"env_vars": dict(S3_COMPAT_ENV)})
    finally:
        parameter.RayParams.__init__ = original
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    yield RayCluster(os.environ["RAY_ADDRESS"], f"http://127.0.0.1:{dashboard_port}")
    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)


@dataclass(frozen=True)
class RayCluster:
    address: str  # for ray.init / RAY_ADDRESS
    dashboard: str  # for `ray job submit --address`


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["file", "s3"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store on each backend."""
    if request.param == "file":
        return f"file://{tmp_path / 'store'}"
    request.getfixturevalue("seaweed")
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def demo_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 demo street scenes with their COCO file (read-only: copy before changing)."""
    from orchestrator.dev.demo import make_demo_data

    out = tmp_path_factory.mktemp("demo_small")
    make_demo_data(out, 60, seed=1)
    return out


@pytest.fixture
def street(store_uri: str, demo_small: Path):
    """A store (on each backend, through ``store_uri``) with ``demo_small`` ingested as
    ``street`` (packed, the default layout). A module may define its own ``street``."""
    import orchestrator

    store = orchestrator.connect(store_uri)
    store.ingest("street", coco=demo_small / "annotations.json", images=demo_small / "images")
    return store


@pytest.fixture(scope="session")
def demo_2000(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2,000 demo street scenes (the acceptance size for ingest on S3)."""
    from orchestrator.dev.demo import make_demo_data

    out = tmp_path_factory.mktemp("demo_2000")
    make_demo_data(out, 2000, seed=0, workers=2)
    return out


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the installed ``orchestrator`` command as a user would."""
    exe = shutil.which("orchestrator", path=str(Path(sys.executable).parent)) or "orchestrator"
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )
