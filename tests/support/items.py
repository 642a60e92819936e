"""Comparing items exactly: field order, array dtypes and shapes, Python types of the rest."""

from __future__ import annotations

from typing import Any

import numpy as np

from orchestrator.manifest import LabelMap
from orchestrator.stream.item import ITEM_FIELDS


def assert_same_item(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Field by field, arrays with their dtype and shape, scalars with their Python type."""
    assert list(got) == list(want) == list(ITEM_FIELDS)
    for key in ITEM_FIELDS:
        g, w = got[key], want[key]
        if key == "polygons":
            assert len(g) == len(w), key
            for a, b in zip(g, w, strict=True):
                assert a.dtype == b.dtype == np.float32 and a.shape == b.shape and np.array_equal(a, b)
        elif isinstance(w, np.ndarray):
            assert isinstance(g, np.ndarray) and g.dtype == w.dtype and g.shape == w.shape, key
            assert np.array_equal(g, w), key
        else:
            assert type(g) is type(w) and g == w, (key, g, w)


def reference_item(row: dict, image: np.ndarray | None, label_map: LabelMap, version: int) -> dict:
    """The item of a manifest row dict, built instance by instance as the reader did before
    ``ItemBlock`` was columnar: the oracle the columnar builder must equal."""
    ids = label_map.as_dict()
    geo = [i for i in row.get("instances") or [] if i["kind"] != "tag"]
    return {
        "id": row["item_id"],
        "image": image,
        "boxes": np.asarray([i["bbox"] for i in geo], dtype=np.float32).reshape(-1, 4),
        "labels": np.asarray([ids[i["label"]] for i in geo], dtype=np.int64),
        "label_names": [i["label"] for i in geo],
        "polygons": [np.asarray(i["polygon"] or [], dtype=np.float32) for i in geo],
        "instance_attributes": [dict(i.get("attributes") or []) for i in geo],
        "instance_tags": [i["label"] for i in row.get("instances") or [] if i["kind"] == "tag"],
        "tags": list(row.get("tags") or []),
        "attributes": dict(row.get("attributes") or []),
        "width": row["width"],
        "height": row["height"],
        "version": version,
    }
