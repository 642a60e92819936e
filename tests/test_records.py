"""records: clipping geometry and counting labels into manifest rows."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from orchestrator.ingest.probe import Probe
from orchestrator.ingest.records import build_row, clip_box
from orchestrator.ingest.sources import SourceInstance, SourceItem

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_clip_inside_is_untouched():
    c = clip_box([1, 2, 3, 4], 10, 10)
    assert c.bbox == [1, 2, 3, 4] and not c.clipped


def test_clip_overhang_is_clamped():
    c = clip_box([-5, 2, 12, 4], 10, 10)
    assert c.bbox == [0, 2, 10, 4] and c.clipped


def test_box_fully_outside_is_dropped():
    assert clip_box([11, 11, 20, 20], 10, 10).bbox is None


@given(
    st.lists(st.floats(-100, 200, allow_nan=False), min_size=4, max_size=4),
    st.integers(1, 150),
    st.integers(1, 150),
)
def test_clipped_box_always_lies_in_image(bbox, w, h):
    c = clip_box(bbox, w, h)
    if c.bbox is not None:
        x0, y0, x1, y1 = c.bbox
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h


def test_build_row_counts_labels_and_reports_clipping():
    item = SourceItem(
        "a.jpg", "/x/a.jpg", "a.jpg",
        [
            SourceInstance("car", "box", [0, 0, 5, 5]),
            SourceInstance("car", "box", [8, 8, 30, 30]),  # overhangs: clipped
            SourceInstance("car", "box", [50, 50, 60, 60]),  # outside: dropped
            SourceInstance("night", "tag"),
        ],
    )
    probe = Probe("ab" * 32, 100, 20, 10, "image/jpeg")
    r = build_row(item, probe, ["car", "pedestrian", "night"], NOW)
    assert r.row["labels"] == {"car": 2, "pedestrian": 0, "night": 1}
    assert r.boxes_clipped == 1 and r.instances_dropped == 1 and len(r.warnings) == 2
    assert r.row["instances"][1]["bbox"] == [8, 8, 20, 10]
    assert r.row["width"] == 20 and r.row["blob"] == "ab" * 32
