"""Turn a source item plus its probe into a manifest row: clip geometry, count labels.

Pure functions, unit-tested without Ray. Geometry is clipped to the oriented image; a box that
falls entirely outside the image is dropped, and both are counted so the report can say so.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime

from orchestrator.ingest.probe import Probe
from orchestrator.ingest.sources import SourceInstance, SourceItem
from orchestrator.manifest import label_field


@dataclass(frozen=True)
class Clip:
    bbox: list[float] | None  # None: nothing of the box is inside the image
    clipped: bool


def clip_box(bbox: list[float], width: int, height: int) -> Clip:
    """Clamp [x_min, y_min, x_max, y_max] to the image; reorder swapped corners."""
    x0, y0, x1, y1 = bbox
    x0, x1 = min(x0, x1), max(x0, x1)
    y0, y1 = min(y0, y1), max(y0, y1)
    cx0, cy0 = min(max(x0, 0.0), width), min(max(y0, 0.0), height)
    cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
    if cx1 <= cx0 or cy1 <= cy0:
        return Clip(None, True)
    out = [cx0, cy0, cx1, cy1]
    return Clip(out, out != [x0, y0, x1, y1])


def clip_polygon(polygon: list[float], width: int, height: int) -> list[float]:
    return [
        min(max(v, 0.0), float(width if i % 2 == 0 else height)) for i, v in enumerate(polygon)
    ]


@dataclass
class RowResult:
    row: dict
    boxes_clipped: int
    instances_dropped: int
    warnings: list[str]


def build_row(
    item: SourceItem, probe: Probe, labels: list[str], ingested_at: datetime
) -> RowResult:
    """The manifest row for one item; ``labels`` lists every label field the row must carry."""
    instances: list[dict] = []
    clipped = dropped = 0
    warnings: list[str] = []
    for n, inst in enumerate(item.instances):
        fixed = _fit(inst, probe.width, probe.height)
        if fixed is None:
            dropped += 1
            warnings.append(
                f"{item.source_name}: instance {n} ({inst.label}) lies outside the "
                f"{probe.width}x{probe.height} image; dropped"
            )
            continue
        inst_out, was_clipped = fixed
        if was_clipped:
            clipped += 1
            warnings.append(
                f"{item.source_name}: instance {n} ({inst.label}) clipped to the image bounds"
            )
        instances.append(inst_out)
    counts = Counter(i["label"] for i in instances)
    row = {
        "item_id": item.item_id,
        "blob": probe.blob,
        "media_type": probe.media_type,
        "width": probe.width,
        "height": probe.height,
        "size_bytes": probe.size_bytes,
        "source_name": item.source_name,
        "instances": instances,
        "attributes": item.attributes,
        "tags": item.tags,
        "ingested_at": ingested_at,
    }
    if labels:
        row["labels"] = {label_field(name): counts.get(name, 0) for name in labels}
    return RowResult(row, clipped, dropped, warnings)


def _fit(inst: SourceInstance, width: int, height: int) -> tuple[dict, bool] | None:
    out = {
        "label": inst.label,
        "kind": inst.kind,
        "bbox": [],
        "polygon": [],
        "attributes": inst.attributes,
    }
    if inst.kind == "tag":
        return out, False
    clip = clip_box(inst.bbox, width, height)
    if clip.bbox is None:
        return None
    out["bbox"] = clip.bbox
    clipped = clip.clipped
    if inst.polygon:
        poly = clip_polygon(inst.polygon, width, height)
        clipped = clipped or poly != inst.polygon
        out["polygon"] = poly
    return out, clipped
