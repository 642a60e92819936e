"""A blob in the store is what its name says: verify finds damage, repair and re-ingest fix it,
and an interrupted upload never leaves a partial object under a blob's final name.

``--repair-from`` rewrites loose blobs only, so the repair tests ingest loose (``pack=False``);
on the packed default layout verify lists the bad items with the fix that works instead.
"""

from __future__ import annotations

import json
import shutil

import pyarrow.fs as pafs
import pytest

import orchestrator
from orchestrator.stream.cache import BlobCache
from tests.conftest import run_cli


def _ingest(store_uri, demo_small) -> tuple[orchestrator.Store, dict[str, str]]:
    """The demo ingested loose (one object per item): the layout these tests damage and repair."""
    store = orchestrator.connect(store_uri)
    store.ingest("street", coco=demo_small / "annotations.json", images=demo_small / "images", pack=False)
    rows = store.dataset("street").manifest_rows(["item_id", "blob"]).to_pylist()
    return store, {r["item_id"]: r["blob"] for r in rows}


def _overwrite(store: orchestrator.Store, blob: str, data: bytes) -> None:
    with store.fs.open_output_stream(store.blobs("street").path(blob)) as out:
        out.write(data)


def _read(store: orchestrator.Store, blob: str) -> bytes:
    with store.fs.open_input_stream(store.blobs("street").path(blob)) as f:
        return f.read()


def _reads_back(store: orchestrator.Store, item_id: str) -> dict:
    ds = store.dataset("street", cache=BlobCache(memory_budget=1), on_error="raise")
    return ds[ds.item_ids().index(item_id)]


