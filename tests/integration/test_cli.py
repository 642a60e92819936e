"""The ``orchestrator`` command as a user runs it: outputs, exit codes, and clear errors."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_ingest_versions_info_delete_round_trip(store_uri, demo_small):
    coco, images = str(demo_small / "annotations.json"), str(demo_small / "images")
    r = run_cli("ingest", "--store", store_uri, "--dataset", "street", "--coco", coco,
                "--images", images, "--json", "--message", "first import")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert report["version"] == 0 and report["items"] == 60 and report["rejected"] == []
    assert set(report) >= {"version", "items", "rejected", "blobs_uploaded", "blobs_reused", "warnings"}

    r = run_cli("datasets", "--store", store_uri, "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == ["street"]

    r = run_cli("delete", "--store", store_uri, "--dataset", "street", "--items", "street_000000.jpg")
    assert r.returncode == 0, r.stderr
    assert "version 1" in r.stdout

    r = run_cli("versions", "--store", store_uri, "street", "--json")
    rows = json.loads(r.stdout)
    assert [(v["version"], v["items"], v["operation"]) for v in rows] == [(0, 60, "ingest"), (1, 59, "delete")]
    assert rows[0]["message"] == "first import" and rows[0]["principal"]

    r = run_cli("versions", "--store", store_uri, "street", env={"ORCHESTRATOR_PRINCIPAL": "ana"})
    assert r.returncode == 0 and "VERSION" in r.stdout and "first import" in r.stdout

    r = run_cli("info", "--store", store_uri, "street", "--version", "0", "--json")
    info = json.loads(r.stdout)
    assert info["items"] == 60 and set(info["labels"]) == {"car", "pedestrian", "traffic light", "bicycle"}
    assert all(v > 0 for v in info["labels"].values())


def test_strict_refuses_rejections_and_commits_nothing(store_uri, demo_small, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(demo_small / "images", images)
    (images / "street_000003.jpg").write_bytes(b"")  # one broken file
    r = run_cli("ingest", "--store", store_uri, "--dataset", "street", "--coco",
                str(demo_small / "annotations.json"), "--images", str(images), "--strict", "--json")
    assert r.returncode == 3
    report = json.loads(r.stdout)
    assert report["version"] is None
    assert report["rejected"] == [{"file": "street_000003.jpg", "reason": "empty file"}]
    assert "--strict" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("datasets", "--store", store_uri, "--json")
    if store_uri.startswith("file://"):  # nothing was written, so the store was never created
        assert r.returncode == 2 and "does not exist" in r.stderr and r.stdout == ""
    else:  # the bucket exists: an empty store
        assert r.returncode == 0 and json.loads(r.stdout) == []

    # Without --strict the same input lands, minus the broken file.
    r = run_cli("ingest", "--store", store_uri, "--dataset", "street", "--coco",
                str(demo_small / "annotations.json"), "--images", str(images), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["items"] == 59


@pytest.mark.parametrize(
    "args, needle",
    [
        (["versions", "--store", "file:///tmp/orchestrator-no-such-store", "nope"], "does not exist"),
        (["versions", "--store", "ftp://x/y", "nope"], "unsupported store URI"),
        (["versions", "--store", "relative/path", "nope"], "unsupported store URI"),
        (["ingest", "--store", "file:///tmp/o-cli", "--dataset", "bad name!", "--jsonl", "x.jsonl"],
         "invalid dataset name"),
        (["ingest", "--store", "file:///tmp/o-cli", "--dataset", "d", "--coco", "/nonexistent/ann.json",
          "--images", "/tmp"], "annotation file not found"),
        (["ingest", "--store", "file:///tmp/o-cli", "--dataset", "d", "--coco", "/nonexistent/ann.json"],
         "needs images=DIR"),
        (["ingest", "--store", "file:///tmp/o-cli", "--dataset", "d", "--coco", "/nonexistent/ann.json",
          "--images", "/nonexistent/images"], "images folder '/nonexistent/images' does not exist"),
        (["ingest", "--store", "file:///tmp/o-cli", "--dataset", "d", "--jsonl", "x.jsonl",
          "--images", "/etc/hostname"], "is not a folder"),
        (["ingest", "--store", "file:///tmp/o-cli", "--dataset", "d", "--jsonl", "x.jsonl", "--pack", "--loose"],
         "--pack and --loose contradict each other"),
        (["ingest", "--store", "file:///tmp/o-cli", "--dataset", "d", "--jsonl", "x.jsonl", "--loose",
          "--pack-mb", "8"], "--pack-mb sets the size of packs, and --loose writes none"),
        (["info", "--store", "file:///tmp/o-cli-empty", "nope", "--version", "3"], "does not exist"),
        (["datasets"], "no store given"),
    ],
)
def test_user_errors_are_one_clear_line_not_a_traceback(args, needle):
    r = run_cli(*args, env={"ORCHESTRATOR_STORE": ""})
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert "fix:" in r.stderr or "error:" in r.stderr


def test_ingest_packs_by_default_and_loose_opts_out(demo_small, tmp_path):
    """No flag and ``--pack`` (accepted, the default) write packs; ``--loose`` one object per
    item under blobs/ and rows with no pack; the same items either way."""
    import orchestrator

    uri = f"file://{tmp_path / 'store'}"
    coco, images = str(demo_small / "annotations.json"), str(demo_small / "images")
    for name, flags in (("default", []), ("pack", ["--pack", "--pack-mb", "1"]), ("loose", ["--loose"])):
        r = run_cli("ingest", "--store", uri, "--dataset", name, "--coco", coco, "--images", images, *flags)
        assert r.returncode == 0, r.stderr[-3000:]
    store = orchestrator.connect(uri)
    objects = {name: {kind: sorted(p.name for p in (tmp_path / "store" / "datasets" / name / kind).rglob("*")
                                   if p.is_file())
                      for kind in ("blobs", "packs")} for name in ("default", "pack", "loose")}
    packs = {name: [r["pack"] for r in store.dataset(name).manifest_rows(["pack"]).to_pylist()]
             for name in objects}
    assert len(objects["default"]["packs"]) == 1 and objects["default"]["blobs"] == []  # one 32 MB pack
    assert len(objects["pack"]["packs"]) >= 2 and objects["pack"]["blobs"] == []  # --pack-mb 1
    assert set(packs["default"]) == set(objects["default"]["packs"])
    assert set(packs["pack"]) == set(objects["pack"]["packs"])
    assert objects["loose"]["packs"] == [] and len(objects["loose"]["blobs"]) == 60
    assert packs["loose"] == [None] * 60
    ids = store.dataset("default").item_ids()
    assert store.dataset("pack").item_ids() == ids == store.dataset("loose").item_ids() and len(ids) == 60


def test_unknown_version_lists_the_range(store_uri, demo_small):
    run_cli("ingest", "--store", store_uri, "--dataset", "street", "--coco",
            str(demo_small / "annotations.json"), "--images", str(demo_small / "images"))
    r = run_cli("info", "--store", store_uri, "street", "--version", "7")
    assert r.returncode == 2 and "no version 7 (versions 0..0 exist)" in r.stderr


def test_unreachable_s3_endpoint_is_a_clear_system_error():
    # A refused connection is a transient fault: retried for the URI's deadline (120 s by
    # default, which was this test's whole run time), then one clear error.
    r = run_cli("datasets", "--store", "s3://nobucket/x?retry_deadline=3",
                env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "a",
                     "AWS_SECRET_ACCESS_KEY": "b"})
    assert r.returncode == 1, r.stderr
    assert "unreachable" in r.stderr or "cannot open the store" in r.stderr
    assert "did not answer for 3 s" in r.stderr and "Traceback" not in r.stderr
