"""manifest: label field encoding and the schema users read without this package."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from orchestrator.manifest import LabelMap, label_field, label_name, manifest_schema

DELTA_FORBIDDEN = set(" ,;{}()\n\t=")


@given(st.text(min_size=1, max_size=30))
def test_label_field_round_trips_and_is_delta_legal(name):
    field = label_field(name)
    assert label_name(field) == name
    assert not (set(field) & DELTA_FORBIDDEN)
    assert field == field.lower() or "%" in field


@given(st.lists(st.text(min_size=1, max_size=10), unique=True, max_size=8))
def test_distinct_labels_get_distinct_case_insensitive_fields(names):
    fields = [label_field(n).lower() for n in names]
    assert len(set(fields)) == len(fields)


def test_schema_and_label_map():
    schema = manifest_schema(["car", "traffic light"])
    assert schema.names == [
        "item_id", "blob", "media_type", "width", "height", "size_bytes", "source_name",
        "instances", "labels", "attributes", "tags", "ingested_at", "pack", "pack_offset",
    ]
    assert schema.field("labels").type.field(1).name == "traffic%20light"
    lm = LabelMap.from_schema(schema)
    assert lm.names == ("car", "traffic light") and lm.id("traffic light") == 1
    assert "labels" not in manifest_schema([]).names
