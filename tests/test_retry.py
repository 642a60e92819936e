"""retry: which failures are the store's, how long they are retried, and how that is configured."""

from __future__ import annotations

import pickle

import pytest

from orchestrator.errors import AccessDenied, ConfigError, ItemError, StoreError, StoreUnavailable
from orchestrator.retry import RetryPolicy, call_with_retries, is_transient
from orchestrator.storage_errors import translate
from orchestrator.store_location import StoreLocation

# What the clients really said against a killed, stalled and restarting SeaweedFS, and AWS S3.
TRANSIENT = [
    OSError("When reading information for key 'x/obj' in bucket 'b': AWS Error NETWORK_CONNECTION during "
            "HeadObject operation: curlCode: 7, Could not connect to server"),
    OSError("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 28, Timeout was reached"),
    OSError("When reading information for key 'x' in bucket 'b': AWS Error UNKNOWN (HTTP status 500) during "
            "HeadObject operation: No response body."),
    OSError("AWS Error INTERNAL_FAILURE during GetObject operation: We encountered an internal error, "
            "please try again."),
    OSError("Generic S3 error: Error after 10 retries in 2.9s, max_retries:10, retry_timeout:180s, "
            "source:error sending request for url (http://127.0.0.1:1/b/k)"),
    OSError("AWS Error SLOW_DOWN during PutObject operation: SlowDown: Please reduce your request rate."),
    ConnectionResetError("[Errno 104] Connection reset by peer"),
    TimeoutError("read timed out"),
]
PERMANENT = [
    FileNotFoundError("Path does not exist 'b/x'"),
    OSError("AWS Error ACCESS_DENIED during GetObject operation: AccessDenied"),
    OSError("AWS Error NO_SUCH_BUCKET during ListObjectsV2 operation: NoSuchBucket"),
    ValueError("negative version -1"),
    ItemError("blob x is missing", reason="missing"),
    StoreUnavailable("the store s3://b did not answer for 120 s"),  # an inner loop already waited
]


@pytest.mark.parametrize("exc", TRANSIENT, ids=lambda e: str(e)[:40])
def test_store_faults_are_transient_also_after_translation(exc):
    assert is_transient(exc)
    translated = translate(exc, "read blob", "abc")
    assert isinstance(translated, StoreError) and is_transient(translated)


@pytest.mark.parametrize("exc", PERMANENT, ids=lambda e: str(e)[:40])
def test_answers_that_retrying_cannot_change_are_not(exc):
    assert not is_transient(exc)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_transient_failures_are_retried_until_the_store_answers():
    clock, calls = FakeClock(), []

    def flaky() -> str:
        calls.append(clock.now)
        if len(calls) < 4:
            raise OSError("curlCode: 7, Could not connect to server")
        return "bytes"

    policy = RetryPolicy(deadline_s=60, first_backoff_s=1, max_backoff_s=4)
    assert call_with_retries(flaky, policy=policy, action="read", target="blob", store="s3://b",
                             sleep=clock.sleep, clock=clock) == "bytes"
    assert len(calls) == 4
    assert all(0 <= s <= 4 for s in clock.sleeps)


def test_past_the_deadline_the_error_names_the_store_the_action_and_the_fix():
    clock = FakeClock()

    def down() -> None:
        raise OSError("curlCode: 7, Could not connect to server")

    policy = RetryPolicy(deadline_s=30, first_backoff_s=0.5, max_backoff_s=5)
    with pytest.raises(StoreUnavailable) as err:
        call_with_retries(down, policy=policy, action="read blob", target="abc123", store="s3://b/p",
                          sleep=clock.sleep, clock=clock)
    assert 30 <= clock.now <= 30 + 1e-6  # the last sleep is cut to the deadline
    text = str(err.value)
    assert "s3://b/p did not answer for 30 s" in text and "read blob abc123" in text
    assert "retry_deadline" in err.value.hint and not err.value.user_fault


def test_permanent_failures_are_raised_at_once_translated():
    calls = []

    def denied() -> None:
        calls.append(1)
        raise OSError("AWS Error ACCESS_DENIED during GetObject operation: AccessDenied")

    with pytest.raises(AccessDenied):
        call_with_retries(denied, policy=RetryPolicy(), action="read", target="x", store="s3://b",
                          translate=lambda e: translate(e, "read", "x"))
    assert calls == [1]


def test_backoff_grows_and_is_capped_with_full_jitter():
    policy = RetryPolicy(first_backoff_s=0.1, max_backoff_s=2)
    draws = [policy.backoff(n) for n in range(1, 12) for _ in range(50)]
    assert min(draws) >= 0 and max(draws) <= 2
    assert max(policy.backoff(1) for _ in range(200)) <= 0.1


def test_policy_from_the_store_uri_travels_with_the_location():
    loc = StoreLocation.parse("s3://bucket/prefix?retry_deadline=30&request_timeout=5")
    assert loc.uri == "s3://bucket/prefix"  # the store's identity has no options
    assert loc.retry.deadline_s == 30 and loc.retry.request_timeout_s == 5
    assert pickle.loads(pickle.dumps(loc)).retry == loc.retry
    assert loc.delta_storage_options()["timeout"] == "5s"
    assert StoreLocation.parse("file:///tmp/s?retry_deadline=2").retry.deadline_s == 2
    assert loc.retry.with_deadline(None) is loc.retry
    assert loc.retry.with_deadline(7).deadline_s == 7


@pytest.mark.parametrize("uri, match", [
    ("s3://b/p?retry_dedline=3", "unknown option 'retry_dedline'"),
    ("s3://b/p?retry_deadline=soon", "not a number of seconds"),
    ("s3://b/p?retry_deadline=-1", "must be a number >= 0"),
    ("s3://b/p?request_timeout=0", "timeouts must be > 0"),
])
def test_bad_uri_options_are_named(uri, match):
    with pytest.raises(ConfigError, match=match):
        StoreLocation.parse(uri)
