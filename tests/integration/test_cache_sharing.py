"""The node blob cache outlives DataLoader workers, Ray workers and epochs (issue 14).

Proof that a second epoch reads nothing from the store: the dataset's media (packs and loose
blobs) are deleted from the store between the epochs, and the second epoch still yields every
item with identical pixels; the same read with a fresh cache folder skips every item, so each
test can fail. The cache here is what ``node_cache()`` builds with ``ORCHESTRATOR_CACHE_DIR``
pointing at the test's folder (default memory tier, disk tier there): the session's own folder
is shared by every test, whose deterministic demo bytes would make a cold read impossible.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pyarrow.fs as pafs
import pytest

from orchestrator.stream.cache import BlobCache, DiskLRU

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _drop_media(store, name: str) -> None:
    """Delete every byte of the dataset's media from the store (the manifest stays)."""
    for kind in ("packs", "blobs"):
        store.fs.delete_dir_contents(store.location.join("datasets", name, kind), missing_dir_ok=True)
    for kind in ("packs", "blobs"):
        base = store.location.join("datasets", name, kind)
        left = store.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        assert not [i for i in left if i.type == pafs.FileType.File]


def _digests(items) -> dict[str, str]:
    """item id -> sha256 of its pixels and boxes."""
    out = {}
    for item in items:
        h = hashlib.sha256(np.ascontiguousarray(np.asarray(item["image"])).tobytes())
        h.update(np.asarray(item["boxes"], dtype=np.float32).tobytes())
        out[str(item["id"])] = h.hexdigest()
    return out


def test_dataloader_workers_forked_each_epoch_read_epoch_two_from_the_node_cache(street, tmp_path):
    from torch.utils.data import DataLoader

    cache = BlobCache(disk_dir=tmp_path / "node-cache")
    torch_ds = street.dataset("street", cache=cache).to_pytorch()
    loader = DataLoader(torch_ds, batch_size=None, num_workers=2, persistent_workers=False)
    first = _digests(loader)
    assert len(first) == 60
    _drop_media(street, "street")
    second = _digests(loader)  # new worker processes, empty memory tiers, no media in the store
    assert second == first and torch_ds.skipped == 0
    assert cache.stats.hits == cache.stats.misses == 0  # the workers read, not this process
    # verify checks the store, never the cache that still serves every item
    report = street.verify("street", progress=False)
    assert not report.ok and len(report.reingest) == 60

    cold = street.dataset("street", cache=BlobCache(disk_dir=tmp_path / "fresh")).to_pytorch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # each worker warns with its own summary
        assert list(DataLoader(cold, batch_size=None, num_workers=2)) == []
    assert cold.skipped == 60


def test_to_ray_iterated_twice_reads_epoch_two_from_the_node_cache(street, tmp_path):
    cache = BlobCache(disk_dir=tmp_path / "node-cache")
    ds = street.dataset("street", cache=cache)
    pipeline = ds.to_ray()
    first = _digests(pipeline.iter_rows())
    assert len(first) == 60
    _drop_media(street, "street")
    second = _digests(pipeline.iter_rows())  # a new execution: new fetch actors, same node cache
    assert second == first

    cold = street.dataset("street", cache=BlobCache(disk_dir=tmp_path / "fresh"))
    assert list(cold.to_ray().iter_rows()) == [] and cold.skipped == 60


def _drop_manifest_rows(store, ds) -> None:
    """Delete the version's manifest data files (Parquet): a reader that opens one now fails."""
    for path in ds.plan.snapshot.files:
        store.fs.delete_file(path)


def _dataloader_digests(loader) -> dict[str, str]:
    out = {}
    for batch in loader:
        offsets = batch["instance_offsets"].tolist()
        for i, item_id in enumerate(batch["id"]):
            h = hashlib.sha256(np.ascontiguousarray(batch["image"][i].numpy()).tobytes())
            h.update(batch["boxes"][offsets[i]:offsets[i + 1]].numpy().astype(np.float32).tobytes())
            out[str(item_id)] = h.hexdigest()
    return out


@pytest.mark.parametrize("path", ["iteration", "dataloader", "ray"])
def test_a_warm_epoch_reads_nothing_from_the_store_not_even_manifest_rows(street, tmp_path, monkeypatch, path):
    """Epoch two of the same reader with every media byte and every manifest data file gone
    from the store: the rows come from the reader (kept row groups, rows shipped in Ray read
    tasks), the media from the node cache; a fresh reader of the same version cannot read."""
    monkeypatch.setenv("ORCHESTRATOR_CACHE_DIR", str(tmp_path / "node-cache"))
    ds = street.dataset("street", cache=BlobCache(disk_dir=tmp_path / "node-cache"))
    if path == "iteration":
        epoch = lambda: _digests(ds)  # noqa: E731
    elif path == "dataloader":
        loader = ds.dataloader(batch_size=8, num_workers=2, image_size=64)
        epoch = lambda: _dataloader_digests(loader)  # noqa: E731
    else:
        pipeline = ds.to_ray()
        epoch = lambda: _digests(pipeline.iter_rows())  # noqa: E731
    first = epoch()
    assert len(first) == 60
    _drop_media(street, "street")
    _drop_manifest_rows(street, ds)
    assert epoch() == first
    with pytest.raises(Exception, match=r"manifest|\.parquet"):
        street.dataset("street")[0]


_READ_ALL = """
    import hashlib, json, logging, resource, signal, sys
    import numpy as np
    import orchestrator
    logging.basicConfig(level=logging.WARNING)
    if sys.argv[2] == "full":  # every write past 4 kB fails (EFBIG), as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    ds = orchestrator.connect(sys.argv[1]).dataset("street", on_error="raise")
    out = {}
    for item in ds:
        out[item["id"]] = hashlib.sha256(np.ascontiguousarray(item["image"]).tobytes()).hexdigest()
    print(json.dumps({"items": out, "cache": ds.cache_stats()}))
"""


@pytest.mark.parametrize("cache_dir", ["unwritable", "full"])
def test_a_cache_folder_that_cannot_take_writes_degrades_to_store_reads_with_one_warning(
        street, tmp_path, cache_dir):
    (tmp_path / "a-file").write_text("not a folder")
    folder = tmp_path / "a-file" / "blobs" if cache_dir == "unwritable" else tmp_path / "full-cache"
    reads = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(_READ_ALL), street.location.uri, cache_dir],
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, "ORCHESTRATOR_CACHE_DIR": str(folder)})
        assert r.returncode == 0, r.stderr
        assert r.stderr.count("blob cache: cannot") == 1, r.stderr
        reads.append(json.loads(r.stdout.strip().splitlines()[-1]))
    assert len(reads[0]["items"]) == 60 and reads[0]["items"] == reads[1]["items"]
    assert reads[1]["cache"]["disk_hits"] == 0 and reads[1]["cache"]["misses"] == 60  # from the store again
    if cache_dir == "full":  # nothing was cached (the folder opens, or starts over, empty)
        assert DiskLRU(folder, 1 << 30).count() == 0
