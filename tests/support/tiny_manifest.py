"""Tiny datasets committed without Ray: a few rows sharing one real 2x2 PNG blob, one Delta
commit (one manifest file) per call. For tests of the manifest and the read API that need
versions and files, not an ingest."""

from __future__ import annotations

import hashlib
import io
from datetime import UTC, datetime

import pyarrow as pa
from PIL import Image

import orchestrator
from orchestrator.manifest import manifest_schema

LABELS = ["car"]


def png_blob() -> tuple[str, bytes]:
    out = io.BytesIO()
    Image.new("RGB", (2, 2), (200, 30, 30)).save(out, format="PNG")
    data = out.getvalue()
    return hashlib.sha256(data).hexdigest(), data


def commit_items(store: orchestrator.Store, dataset: str, item_ids: list[str]) -> int:
    """Upsert ``item_ids`` (in this row order, one file) as one new version; returns it."""
    blob, data = png_blob()
    store.blobs(dataset).put(blob, data)
    now = datetime(2026, 5, 1, tzinfo=UTC)
    rows = [{"item_id": i, "blob": blob, "media_type": "image/png", "width": 2, "height": 2,
             "size_bytes": len(data), "source_name": i, "instances": [],
             "labels": {"car": n}, "attributes": {}, "tags": [], "ingested_at": now}
            for n, i in enumerate(item_ids)]
    table = pa.Table.from_pylist(rows, schema=manifest_schema(LABELS))
    return store.manifest(dataset).upsert(table, message="test", principal="test", operation="ingest")
