"""Skip ledger and remote-error recovery: pure parts of the one error policy."""

from __future__ import annotations

import pickle

from orchestrator.errors import ItemError, StoreUnavailable
from orchestrator.ray_runtime import orchestrator_error_in
from orchestrator.stream.skips import Skips


def test_skips_count_by_reason_keep_few_examples_and_merge():
    a = Skips()
    for i in range(7):
        a.add(ItemError(f"item {i}: blob missing", reason="missing"))
    a.add(ItemError("item x: corrupt", reason="corrupt"))
    assert a.count == 8 and a.by_reason == {"missing": 7, "corrupt": 1}
    assert len(a.examples) == 5 and a.examples[0] == "item 0: blob missing"
    b = pickle.loads(pickle.dumps(a))
    b.merge(a)
    assert b.count == 16 and len(b.examples) == 5
    text = a.summary("dataset 'street' version 0")
    assert text.startswith("skipped 8 item(s) of dataset 'street' version 0 (1 corrupt, 7 missing)")
    assert "orchestrator verify" in text and "on_error='raise'" in text


def test_an_orchestrator_error_is_recovered_from_a_ray_report():
    report = RuntimeError(
        "ray::MapBatches(FetchDecode)() (pid=1, ip=x)\n  File \"reader.py\", line 3\n"
        "orchestrator.errors.StoreUnavailable: the store s3://b/p did not answer for 3 s (6 attempts)\n"
        "  fix: check that the S3 server is running\n"
        "The above exception was the direct cause of the following exception:\n"
        "ray.exceptions.UserCodeException: UDF failed to process a data block.")
    found = orchestrator_error_in(report)
    assert isinstance(found, StoreUnavailable)
    assert found.message == "the store s3://b/p did not answer for 3 s (6 attempts)"
    assert found.hint == "check that the S3 server is running"
    chained = RuntimeError("wrapper")
    chained.__cause__ = ItemError("item 'a': missing", reason="missing")
    assert orchestrator_error_in(chained).reason == "missing"
    assert orchestrator_error_in(RuntimeError("plain")) is None


def test_a_ledger_closes_only_in_the_process_that_made_it(monkeypatch):
    """A forked DataLoader worker that collects an inherited Dataset runs its finalizer, which
    closes the Dataset's ledger: that must not touch the parent's Ray connection (it hung)."""
    import os

    import ray

    from orchestrator.adapters.ray import SkipLedger

    calls = []
    monkeypatch.setattr(SkipLedger, "_actor", lambda self, create: calls.append(os.getpid()))
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # as inherited by a forked child
    ledger = SkipLedger("orchestrator-skips-test", None)
    pid = os.fork()
    if pid == 0:  # the child: close must return without asking Ray anything
        ledger.close()
        os._exit(0 if not calls else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    ledger.close()  # the owner does ask
    assert calls == [os.getpid()]
