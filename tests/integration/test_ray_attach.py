"""Attaching to the cluster a user started with `ray start --head` (Ray 2.60: token
authentication on by default): `orchestrator train` attaches to it with the machine's token,
the `ray job submit` recipe of docs/guides/train.md runs as written, and an address given in a way that Ray will
not send the token to fails with one message naming the cause and the fix."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import orchestrator
from orchestrator.ray_runtime import _answers
from tests.conftest import REPO, _free_port

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]
RECORDED = Path("/tmp/ray/ray_current_cluster")
RAY = str(Path(sys.executable).parent / "ray")
ORCHESTRATOR = str(Path(sys.executable).parent / "orchestrator")


def _env_without_ray_address() -> dict:
    """A user's shell after `source .venv/bin/activate`, as the guide's recipe starts."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A `ray start --head --block` cluster of its own (the session's stays as it is); the
    address file it records here is put back as it was afterwards."""
    before = RECORDED.read_text() if RECORDED.exists() else None
    port, dashboard, agent = _free_port(), _free_port(), _free_port()
    log = tmp_path_factory.mktemp("head") / "ray-start.log"
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--port", str(port), "--num-cpus", "4", "--include-dashboard", "true",
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--dashboard-agent-listen-port", str(agent)],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, env=_env_without_ray_address(), start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not (RECORDED.exists() and RECORDED.read_text().endswith(f":{port}") and _dashboard_up(dashboard)):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield RECORDED.read_text().strip(), port, f"http://127.0.0.1:{dashboard}"
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # `ray start --block` stops on Ctrl-C; it sat out SIGTERM's 30 s
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        if before is None:
            RECORDED.unlink(missing_ok=True)
        else:
            RECORDED.write_text(before)


def _dashboard_up(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2)
        return True
    except urllib.error.HTTPError:
        return True  # answers (401 without a token)
    except OSError:
        return False


@pytest.fixture(scope="module")
def street(tmp_path_factory, demo_small) -> str:
    uri = f"file://{tmp_path_factory.mktemp('attach') / 'store'}"
    orchestrator.connect(uri).ingest("street", coco=demo_small / "annotations.json", images=demo_small / "images")
    return uri


def test_train_attaches_to_the_cluster_ray_start_recorded_with_its_token(head, street):
    address, _, _ = head
    r = subprocess.run([ORCHESTRATOR, "-v", "train", str(REPO / "configs" / "street_torch.yaml"), "--store", street,
                        "--set", "train.epochs=1", "--set", "train.batch_size=8"],
                       capture_output=True, text=True, env=_env_without_ray_address(), timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert f"attached to the Ray cluster at {address}" in out and "InvalidAuthToken" not in out, out[-4000:]
    assert "starting a local one" not in out and "epoch 1/1" in r.stdout


def test_the_training_guides_ray_job_submit_recipe_runs_against_it(head, street):
    """The docs mark this fence `not run` (it needs a cluster of its own); this test runs it."""
    _, _, dashboard = head
    readme = (REPO / "docs" / "guides" / "train.md").read_text()
    recipe = re.search(r"^RAY_AUTH_MODE=token ray job submit --address (\S+) --working-dir \. -- \\\n\s+(.+)$",
                       readme, re.M)
    assert recipe, "the `ray job submit` recipe of docs/guides/train.md changed: update this test with it"
    entry = recipe.group(2).replace("$PWD/.demo/store", street[len("file://"):]).split()
    r = subprocess.run([RAY, "job", "submit", "--address", dashboard, "--working-dir", ".", "--", *entry,
                        "--set", "train.epochs=1", "--set", "train.batch_size=8"],
                       capture_output=True, text=True, cwd=REPO, timeout=600,
                       env={**_env_without_ray_address(), "RAY_AUTH_MODE": "token"})
    assert r.returncode == 0 and "succeeded" in (r.stdout + r.stderr).lower(), (r.stdout + r.stderr)[-4000:]


def test_an_address_ray_sends_no_token_to_fails_with_the_cause_and_the_fix(head, street):
    _, port, _ = head
    assert _answers(f"localhost:{port}")
    # The test process runs the session's cluster with RAY_AUTH_MODE=token set (Ray sets it for
    # a cluster it starts); a user's shell has no such variable.
    r = subprocess.run([ORCHESTRATOR, "train", str(REPO / "configs" / "street_torch.yaml"),
                        "--store", street], capture_output=True, text=True, timeout=300,
                       env={**_env_without_ray_address(), "RAY_ADDRESS": f"localhost:{port}"})
    assert r.returncode == 2, r.stderr[-3000:]  # the user's setting to fix, not a system failure
    assert f"the Ray cluster at RAY_ADDRESS=localhost:{port} answers but refused this connection" in r.stderr
    assert "RAY_AUTH_MODE=token" in r.stderr and "Traceback" not in r.stderr and "gone" not in r.stderr
