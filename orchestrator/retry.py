"""Transient store faults: how long to wait for a store, and what counts as "wait and retry".

The rule every read and write path follows (SDK iteration, ``ds[i]``, DataLoader workers,
``tf.data``, Ray stages, training, ingest):

* The store answered "not found" (a missing blob) or returned bytes that do not decode or do
  not match their hash: that is the *item's* fault, an ``ItemError``, which ``on_error="skip"``
  may skip (counted and reported).
* The store did not answer or said "try later" (connection refused or reset, a timeout, HTTP
  5xx, throttling): that is the *store's* fault and says nothing about the item. The call is
  retried with exponential backoff and full jitter until ``RetryPolicy.deadline_s`` has passed
  since the first failure, then ``StoreUnavailable`` is raised. It is never counted as a skip:
  an outage that turned into "skipped" items would silently shrink a training set.
* Anything else (access denied, a bad bucket name) is raised at once: retrying cannot fix it.

Every request also has a timeout (``connect_timeout_s``, ``request_timeout_s``, handed to the S3
clients in ``store_location``), so a stalled server (SIGSTOP, a dead NAT) turns into a retried
timeout instead of a reader that hangs forever.

The policy is a small frozen value that travels with the store location into Ray tasks and
DataLoader workers. Set it in the store URI (``s3://bucket/prefix?retry_deadline=30``), per
dataset (``store.dataset(name, retry_deadline=30)``) or per run (``data.retry_deadline_s``).
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from orchestrator.errors import ConfigError, OrchestratorError, StoreError, StoreUnavailable
from orchestrator.fork_safety import ForkSafeLock

__all__ = ["RetryPolicy", "RetryStats", "call_with_retries", "is_transient", "retry_stats"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: What the S3 clients (pyarrow's AWS SDK, delta-rs' object_store, botocore) and the OS say when
#: a store is down, stalled, overloaded or restarting. Measured against SeaweedFS killed -9
#: (``curlCode: 7``), SIGSTOPped (``curlCode: 28``) and restarting (HTTP 500 for ~0.5 s while its
#: filer comes up); AWS S3 adds 503 SlowDown and RequestTimeout.
_TRANSIENT = re.compile(
    r"NETWORK_CONNECTION|curlCode: (?:6|7|28|52|55|56)\b|Could not connect|Couldn't connect|"
    r"Failed to connect|Connection refused|Connection reset|connection closed|Broken pipe|"
    r"timed out|Timeout was reached|timeout|error sending request|connect error|"
    r"HTTP status 5\d\d|status(?: code)?:? 5\d\d|\b50[0234]\b|InternalError|INTERNAL_FAILURE|please try again|"
    r"ServiceUnavailable|"
    r"SlowDown|Throttl|RequestTimeout|TooManyRequests|\b429\b|Service Unavailable|"
    r"Remote end closed|EOF occurred|IncompleteRead|unexpected end of file|reset by peer",
    re.IGNORECASE,
)
#: Answers that look like a transient match but are the caller's fault.
_PERMANENT = re.compile(
    r"NoSuchKey|NoSuchBucket|AccessDenied|Access Denied|InvalidAccessKeyId|"
    r"SignatureDoesNotMatch|INVALID_ACCESS_KEY_ID|\b403\b|\b404\b",
    re.IGNORECASE,
)


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` says the store did not answer (or asked to come back later), not that
    the request was wrong. ``FileNotFoundError`` is never transient; an orchestrator error is
    when it was translated from a transient fault (``transient=True``), except
    ``StoreUnavailable``: an inner retry loop already waited its whole deadline."""
    if isinstance(exc, StoreUnavailable):
        return False
    if isinstance(exc, OrchestratorError):
        return bool(getattr(exc, "transient", False))
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(exc).__name__}: {exc}"
    if _PERMANENT.search(text):
        return False
    return bool(_TRANSIENT.search(text))


