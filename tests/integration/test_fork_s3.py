"""A process that forks while its other threads read from S3 (a DataLoader starting workers
while a prefetch pool of an earlier iterator is still fetching) gets working children.

Before ``storage_errors.S3_REQUESTS`` every child forked during an S3 read hung in its own first
read (pyarrow's AWS SDK state was copied mid-request), and CI once saw such a DataLoader worker
die of SIGSEGV."""

from __future__ import annotations

import multiprocessing
import threading

import pytest

from orchestrator.stream.cache import BlobCache
from tests.support.waiting import fork_rounds

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _child_reads(ds, ids, results) -> None:
    results.put(sorted(ds[i]["id"] for i in ids))


@pytest.mark.parametrize("store_uri", ["s3"], indirect=True)
def test_children_forked_during_s3_reads_read_s3(street):
    tiny = BlobCache(memory_budget=1)  # nothing fits: every read in the parent goes to the server
    ds = street.dataset("street", cache=tiny)
    stop = threading.Event()

    def reading() -> None:
        n = 0
        while not stop.is_set():
            ds[n % len(ds)]
            n += 1

    threads = [threading.Thread(target=reading, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    results = multiprocessing.get_context("fork").Queue()
    try:
        fork_rounds(_child_reads, lambda _, k: (street.dataset("street"), [k, k + 7], results), 6,
                    "(forked during S3 reads)", timeout=30)
        loader = street.dataset("street").dataloader(batch_size=8, num_workers=2)
        assert sorted(i for b in loader for i in b["id"]) == sorted(ds.item_ids())
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    ids = ds.item_ids()
    assert sorted(results.get(timeout=10) for _ in range(12)) == sorted(
        sorted(ids[i] for i in (k, k + 7)) for _ in range(6) for k in range(2))
