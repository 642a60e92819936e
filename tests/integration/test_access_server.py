"""Access control enforced by the storage server itself (layer 1) and carried into training.

A SeaweedFS server with authentication on: identities are generated from the store's policy by
``orchestrator policy compile --target seaweedfs`` and loaded with SIGHUP. Before any check the
tests wait until the server really enforces them (a wrong secret refused, a denied write
refused), since accepting requests right after start would make every assertion meaningless.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

import orchestrator
from orchestrator.access.server_rules import seaweed_identities
from orchestrator.errors import AccessDenied
from orchestrator.store_location import S3Credentials
from tests.conftest import run_cli
from tests.integration.test_access import (
    N,
    check_framework_paths,
    check_sdk_paths,
    expected_ids,
    policy_text,
    write_jsonl,
)

pytestmark = [pytest.mark.s3]

BUCKET = "governed"
ROOT = f"{BUCKET}/team"
# access key id -> secret, drawn per test session: only this process knows the secrets (a copy of
# this file, e.g. a job's uploaded working dir, must not contain them)
KEYS = {key: f"{key.split('-')[0]}-{secrets.token_hex(20)}"
        for key in ("alice-key", "bob-key", "erin-key", "probe-key")}
POLICY = policy_text("alice-key", "street")


def _code(call) -> str:
    try:
        call()
    except ClientError as exc:
        return exc.response["Error"]["Code"]
    return "OK"


def wait_until_enforced(server, deadline_s: float = 30.0) -> None:
    """Until a wrong secret and an unknown key are refused and the probe identity (no
    actions) is denied a read: proof that authentication and authorization are both on."""
    end = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < end:
        wrong = server.client("probe-key", "not-the-secret")
        unknown = server.client("nobody-key", "whatever")
        probe = server.client("probe-key", KEYS["probe-key"])
        # Each lambda is called at once, in this iteration (noqa: B023).
        last = (_code(lambda: wrong.get_object(Bucket=BUCKET, Key="team/x")),  # noqa: B023
                _code(lambda: unknown.get_object(Bucket=BUCKET, Key="team/x")),  # noqa: B023
                _code(lambda: probe.get_object(Bucket=BUCKET, Key="team/x")))  # noqa: B023
        if last == ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied"):
            return
        time.sleep(0.2)
    raise AssertionError(f"the server never enforced its identities: {last}")


def write_identities(path: Path, policy_text: str | None) -> None:
    from orchestrator.access.policy import parse_policy

    if policy_text is None:  # bootstrap: alice is the server admin, nobody else exists yet
        doc = {"identities": [{"name": "alice", "actions": ["Admin"],
                               "credentials": [{"accessKey": "alice-key", "secretKey": KEYS["alice-key"]}]}]}
    else:
        doc = seaweed_identities(parse_policy(policy_text), ROOT, KEYS)
        doc["identities"][0]["actions"].append("Admin")  # alice also administers the server (buckets)
    doc["identities"].append({"name": "probe", "actions": [],
                              "credentials": [{"accessKey": "probe-key", "secretKey": KEYS["probe-key"]}]})
    path.write_text(json.dumps(doc))


def creds(server, key: str, secret: str | None = None) -> S3Credentials:
    return S3Credentials(access_key=key, secret_key=secret or KEYS[key],
                         endpoint_url=server.endpoint_url, region="us-east-1")


@pytest.fixture(scope="module")
def secured(tmp_path_factory, ray_cluster, demo_small):
    from orchestrator.dev.seaweed import SeaweedServer

    base = tmp_path_factory.mktemp("secured")
    config = base / "s3.json"
    write_identities(config, None)
    server = SeaweedServer(base / "data", s3_config=config)
    server.start()
    try:
        wait_until_enforced(server)
        server.create_bucket(BUCKET, "alice-key", KEYS["alice-key"])
        uri = f"s3://{ROOT}"
        admin = orchestrator.connect(uri, credentials=creds(server, "alice-key"))
        src = write_jsonl(demo_small, base)
        admin.ingest("street", jsonl=src)
        admin.ingest("other", jsonl=src)
        admin.set_policy(POLICY)
        # what an operator does: compile the policy into the server's identities and reload
        write_identities(config, admin.policy().text)
        os.kill(server.pid, signal.SIGHUP)
        bob = server.client("bob-key", KEYS["bob-key"])
        deadline = time.monotonic() + 30
        while _code(lambda: bob.list_objects_v2(Bucket=BUCKET, Prefix="team/datasets/street/")) != "OK":
            assert time.monotonic() < deadline, "the server never loaded the compiled identities"
            time.sleep(0.2)
        wait_until_enforced(server)
        yield server, uri
    finally:
        server.stop()


def test_reader_streams_its_rows_and_cannot_ingest(secured, demo_small, tmp_path) -> None:
    server, uri = secured
    bob = orchestrator.connect(uri, credentials=creds(server, "bob-key"))
    assert bob.principal == "bob"
    ds = bob.dataset("street")
    assert sorted(item["id"] for item in ds) == expected_ids()
    assert all("gps" not in item["attributes"] for item in ds)
    assert bob.datasets() == ["street"]  # listing datasets/ is refused by the server: from grants
    with pytest.raises(AccessDenied, match="'bob' may not write dataset 'street'"):
        bob.ingest("street", jsonl=write_jsonl(demo_small, tmp_path))
    admin = orchestrator.connect(uri, credentials=creds(server, "alice-key"))
    assert [v.items for v in admin.versions("street")] == [N]


def test_reader_sees_its_rows_through_every_path(secured) -> None:
    server, uri = secured
    ds = orchestrator.connect(uri, credentials=creds(server, "bob-key")).dataset("street")
    check_sdk_paths(ds)
    check_framework_paths(ds)


def test_raw_s3_with_a_readers_keys_cannot_write_or_read_other_datasets(secured) -> None:
    server, _ = secured
    bob = server.client("bob-key", KEYS["bob-key"])
    listed = bob.list_objects_v2(Bucket=BUCKET, Prefix="team/datasets/street/")["Contents"]
    some_blob = next(o["Key"] for o in listed if "/packs/" in o["Key"])  # media: packed by default
    assert _code(lambda: bob.get_object(Bucket=BUCKET, Key=some_blob)) == "OK"  # its own dataset
    assert _code(lambda: bob.put_object(Bucket=BUCKET, Key=some_blob, Body=b"x")) == "AccessDenied"
    assert _code(lambda: bob.delete_object(Bucket=BUCKET, Key=some_blob)) == "AccessDenied"
    other_blob = some_blob.replace("/street/", "/other/")  # same content, the other dataset
    assert _code(lambda: bob.get_object(Bucket=BUCKET, Key=other_blob)) == "AccessDenied"
    assert _code(lambda: bob.list_objects_v2(Bucket=BUCKET, Prefix="team/datasets/other/")) == "AccessDenied"
    assert _code(lambda: bob.put_object(Bucket=BUCKET, Key="team/_policy/policy.yaml", Body=b"x")) == "AccessDenied"
    alice = server.client("alice-key", KEYS["alice-key"])
    assert _code(lambda: alice.get_object(Bucket=BUCKET, Key=other_blob)) == "OK"  # it exists


def test_no_grant_is_denied_by_sdk_and_server(secured) -> None:
    server, uri = secured
    erin = orchestrator.connect(uri, credentials=creds(server, "erin-key"))
    with pytest.raises(AccessDenied, match="'erin' may not read dataset 'street'"):
        erin.dataset("street")
    raw = server.client("erin-key", KEYS["erin-key"])
    log_key = "team/datasets/street/manifest/_delta_log/00000000000000000000.json"
    assert _code(lambda: raw.get_object(Bucket=BUCKET, Key=log_key)) == "AccessDenied"


def test_wrong_keys_fail_with_a_clear_message(secured) -> None:
    server, uri = secured
    with pytest.raises(AccessDenied, match="rejected the credentials") as e:
        orchestrator.connect(uri, credentials=creds(server, "bob-key", "wrong-secret"))
    assert "AWS_SECRET_ACCESS_KEY" in (e.value.hint or "")
    r = run_cli("datasets", "--store", uri, env={"AWS_ACCESS_KEY_ID": "bob-key",
                                                 "AWS_SECRET_ACCESS_KEY": "wrong-secret",
                                                 "AWS_ENDPOINT_URL": server.endpoint_url})
    assert r.returncode == 4 and "rejected the credentials" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_as_a_reader_sees_its_rows_and_leaks_no_secret(secured, ray_cluster, tmp_path) -> None:
    import ray

    server, uri = secured
    env = {"AWS_ACCESS_KEY_ID": "bob-key", "AWS_SECRET_ACCESS_KEY": KEYS["bob-key"],
           "AWS_ENDPOINT_URL": server.endpoint_url, "AWS_REGION": "us-east-1"}
    r = run_cli("train", str(Path(__file__).resolve().parents[2] / "configs/street_torch.yaml"),
                "--set", f"store={uri}", "--set", "train.epochs=2", "--set", "train.batch_size=4",
                "--set", "model.image_size=64", "--set", "split.validation_fraction=0.0",
                "--json", env=env, timeout=540)
    assert r.returncode == 0, r.stderr[-4000:]
    lineage = json.loads(r.stdout)
    assert lineage["principal"] == "bob" and lineage["policy_version"] == 0
    assert lineage["items"]["train"] == len(expected_ids())
    per_epoch = (len(expected_ids()) // 2) * 2  # equal shards of the visible items
    assert [m["train_items"] for m in lineage["metrics"]] == [per_epoch, per_epoch]

    # every artifact the run wrote: lineage and checkpoints in the store, Ray's logs, the job table
    alice = server.client("alice-key", KEYS["alice-key"])
    keys = [o["Key"] for o in alice.list_objects_v2(Bucket=BUCKET, Prefix="team/runs/bob/")["Contents"]]
    assert any(k.endswith("lineage.json") for k in keys) and any("/checkpoint_" in k for k in keys)
    artifacts = {k: alice.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    for f in session.rglob("*"):
        if f.is_file() and f.stat().st_size < 50_000_000:
            artifacts[str(f)] = f.read_bytes()
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(ray_cluster.dashboard).list_jobs()
    artifacts["ray job table"] = json.dumps([j.model_dump() if hasattr(j, "model_dump") else str(j) for j in jobs],
                                            default=str).encode()
    artifacts["cli output"] = (r.stdout + r.stderr).encode()
    assert len(artifacts) > 20
    for secret in (KEYS["bob-key"], KEYS["alice-key"]):
        leaked = [name for name, data in artifacts.items() if secret.encode() in data]
        assert not leaked, f"secret found in {leaked[:5]}"
