"""Turn the storage libraries' exceptions into orchestrator errors that say what to fix.

pyarrow, deltalake and botocore each report a bad key, a missing bucket or a refused request in
their own words, often deep inside a C++ or Rust message. Callers wrap storage calls in
``storage_errors(action, target)`` and get ``AccessDenied`` or ``StoreError`` naming the action
and the object instead.

``store_call`` and ``retrying`` also hold each S3 request open on ``S3_REQUESTS``: a process
that forks (a PyTorch DataLoader starting its workers) while another of its threads is inside
an S3 request hands the child an AWS SDK (pyarrow's C++ client) that never completes a request
there, or crashes: measured, every child forked during reads hung in its first read, and CI saw
a DataLoader worker die of SIGSEGV. The fork now waits for requests in flight to end.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

from orchestrator.errors import AccessDenied, OrchestratorError, StoreError
from orchestrator.fork_safety import ForkGate
from orchestrator.retry import RetryPolicy, call_with_retries, is_transient

if TYPE_CHECKING:
    from orchestrator.store_location import StoreLocation

T = TypeVar("T")

#: The S3 requests of this process (see the module docstring): a fork waits up to ``wait_s``
#: for those in flight, longer than one attempt's request timeout takes to give up by default.
S3_REQUESTS = ForkGate(wait_s=60.0)


def _one_request(fn: Callable[[], T], location: StoreLocation) -> Callable[[], T]:
    """``fn`` as one attempt that a fork waits for, on S3 (a local file has no client state)."""
    if location.scheme != "s3":
        return fn

    def attempt() -> T:
        with S3_REQUESTS.operation():
            return fn()

    return attempt

_CREDENTIALS = re.compile(
    r"InvalidAccessKeyId|INVALID_ACCESS_KEY_ID|SignatureDoesNotMatch|SIGNATURE_DOES_NOT_MATCH|InvalidClientTokenId|ExpiredToken|"
    r"invalid access key|signature we calculated",
    re.IGNORECASE,
)
_DENIED = re.compile(r"AccessDenied|Access Denied|\b403\b|Forbidden", re.IGNORECASE)
_NO_BUCKET = re.compile(r"NoSuchBucket|bucket does not exist", re.IGNORECASE)
_UNREACHABLE = re.compile(
    r"Connection refused|connect error|Could not connect|timed out|dns error|"
    r"Failed to connect|error sending request|Couldn't connect",
    re.IGNORECASE,
)


def translate(exc: BaseException, action: str, target: str) -> OrchestratorError:
    """Map a storage-library exception to the orchestrator error a user can act on."""
    if isinstance(exc, OrchestratorError):
        return exc
    text = f"{type(exc).__name__}: {exc}"
    first_line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    if _CREDENTIALS.search(text):
        return AccessDenied(
            f"the store rejected the credentials while trying to {action} {target}",
            hint="check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for this store",
        )
    if _DENIED.search(text):
        return AccessDenied(
            f"access denied: cannot {action} {target} with the current credentials",
            hint="ask an admin for a grant on this dataset, or use credentials that have one",
        )
    if _NO_BUCKET.search(text):
        return StoreError(
            f"cannot {action} {target}: the bucket does not exist",
            hint="create the bucket first, or fix the bucket name in the store URI",
        )
    if _UNREACHABLE.search(text) or is_transient(exc):
        err = StoreError(
            f"cannot {action} {target}: the store is unreachable or not answering ({first_line})",
            hint="check AWS_ENDPOINT_URL and that the S3 server is running",
        )
        err.transient = True  # an outer retry loop may try again (orchestrator.retry)
        return err
    return StoreError(f"cannot {action} {target}: {first_line}")


@contextlib.contextmanager
def storage_errors(action: str, target: str) -> Iterator[None]:
    """Re-raise any storage-library exception inside the block as an orchestrator error."""
    try:
        yield
    except OrchestratorError:
        raise
    except Exception as exc:  # pyarrow, deltalake and botocore raise unrelated classes
        raise translate(exc, action, target) from exc


def store_call(
    fn: Callable[[], T], *, location: StoreLocation, action: str, target: str,
    policy: RetryPolicy | None = None,
) -> T:
    """``fn()`` against the store at ``location``: transient faults retried under the location's
    retry policy (or ``policy``) then ``StoreUnavailable``; any other failure translated at once
    (see ``orchestrator.retry``). ``fn`` must be safe to repeat."""
    return call_with_retries(
        _one_request(fn, location), policy=policy or location.retry, action=action, target=target, store=location.uri,
        translate=lambda exc: translate(exc, action, target),
    )


def retrying(
    fn: Callable[[], T], *, location: StoreLocation, action: str, target: str,
    policy: RetryPolicy | None = None,
) -> T:
    """Like ``store_call`` but a non-transient failure is re-raised as it is, for callers that
    explain it themselves (a damaged manifest file names the file)."""
    return call_with_retries(_one_request(fn, location), policy=policy or location.retry, action=action,
                             target=target, store=location.uri)