@dataclass(frozen=True)
class RetryPolicy:
    """How long a store may be unavailable before a read or write gives up.

    ``deadline_s``: total time to keep retrying after the first failure of one call (default
    2 minutes: long enough for a server restart or a short network partition, short enough that
    a dead store is reported while someone is still watching). ``connect_timeout_s`` and
    ``request_timeout_s`` bound each attempt (a stalled server times out instead of hanging).
    ``first_backoff_s`` doubles up to ``max_backoff_s``; each sleep is drawn uniformly from
    [0, backoff] ("full jitter") so that many readers do not hammer a recovering server in step.
    """

    deadline_s: float = 120.0
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 30.0
    first_backoff_s: float = 0.1
    max_backoff_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("deadline_s", "connect_timeout_s", "request_timeout_s", "first_backoff_s",
                     "max_backoff_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"retry setting {name} must be a number >= 0, got {value!r}")
        if self.connect_timeout_s == 0 or self.request_timeout_s == 0:
            raise ConfigError("retry timeouts must be > 0 seconds (a read without a timeout can hang forever)")

    #: URI query keys (``?retry_deadline=30``) and the fields they set.
    URI_KEYS = {
        "retry_deadline": "deadline_s",
        "connect_timeout": "connect_timeout_s",
        "request_timeout": "request_timeout_s",
    }

    @classmethod
    def from_query(cls, query: dict[str, list[str]], uri: str) -> RetryPolicy:
        """The policy named by a store URI's query string; unknown keys are an error."""
        changes: dict[str, float] = {}
        for key, values in query.items():
            field = cls.URI_KEYS.get(key)
            if field is None:
                raise ConfigError(
                    f"store URI {uri!r} has an unknown option {key!r}",
                    hint=f"options are {', '.join(sorted(cls.URI_KEYS))} (seconds)",
                )
            try:
                changes[field] = float(values[-1])
            except ValueError:
                raise ConfigError(f"store URI option {key}={values[-1]!r} is not a number of seconds") from None
        return cls(**changes)

    def with_deadline(self, deadline_s: float | None) -> RetryPolicy:
        """This policy with another deadline (None keeps it)."""
        return self if deadline_s is None else replace(self, deadline_s=float(deadline_s))

    def backoff(self, attempt: int) -> float:
        """Seconds to sleep before retry number ``attempt`` (1-based), with full jitter."""
        cap = min(self.max_backoff_s, self.first_backoff_s * 2 ** (attempt - 1))
        return random.uniform(0, cap)


class RetryStats:
    """Counts of retried calls in this process (for benchmarks and the fault report)."""

    def __init__(self) -> None:
        self._lock = ForkSafeLock()
        self.retries = 0
        self.recovered = 0
        self.gave_up = 0
        self.longest_outage_s = 0.0

    def record(self, *, retries: int, outage_s: float, recovered: bool) -> None:
        with self._lock:
            self.retries += retries
            self.recovered += int(recovered)
            self.gave_up += int(not recovered)
            self.longest_outage_s = max(self.longest_outage_s, outage_s)

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return {"retries": self.retries, "recovered": self.recovered, "gave_up": self.gave_up,
                    "longest_outage_s": round(self.longest_outage_s, 2)}

    def reset(self) -> None:
        with self._lock:
            self.retries = self.recovered = self.gave_up = 0
            self.longest_outage_s = 0.0


_STATS = RetryStats()


class _Outages:
    """When each store started failing, shared by every call in this process.

    A deadline counts from the start of the store's outage, not from each call's own first
    failure: otherwise a reader with N fetches in flight (or a fetch that starts after another
    gave up) would wait up to N deadlines in a row before the error reaches the user. Any
    success ends the store's outage."""

    def __init__(self) -> None:
        self._lock = ForkSafeLock()
        self._since: dict[str, float] = {}

    def failed(self, store: str, now: float) -> float:
        """Record a failure; returns when this store's current outage began."""
        with self._lock:
            return self._since.setdefault(store, now)

    def answered(self, store: str) -> None:
        with self._lock:
            self._since.pop(store, None)


_OUTAGES = _Outages()


def retry_stats() -> RetryStats:
    """This process's retry counters."""
    return _STATS


def call_with_retries(
    fn: Callable[[], T],
    *,
    policy: RetryPolicy,
    action: str,
    target: str,
    store: str,
    translate: Callable[[BaseException], BaseException] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``fn()``, retried while it fails transiently, until ``policy.deadline_s`` after the first
    failure; then ``StoreUnavailable`` naming the store, the action and the last error.

    Non-transient failures go to ``translate`` (default: re-raised as they are) on the first
    attempt. ``fn`` must be safe to repeat: a read, or a write of the same bytes to the same name.
    """
    first_failure: float | None = None
    attempt = 0
    while True:
        try:
            result = fn()
        except Exception as exc:
            if not is_transient(exc):
                if first_failure is not None:
                    _STATS.record(retries=attempt, outage_s=clock() - first_failure, recovered=False)
                if translate is not None:
                    raise translate(exc) from exc
                raise
            now = clock()
            if first_failure is None:
                first_failure = now
            attempt += 1
            outage_began = _OUTAGES.failed(store, now) if clock is time.monotonic else first_failure
            waited = now - min(first_failure, outage_began)
            if waited >= policy.deadline_s:
                _STATS.record(retries=attempt - 1, outage_s=waited, recovered=False)
                raise _unavailable(exc, policy, action, target, store, attempt, waited) from exc
            pause = min(policy.backoff(attempt), max(0.0, policy.deadline_s - waited))
            if attempt == 1 or attempt % 20 == 0:
                log.warning("store %s unavailable while trying to %s %s (attempt %d, %.0f s so far): "
                            "%s; retrying for up to %.0f s", store, action, target, attempt, waited,
                            _first_line(exc), policy.deadline_s)
            sleep(pause)
            continue
        if first_failure is not None:
            outage = clock() - first_failure
            _STATS.record(retries=attempt, outage_s=outage, recovered=True)
            log.info("store %s answered again after %.1f s (%d retries)", store, outage, attempt)
        if clock is time.monotonic:
            _OUTAGES.answered(store)
        return result


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _unavailable(exc: BaseException, policy: RetryPolicy, action: str, target: str, store: str,
                 attempts: int, waited: float) -> StoreError:
    if isinstance(exc, StoreUnavailable):
        return exc
    return StoreUnavailable(
        f"the store {store} did not answer for {waited:.0f} s ({attempts} attempts) while trying "
        f"to {action} {target}; last error: {_first_line(exc)}",
        hint="check that the S3 server is running and reachable (AWS_ENDPOINT_URL, network); "
             "nothing was skipped or committed. To wait longer set retry_deadline (store URI "
             "'?retry_deadline=SECONDS', store.dataset(..., retry_deadline=SECONDS) or "
             "data.retry_deadline_s in a run config)",
    )
