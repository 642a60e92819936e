"""Polling with a deadline, for tests that wait on a cluster or a run to reach a state."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(pred: Callable[[], T], timeout: float, interval: float = 0.5) -> T:
    """``pred()``'s first truthy value within ``timeout`` seconds, else its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    return pred()


def join_or_fail(procs, what: str, timeout: float = 60.0) -> None:
    """Join forked children; a child still alive after ``timeout`` is killed and the test fails
    naming it (a hang becomes a failure, not a stuck suite); every child must exit 0."""
    for p in procs:
        p.join(timeout)
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"forked children {hung} hung {what}"
    assert [p.exitcode for p in procs] == [0] * len(procs), f"exit codes {[p.exitcode for p in procs]} {what}"


def fork_rounds(target, args_of, rounds: int, what: str, *, children: int = 2, timeout: float = 60.0) -> None:
    """``rounds`` times, fork ``children`` processes running ``target(*args_of(round, k))`` at once
    and ``join_or_fail`` them: the shape of every test of a fork made while other threads work."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for round_ in range(rounds):
        procs = [ctx.Process(target=target, args=args_of(round_, k)) for k in range(children)]
        for p in procs:
            p.start()
        join_or_fail(procs, f"in round {round_} {what}", timeout)