def test_verify_finds_truncated_zeroed_and_swapped_blobs_and_repair_restores_them(
    ray_cluster, store_uri, demo_small, tmp_path
):
    store, blob_of = _ingest(store_uri, demo_small)
    truncated, zeroed, swap_a, swap_b = sorted(blob_of)[:4]
    original = {i: _read(store, blob_of[i]) for i in (truncated, zeroed, swap_a, swap_b)}
    _overwrite(store, blob_of[truncated], original[truncated][: len(original[truncated]) // 2])
    _overwrite(store, blob_of[zeroed], bytes(len(original[zeroed])))  # same size, wrong bytes
    _overwrite(store, blob_of[swap_a], original[swap_b])
    _overwrite(store, blob_of[swap_b], original[swap_a])

    result = run_cli("verify", "street", "--store", store_uri, "--json")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "error: 4 bad blobs remain" in result.stderr and "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    assert report["blobs_checked"] == len(set(blob_of.values())) and not report["ok"]
    bad = {b["items"][0]: b for b in report["bad"]}
    assert set(bad) == {truncated, zeroed, swap_a, swap_b}
    assert bad[truncated]["problem"] == "wrong size"
    assert bad[truncated]["actual_size"] == len(original[truncated]) // 2
    assert bad[zeroed]["problem"] == "wrong content"
    assert bad[swap_a]["content_sha256"] == blob_of[swap_b]  # names the blob it really holds
    assert {b["blob"] for b in report["bad"]} == {blob_of[i] for i in bad}

    # A source folder that lacks one of the files: the rest is repaired, that item is named.
    partial = tmp_path / "partial"
    shutil.copytree(demo_small / "images", partial)
    (partial / truncated).unlink()
    report = store.verify("street", repair_from=partial)
    assert sorted(report.repaired) == sorted(blob_of[i] for i in (zeroed, swap_a, swap_b))
    assert report.reingest == [truncated] and not report.ok

    result = run_cli("verify", "street", "--store", store_uri, "--repair", str(demo_small / "images"))
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "repaired 1 of 1" in result.stdout and "all 60 blobs" in result.stdout, result.stdout
    report = store.verify("street")
    assert report.ok and report.blobs_checked == 60 and report.bad == []
    for item_id, data in original.items():
        assert _read(store, blob_of[item_id]) == data
        assert _reads_back(store, item_id)["id"] == item_id


@pytest.mark.parametrize("pack", [False, True], ids=["loose-reingest", "packed-reingest"])
def test_reingest_reuploads_a_wrong_size_object_under_a_blobs_name(ray_cluster, store_uri, demo_small, pack):
    """A loose dataset with a wrong-size object under two blobs' names: a loose re-ingest
    uploads them again; a packed one (the default) packs their media and points the rows there,
    instead of re-using the damaged objects."""
    store, blob_of = _ingest(store_uri, demo_small)
    empty_id, cut_id = sorted(blob_of)[:2]
    whole = _read(store, blob_of[cut_id])
    _overwrite(store, blob_of[empty_id], b"")  # what a killed upload left behind
    _overwrite(store, blob_of[cut_id], whole[:1000])

    report = store.ingest("street", coco=demo_small / "annotations.json", images=demo_small / "images",
                          pack=pack)
    assert (report.blobs_uploaded, report.blobs_reused) == (2, 58)
    rows = {r["item_id"]: r["pack"] for r in store.dataset("street").manifest_rows(["item_id", "pack"]).to_pylist()}
    if pack:
        assert rows[empty_id] and rows[cut_id]  # the damaged two packed, the others still loose
        assert sum(p is None for p in rows.values()) == 58
    else:
        assert _read(store, blob_of[cut_id]) == whole
        assert all(p is None for p in rows.values())
    for item_id in (empty_id, cut_id):
        assert _reads_back(store, item_id)["id"] == item_id
    assert store.verify("street").ok


def test_verify_never_repairs_packed_bytes_and_says_what_fixes_them(ray_cluster, store_uri, demo_small):
    """Packed (the default): one item's bytes flipped inside a whole pack, another pack deleted.
    ``--repair-from`` a folder holding every source file repairs nothing and rewrites no pack;
    it lists the lost pack's items for re-ingest and the flipped item for delete-then-re-ingest,
    and both pieces of advice are then followed and shown to be what fixes them."""
    store = orchestrator.connect(store_uri)
    coco, images = demo_small / "annotations.json", demo_small / "images"
    store.ingest("street", coco=coco, images=images, pack_mb=1)  # >= 2 packs of the 60 images
    rows = sorted(store.dataset("street").manifest_rows(["item_id", "pack", "pack_offset"]).to_pylist(),
                  key=lambda r: (r["pack"], r["pack_offset"]))
    assert all(r["pack"] for r in rows)
    packs = store.handle.packs("street")
    kept, gone = rows[0]["pack"], rows[-1]["pack"]
    assert kept != gone
    victim = rows[1]["item_id"]
    with store.fs.open_input_stream(packs.path(kept)) as f:
        flipped = bytearray(f.read())
    flipped[rows[1]["pack_offset"] + 5] ^= 0xFF
    with store.fs.open_output_stream(packs.path(kept)) as out:
        out.write(bytes(flipped))
    store.fs.delete_file(packs.path(gone))
    lost = sorted(r["item_id"] for r in rows if r["pack"] == gone)

    result = run_cli("verify", "street", "--store", store_uri, "--repair-from", str(images), "--json")
    assert result.returncode == 1, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["repaired"] == [] and not report["ok"]
    assert report["packed_reingest"] == lost and report["packed_delete_first"] == [victim]
    assert report["reingest"] == sorted([*lost, victim])
    assert all(b["pack"] in (kept, gone) for b in report["bad"])
    fixes = [line for line in result.stderr.splitlines() if "fix:" in line]
    assert len(fixes) == 2 and "--repair-from" not in result.stderr, result.stderr
    assert f"ingest the source of the {len(lost)} packed items" in fixes[0]
    assert "orchestrator delete --dataset street" in fixes[1]
    with store.fs.open_input_stream(packs.path(kept)) as f:
        assert f.read() == bytes(flipped)  # not rewritten
    assert store.fs.get_file_info(packs.path(gone)).type == pafs.FileType.NotFound

    text = run_cli("verify", "street", "--store", store_uri, "--repair-from", str(images)).stdout
    assert f"repaired 0 of 0 loose blobs from {images}; {len(lost) + 1} packed blobs cannot be " \
           "repaired in place (packs are immutable)" in text, text
    assert f"packed items to re-ingest (their media are packed again) ({len(lost)}): " in text, text
    assert f"packed items to delete, then re-ingest (a re-ingest alone would point at the same damaged " \
           f"bytes) (1): {victim}" in text, text
    assert "[repaired]" not in text

    store.ingest("street", coco=coco, images=images, pack_mb=1)  # the advice for the lost pack
    again = store.verify("street", progress=False)
    assert again.reingest == [victim] and again.packed_delete_first == [victim]  # re-ingest alone: not fixed
    store.delete("street", [victim])  # the advice for the flipped item
    store.ingest("street", coco=coco, images=images, pack_mb=1)
    fixed = store.verify("street", progress=False)
    assert fixed.ok and fixed.blobs_checked == 60, fixed.summary()


class _Interrupted(BaseException):
    """What a signal handler raises in a worker (Ray turns SIGTERM into SystemExit)."""


class _StreamInterruptedBeforeWrite:
    def __init__(self, stream):
        self._stream = stream

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stream.close()  # what pyarrow's NativeFile.__exit__ does: completes the upload

    def write(self, data):
        raise _Interrupted

    def close(self):
        self._stream.close()


class _FilesystemInterruptingBlobWrites:
    """The store's filesystem, except that the first blob write is interrupted before its first
    byte: the timing the signal hit in the field, made deterministic."""

    def __init__(self, fs: pafs.FileSystem):
        self._fs = fs
        self.interrupted = 0

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def open_output_stream(self, path, *args, **kwargs):
        stream = self._fs.open_output_stream(path, *args, **kwargs)
        if self.interrupted:
            return stream
        self.interrupted += 1
        return _StreamInterruptedBeforeWrite(stream)


@pytest.mark.s3
def test_an_upload_interrupted_before_its_first_byte_leaves_nothing_under_the_blob_name(
    seaweed, monkeypatch
):
    import hashlib
    import os
    import uuid

    from orchestrator.blobs import BlobStore

    store = orchestrator.connect(f"s3://orchestrator-test/{uuid.uuid4().hex[:12]}")
    blobs = store.blobs("street")
    data = os.urandom(37_014)
    blob = hashlib.sha256(data).hexdigest()
    flaky = _FilesystemInterruptingBlobWrites(store.fs)
    monkeypatch.setattr(BlobStore, "fs", property(lambda self: flaky))
    with pytest.raises(_Interrupted):
        blobs.put(blob, data)
    assert flaky.interrupted == 1
    info = store.fs.get_file_info(blobs.path(blob))
    assert info.type == pafs.FileType.NotFound, f"a {info.size}-byte object under the blob's name"
    assert blobs.put(blob, data) is True  # the rerun uploads it, whole
    assert _read(store, blob) == data
