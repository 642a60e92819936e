"""A SeaweedFS server that a test can kill -9, restart and SIGSTOP while a reader uses it.

Its own server (not the session's), so that faults never disturb other tests. Every start runs
on one long-lived control thread: ``weed`` is launched with PR_SET_PDEATHSIG, which fires when
the *thread* that forked it ends, so a restart from a short-lived timer thread would be killed
again the moment that thread returned.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from orchestrator.dev.seaweed import SeaweedServer
from orchestrator.store_location import S3Credentials

BUCKET = "faults"
KEY, SECRET = "fault-key", "fault-secret"


class FaultyServer:
    def __init__(self, data_dir: Path) -> None:
        self.server = SeaweedServer(data_dir)
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._control, name="fault-control", daemon=True)
        self.events: list[tuple[str, float]] = []
        self.errors: list[BaseException] = []
        self._started = threading.Event()

    def _control(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except BaseException as exc:  # reported by the test through .errors
                self.errors.append(exc)

    def _run(self, job: Callable[[], None], wait: bool) -> None:
        done = threading.Event()

        def wrapped() -> None:
            try:
                job()
            finally:
                done.set()

        self._jobs.put(wrapped)
        if wait:
            done.wait()

    def start(self) -> FaultyServer:
        self._thread.start()
        self._run(self.server.start, wait=True)
        if self.errors:
            raise self.errors[0]
        self.server.create_bucket(BUCKET, KEY, SECRET)
        return self

    def env(self) -> dict[str, str]:
        return self.server.env(KEY, SECRET)

    def credentials(self) -> S3Credentials:
        return S3Credentials(access_key=KEY, secret_key=SECRET, endpoint_url=self.server.endpoint_url)

    def uri(self, prefix: str, **options: float) -> str:
        query = "&".join(f"{k}={v}" for k, v in options.items())
        return f"s3://{BUCKET}/{prefix}" + (f"?{query}" if query else "")

    def kill(self) -> None:
        """kill -9, as a crashed server or a lost node."""
        proc = self.server._proc
        assert proc is not None and proc.poll() is None, "the server is not running"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        self.events.append(("killed", time.monotonic()))

    def restart_after(self, seconds: float) -> None:
        """Start the server again (same data, same S3 port) ``seconds`` from now, in the
        background; ``wait_until_up`` blocks until it answers."""

        def job() -> None:
            time.sleep(seconds)
            self.server.start()
            self.events.append(("up", time.monotonic()))

        self._run(job, wait=False)

    def kill_and_restart_after(self, seconds: float) -> None:
        self.kill()
        self.restart_after(seconds)

    def stall_for(self, seconds: float) -> None:
        """SIGSTOP now (connections are accepted by the kernel, nothing answers), SIGCONT later."""
        pid = self.server.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        self.events.append(("stopped", time.monotonic()))

        def job() -> None:
            time.sleep(seconds)
            os.kill(pid, signal.SIGCONT)
            self.events.append(("continued", time.monotonic()))

        self._run(job, wait=False)

    def wait_idle(self, timeout: float = 120) -> None:
        """Block until every scheduled restart/continue has happened."""
        done = threading.Event()
        self._jobs.put(done.set)
        assert done.wait(timeout), "the fault control thread did not finish in time"
        if self.errors:
            raise self.errors[0]

    def stop(self) -> None:
        self.wait_idle()
        if self.server.pid is not None:
            try:
                os.kill(self.server.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self._run(lambda: self.server.stop(timeout=1), wait=True)  # throwaway data: no 15 s graceful stop
        self._jobs.put(None)
        self._thread.join(timeout=30)
