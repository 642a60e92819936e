"""Access control in the library (layer 2): row filters, hidden fields, refused writes.

Principals are recognised by the access key id of the credentials in use. Here the session's
SeaweedFS server accepts any key pair, so these tests isolate what the library enforces; the
storage server's own enforcement is tested against an authenticating server in
test_access_server.py.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest

import orchestrator
from orchestrator.errors import AccessDenied, ConfigError, QueryError
from orchestrator.store_location import S3Credentials
from tests.conftest import BUCKET, S3_KEY

pytestmark = pytest.mark.s3

ROW_FILTER = "attributes.consent = 'yes' and not 'restricted' in tags"


def policy_text(admin_key: str, reader_datasets: str) -> str:
    """alice (admin, ``admin_key``), bob (reads ``reader_datasets`` filtered, two fields hidden),
    erin (no grant)."""
    return f"""
principals:
  alice: {{roles: [admin], access_keys: [{admin_key}]}}
  bob: {{roles: [street-reader], access_keys: [bob-key]}}
  erin: {{roles: [], access_keys: [erin-key]}}
roles:
  admin:
    grants: [{{datasets: "*", actions: [admin]}}]
  street-reader:
    grants:
      - datasets: {reader_datasets}
        actions: [read]
        row_filter: "{ROW_FILTER}"
        hidden_fields: [attributes.gps, instances.attributes.plate]
