"""Locks a forked child gets back usable, and a gate that holds a fork until no transaction of a
shared resource is open.

Why this exists: a PyTorch DataLoader forks its workers from a process whose other threads
(prefetch threads, the cache's writer thread, a previous loader's threads) may be inside a
critical section at that instant. The child inherits the lock in its held state but not the
thread that would release it, so its first cache lookup waited forever; and py-lmdb's ``close``
waits for the thread owning an open write transaction, which hung a worker closing the
environment it inherited (the intermittent CI hang of stop 24; reproduced by
``tests/test_stream_cache.py::test_fork_during_cache_traffic_never_hangs_the_child``).

``ForkSafeLock``: for short critical sections with no I/O inside. The child re-initialises it
unlocked (as CPython does for its own locks); the data it guarded may be one update behind in
the child, which is acceptable for what uses it (LRU bookkeeping, counters, a handle cache), never
for data that must stay exact across processes.

``ForkGate``: for a resource whose child must not inherit an operation in flight (an LMDB
transaction). Operations run in parallel; a fork waits until none is open (bounded by
``wait_s``) and holds new ones until it is done, so the child starts with none.
"""
from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType


class ForkSafeLock:
    """A ``threading.Lock`` that a forked child gets back unlocked (see the module docstring)."""

    __slots__ = ("_lock", "__weakref__")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        _locks.add(self)

    def __enter__(self) -> ForkSafeLock:
        self._lock.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._lock.release()


_locks: weakref.WeakSet[ForkSafeLock] = weakref.WeakSet()


def _reinit_locks_in_child() -> None:
    for lock in list(_locks):
        lock._lock = threading.Lock()


os.register_at_fork(after_in_child=_reinit_locks_in_child)


class ForkGate:
    """Operations (``with gate.operation():``) run in parallel; ``os.fork`` waits until none is
    open and holds new ones until the fork is done.

    ``quiet_at_fork`` tells the child whether the wait succeeded: False when an operation was
    still open after ``wait_s`` (an operation blocked on another process for that long), and
    the child must then leave what it inherited untouched. Never fork from inside an
    operation: the fork would wait ``wait_s`` for itself."""

    def __init__(self, wait_s: float = 30.0) -> None:
        self.wait_s = wait_s
        self.quiet_at_fork = True
        self._reset()
        _gates.add(self)

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._open = 0
        self._forking = False

    @contextmanager
    def operation(self) -> Iterator[None]:
        with self._cond:
            while self._forking:
                self._cond.wait()
            self._open += 1
        try:
            yield
        finally:
            with self._cond:
                self._open -= 1
                if self._forking and not self._open:
                    self._cond.notify_all()

    def _before_fork(self) -> None:
        self._cond.acquire()  # held across the fork: no operation starts or ends meanwhile
        self._forking = True
        deadline = time.monotonic() + self.wait_s
        while self._open and (left := deadline - time.monotonic()) > 0:
            self._cond.wait(left)
        self.quiet_at_fork = not self._open

    def _after_fork_in_parent(self) -> None:
        self._forking = False
        self._cond.notify_all()
        self._cond.release()

    def _after_fork_in_child(self) -> None:
        self._reset()  # the operations that were open belong to parent threads


_gates: weakref.WeakSet[ForkGate] = weakref.WeakSet()
_held: list[ForkGate] = []  # the gates this fork holds (a gate made meanwhile is not among them)


def _gates_before_fork() -> None:
    _held[:] = list(_gates)
    for gate in _held:
        gate._before_fork()


def _gates_after_fork_in_parent() -> None:
    for gate in _held:
        gate._after_fork_in_parent()
    _held.clear()


def _gates_after_fork_in_child() -> None:
    for gate in _held:
        gate._after_fork_in_child()
    _held.clear()


os.register_at_fork(before=_gates_before_fork, after_in_parent=_gates_after_fork_in_parent,
                    after_in_child=_gates_after_fork_in_child)
