"""`orchestrator policy show|set|check|compile` as a user runs them."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.conftest import BUCKET, run_cli
from tests.integration.test_access import POLICY

pytestmark = pytest.mark.s3


def test_policy_cli_round_trip(seaweed, tmp_path) -> None:
    uri = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"
    r = run_cli("policy", "show", "--store", uri)
    assert r.returncode == 0 and "no access policy" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("roles: {r: {grants: [{datasets: 'a*b', actions: [read]}]}}")
    r = run_cli("policy", "set", "--store", uri, str(bad))
    assert r.returncode == 2 and "roles.r.grants.0.datasets" in r.stderr and "Traceback" not in r.stderr
    good = tmp_path / "policy.yaml"
    good.write_text(POLICY)
    r = run_cli("policy", "set", "--store", uri, str(good), "--message", "first")
    assert r.returncode == 0 and "policy version 0" in r.stdout, r.stderr
    r = run_cli("policy", "show", "--store", uri)
    assert r.returncode == 0 and "policy version 0" in r.stdout and "street-reader" in r.stdout
    r = run_cli("policy", "check", "--store", uri, "--principal", "bob", "read", "street")
    assert r.returncode == 0 and "attributes.consent = 'yes'" in r.stdout and "attributes.gps" in r.stdout
    r = run_cli("policy", "check", "--store", uri, "--principal", "bob", "read", "street", "--json")
    decision = json.loads(r.stdout)
    assert r.returncode == 0 and decision["allowed"] and decision["policy_version"] == 0
    assert decision["hidden_fields"] == ["attributes.gps", "instances.attributes.plate"]
    assert "attributes.consent = 'yes'" in decision["row_filter"]
    r = run_cli("policy", "check", "--store", uri, "--principal", "bob", "write", "street")
    assert r.returncode == 4 and "denied" in r.stdout
    r = run_cli("policy", "check", "--store", uri, "--principal", "bob", "write", "street", "--json")
    assert r.returncode == 4 and json.loads(r.stdout)["allowed"] is False
    r = run_cli("policy", "show", "--store", uri, "--json")
    shown = json.loads(r.stdout)
    assert shown["version"] == 0 and shown["message"] == "first" and "street-reader" in shown["text"]
    r = run_cli("policy", "check", "--store", uri, "read", "anything")  # as alice (the env's key)
    assert r.returncode == 0 and "'alice'" in r.stdout
    r = run_cli("policy", "compile", "--store", uri, "--target", "aws", "--json")
    wrapped = json.loads(r.stdout)
    assert wrapped["target"] == "aws" and wrapped["policy_version"] == 0
    docs = wrapped["rules"]
    assert set(docs) == {"_every_principal", "admin", "street-reader"}
    reader = json.dumps(docs["street-reader"])
    assert "datasets/street/*" in reader and "s3:PutObject" not in reader
    secrets = tmp_path / "keys.json"
    secrets.write_text(json.dumps({"test-access": "s1", "bob-key": "s2"}))
    r = run_cli("policy", "compile", "--store", uri, "--target", "seaweedfs", "--secrets", str(secrets))
    assert r.returncode == 2 and "erin-key" in r.stderr  # every key needs its secret
    secrets.write_text(json.dumps({"test-access": "s1", "bob-key": "s2", "erin-key": "s3"}))
    r = run_cli("policy", "compile", "--store", uri, "--target", "seaweedfs", "--secrets", str(secrets))
    ids = {i["name"]: i for i in json.loads(r.stdout)["identities"]}
    assert not any(a.startswith("Write:") and "datasets" in a for a in ids["bob"]["actions"])
    assert f"Read:{uri[5:]}/datasets/street/*" in ids["bob"]["actions"]