"""


POLICY = policy_text(S3_KEY, '["street", "street-*"]')
N = 30


def visible(i: int) -> bool:
    return i % 3 != 0 and i % 5 != 0  # consent yes, not restricted


def write_jsonl(demo: Path, out: Path) -> Path:
    """``out/items.jsonl`` over copies of the first N demo images in ``out/images`` (ingest reads
    only paths relative to, and inside, the JSONL file's folder)."""
    images = sorted((demo / "images").iterdir())[:N]
    (out / "images").mkdir(exist_ok=True)
    lines = []
    for i, img in enumerate(images):
        shutil.copyfile(img, out / "images" / img.name)
        lines.append(json.dumps({
            "item_id": f"item-{i:02d}", "path": f"images/{img.name}",
            "attributes": {"consent": "yes" if i % 3 else "no", "gps": f"{i}.0,{i}.5", "city": "oslo"},
            "tags": ["restricted"] if i % 5 == 0 else ["ok"],
            "instances": [{"label": "car", "bbox": [1, 1, 20, 20],
                           "attributes": {"plate": f"P-{i}", "color": "red"}}],
        }))
    path = out / "items.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def as_principal(uri: str, key: str) -> orchestrator.Store:
    import os

    creds = S3Credentials(access_key=key, secret_key="any-secret",
                          endpoint_url=os.environ["AWS_ENDPOINT_URL"], region="us-east-1")
    return orchestrator.connect(uri, credentials=creds)


@pytest.fixture(scope="module")
def governed(seaweed, ray_cluster, demo_small, tmp_path_factory):
    """A store with dataset 'street' (30 items) and 'other', then the policy above."""
    uri = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"
    admin = orchestrator.connect(uri)
    src = write_jsonl(demo_small, tmp_path_factory.mktemp("jsonl"))
    admin.ingest("street", jsonl=src)
    admin.ingest("other", jsonl=src)
    assert admin.set_policy(POLICY, message="first policy") == 0
    return uri


def expected_ids() -> list[str]:
    return [f"item-{i:02d}" for i in range(N) if visible(i)]


def assert_redacted(item: dict) -> None:
    assert "gps" not in item["attributes"] and item["attributes"]["city"] == "oslo"
    for attrs in item["instance_attributes"]:
        assert "plate" not in attrs and attrs["color"] == "red"


def check_sdk_paths(ds) -> None:
    """len, ids, manifest rows, iteration, ds[i] and slices: exactly the filtered items, redacted."""
    assert len(ds) == len(expected_ids()) and ds.item_ids() == expected_ids()
    rows = ds.manifest_rows().to_pylist()
    assert all(all(k != "gps" for k, _ in r["attributes"]) for r in rows)
    assert all(all(k != "plate" for k, _ in inst["attributes"]) for r in rows for inst in r["instances"])
    items = list(ds)
    assert sorted(i["id"] for i in items) == expected_ids()
    for item in items + [ds[0], ds[-1]]:
        assert_redacted(item)
    sliced = ds.slice("attributes.city = 'oslo'")
    assert sliced.item_ids() == expected_ids()  # the row filter still applies under a slice
    assert ds.query is None  # the policy's filter is not the user's query


def check_framework_paths(ds) -> None:
    """to_pytorch (2 forked DataLoader workers), to_tensorflow, to_ray: the same items, redacted."""
    from torch.utils.data import DataLoader

    from orchestrator.adapters.torch import collate_items

    seen = []
    for batch in DataLoader(ds.to_pytorch(), batch_size=4, num_workers=2, collate_fn=collate_items):
        seen += batch["id"]
        for attrs in batch["attributes"]:
            assert "gps" not in attrs
        for inst in batch["instance_attributes"]:
            assert all("plate" not in a for a in inst)
    assert sorted(seen) == expected_ids()

    tf_ids, tf_attrs = [], []
    for el in ds.to_tensorflow():
        tf_ids.append(el["id"].numpy().decode())
        tf_attrs.append(json.loads(el["attributes"].numpy()))
        assert "plate" not in el["instance_attributes"].numpy().decode()
    assert sorted(tf_ids) == expected_ids() and all("gps" not in a for a in tf_attrs)

    rows = ds.to_ray().take_all()
    assert sorted(r["id"] for r in rows) == expected_ids()
    assert all("gps" not in json.loads(r["attributes"]) for r in rows)
    assert all("plate" not in r["instance_attributes"] for r in rows)


def test_reader_sees_exactly_the_filtered_items_without_hidden_fields(governed) -> None:
    bob = as_principal(governed, "bob-key")
    assert bob.principal == "bob" and bob.access.policy_version == 0
    check_sdk_paths(bob.dataset("street"))


def test_reader_frameworks_see_the_same(governed, ray_cluster) -> None:
    check_framework_paths(as_principal(governed, "bob-key").dataset("street"))


@pytest.mark.parametrize("fmt", ["coco", "jsonl"])
def test_reader_exports_only_what_the_policy_shows(governed, tmp_path, fmt) -> None:
    """An export is the principal's view: the filtered items, never a hidden field, anywhere in
    the files written (the hidden values are searched for as text)."""
    report = as_principal(governed, "bob-key").dataset("street").export(tmp_path / "out", fmt)
    assert report.items == len(expected_ids())
    text = "".join(p.read_text(encoding="utf-8") for p in (tmp_path / "out").glob("*.json*"))
    assert "gps" not in text and "plate" not in text and "P-1" not in text and "'P-" not in text
    assert "oslo" in text and "red" in text  # the visible fields are there
    exported = json.loads((tmp_path / "out" / "export.json").read_text())
    assert exported["principal"] == "bob"
    if fmt == "jsonl":
        ids = [json.loads(line)["item_id"] for line in (tmp_path / "out" / "items.jsonl").read_text().splitlines()]
    else:
        ids = [im["item_id"] for im in json.loads((tmp_path / "out" / "annotations.json").read_text())["images"]]
    assert ids == expected_ids()


def test_reader_cannot_query_hidden_fields(governed) -> None:
    ds = as_principal(governed, "bob-key").dataset("street")
    with pytest.raises(QueryError, match="hidden"):
        ds.slice("attributes.gps = '1.0,1.5'")


def test_reader_cannot_write_and_nothing_changes(governed, demo_small, tmp_path) -> None:
    bob = as_principal(governed, "bob-key")
    admin = orchestrator.connect(governed)
    before = [v.version for v in admin.versions("street")]
    src = write_jsonl(demo_small, tmp_path)
    with pytest.raises(AccessDenied, match="'bob' may not write dataset 'street'"):
        bob.ingest("street", jsonl=src)
    with pytest.raises(AccessDenied, match="write"):
        bob.delete("street", ["item-01"])
    with pytest.raises(AccessDenied, match="policy"):
        bob.set_policy(POLICY.replace("[read]", "[admin]"))
    assert [v.version for v in admin.versions("street")] == before
    assert admin.policy().version == 0


def test_no_grant_and_unknown_keys_are_denied(governed) -> None:
    erin = as_principal(governed, "erin-key")
    with pytest.raises(AccessDenied, match="'erin' may not read dataset 'street'"):
        erin.dataset("street")
    assert erin.datasets() == []
    bob = as_principal(governed, "bob-key")
    assert bob.datasets() == ["street"]  # 'other' is not listed
    with pytest.raises(AccessDenied, match="'bob' may not read dataset 'other'"):
        bob.dataset("other")
    stranger = as_principal(governed, "who-is-this")
    with pytest.raises(AccessDenied, match="access key 'who-is-this' is not a principal"):
        stranger.dataset("street")


def test_admin_sees_everything_and_policy_is_versioned(governed) -> None:
    admin = orchestrator.connect(governed)
    assert admin.principal == "alice"
    item = admin.dataset("street")[0]
    assert "gps" in item["attributes"] and "plate" in item["instance_attributes"][0]
    assert len(admin.dataset("street")) == N
    with pytest.raises(ConfigError, match="lock yourself out"):
        admin.set_policy(POLICY.replace("roles: [admin]", "roles: [street-reader]"))
    v1 = admin.set_policy(POLICY.replace("gps, ", ""), message="show gps")
    assert v1 == 1 and admin.policy(0).text == POLICY and "gps" not in admin.policy().text.split("hidden_fields")[1]
    bob = as_principal(governed, "bob-key")
    assert "gps" in bob.dataset("street")[0]["attributes"]
    admin.set_policy(POLICY, message="hide gps again")
