"""store_location: URI parsing and the settings handed to pyarrow and deltalake."""

from __future__ import annotations

import pytest

from orchestrator.errors import StoreError
from orchestrator.store_location import S3Credentials, StoreLocation


def test_file_uri():
    loc = StoreLocation.parse("file:///data/store/")
    assert (loc.scheme, loc.root, loc.uri) == ("file", "/data/store", "file:///data/store")
    assert loc.join("blobs", "sha256") == "/data/store/blobs/sha256"
    assert loc.delta_storage_options() == {}


@pytest.mark.parametrize("bad", ["file://host/x", "/abs/path", "gs://b/x", "s3:///prefix", "store"])
def test_bad_uris_say_what_to_write(bad):
    with pytest.raises(StoreError) as err:
        StoreLocation.parse(bad)
    assert bad in str(err.value) and "fix:" in str(err.value)


def test_s3_uri_and_endpoint_from_env():
    creds = S3Credentials.from_env(
        {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s3cr3t",
         "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-1"}
    )
    loc = StoreLocation.parse("s3://bucket/team/store", creds)
    assert loc.root == "bucket/team/store"
    opts = loc.delta_storage_options()
    assert opts["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000" and opts["AWS_ALLOW_HTTP"] == "true"
    assert opts["AWS_REGION"] == "eu-west-1"
    assert loc.table_uri(loc.join("datasets")) == "s3://bucket/team/store/datasets"
    assert "s3cr3t" not in repr(loc)
