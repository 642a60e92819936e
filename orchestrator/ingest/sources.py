"""Read annotation sources (COCO, JSONL) into plain item records, rejecting what cannot be used.

Pure functions over files: no Ray, no store. Every problem found here becomes a ``Rejection``
(the item is left out, with the reason) or a warning (the item is kept, something was fixed or
dropped), never an exception, except when the annotation file itself cannot be read at all.

An item with an annotation that cannot be interpreted (unknown category, missing label) is
rejected whole: ingesting it with that annotation silently dropped would make its label counts,
and every slice built on them, wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import IngestError
from orchestrator.manifest import INSTANCE_KINDS


@dataclass
class SourceInstance:
    label: str
    kind: str
    bbox: list[float] = field(default_factory=list)  # x_min, y_min, x_max, y_max
    polygon: list[float] = field(default_factory=list)
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass
class SourceItem:
    item_id: str
    path: str  # absolute local path of the media file
    source_name: str
    instances: list[SourceInstance] = field(default_factory=list)
    attributes: dict[str, str] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Rejection:
    file: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"file": self.file, "reason": self.reason}


@dataclass
class Source:
    """What a source file yields: items to ingest, the label vocabulary, and what was refused."""

    items: list[SourceItem]
    labels: list[str]
    rejected: list[Rejection] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _stringify(mapping: Any, where: str) -> dict[str, str]:
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise ValueError(f"{where} must be an object of key: value, got {type(mapping).__name__}")
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in mapping.items()}


def _tags(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ValueError(f"{where} must be a list of strings")
    return list(value)


def _load_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise IngestError(f"annotation file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise IngestError(f"cannot read annotation file {path}: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise IngestError(
            f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}",
            hint="fix the file or re-export it from the annotation tool",
        ) from None


def _finite(values: Any, n: int | None = None) -> list[float] | None:
    if not isinstance(values, list) or (n is not None and len(values) != n):
        return None
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    return out if all(math.isfinite(v) for v in out) else None


def read_coco(annotations: Path, images_dir: Path) -> Source:
    """COCO detection JSON: ``images``, ``annotations`` (bbox x,y,w,h; polygon segmentation),
    ``categories``. Extra ``attributes``/``tags`` on images and annotations are kept."""
    annotations, images_dir = Path(annotations), Path(images_dir)
    doc = _load_json(annotations)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise IngestError(
            f"{annotations} is not a COCO file: it needs an 'images' list",
            hint="pass a COCO detection JSON with 'images', 'annotations' and 'categories'",
        )
    categories: dict[Any, str] = {}
    for cat in doc.get("categories") or []:
        if isinstance(cat, dict) and "id" in cat and isinstance(cat.get("name"), str):
            categories[cat["id"]] = cat["name"]
    labels = list(dict.fromkeys(categories.values()))  # file order: stable label ids

    rejected: list[Rejection] = []
    warnings: list[str] = []
    items: dict[Any, SourceItem] = {}
    bad: dict[Any, str] = {}  # image id -> first reason its annotations are unusable
    seen_ids: set[str] = set()
    for img in doc["images"]:
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            rejected.append(Rejection(str(img)[:80], "image entry needs 'id' and 'file_name'"))
            continue
        name = img["file_name"]
        item_id = str(img.get("item_id") or Path(name).as_posix())
        if item_id in seen_ids:
            rejected.append(Rejection(name, f"duplicate item_id {item_id!r} in {annotations.name}"))
            continue
        try:
            attrs = _stringify(img.get("attributes"), f"image {img['id']} attributes")
            tags = _tags(img.get("tags"), f"image {img['id']} tags")
        except ValueError as exc:
            rejected.append(Rejection(name, str(exc)))
            continue
        seen_ids.add(item_id)
        items[img["id"]] = SourceItem(
            item_id=item_id,
            path=str((images_dir / name).resolve()),
            source_name=name,
            attributes=attrs,
            tags=tags,
        )

    for ann in doc.get("annotations") or []:
        if not isinstance(ann, dict):
            rejected.append(Rejection(str(ann)[:80], "annotation is not an object"))
            continue
        ann_id = ann.get("id", "?")
        item = items.get(ann.get("image_id"))
        if item is None:
            rejected.append(
                Rejection(
                    f"annotation {ann_id}",
                    f"image_id {ann.get('image_id')!r} is not in 'images' of {annotations.name}",
                )
            )
            continue
        label = categories.get(ann.get("category_id"))
        if label is None:
            known = ", ".join(f"{k}={v}" for k, v in categories.items())
            bad.setdefault(
                ann.get("image_id"),
                f"annotation {ann_id} has unknown category_id {ann.get('category_id')!r} "
                f"(known: {known})",
            )
            continue
        inst, warning = _coco_instance(ann, label)
        if warning:
            warnings.append(f"{item.source_name}: {warning}")
        if inst is None:
            continue
        item.instances.append(inst)

    for image_id, reason in bad.items():
        item = items.pop(image_id)
        rejected.append(Rejection(item.source_name, reason))
    return Source(list(items.values()), labels, rejected, warnings)


def _coco_instance(ann: dict, label: str) -> tuple[SourceInstance | None, str | None]:
    ann_id = ann.get("id", "?")
    try:
        attrs = _stringify(ann.get("attributes"), f"annotation {ann_id} attributes")
    except ValueError as exc:
        return None, f"annotation {ann_id} dropped: {exc}"
    bbox = None
    if ann.get("bbox") is not None:
        xywh = _finite(ann["bbox"], 4)
        if xywh is None:
            return None, f"annotation {ann_id} dropped: bbox {ann['bbox']!r} is not 4 numbers"
        x, y, w, h = xywh
        bbox = [x, y, x + w, y + h]
    seg = ann.get("segmentation")
    warning = None
    polygon: list[float] = []
    if isinstance(seg, list) and seg:
        rings = [r for r in (_finite(s) for s in seg) if r and len(r) >= 6 and len(r) % 2 == 0]
        if rings:
            polygon = max(rings, key=len)
            if len(rings) > 1:
                warning = f"annotation {ann_id} has {len(rings)} polygon parts; kept the largest"
            if bbox is None:
                xs, ys = polygon[0::2], polygon[1::2]
                bbox = [min(xs), min(ys), max(xs), max(ys)]
    elif isinstance(seg, dict):
        warning = f"annotation {ann_id}: RLE masks are not stored; kept its bbox"
    if bbox is None:
        return SourceInstance(label, "tag", [], [], attrs), warning
    return SourceInstance(label, "polygon" if polygon else "box", bbox, polygon, attrs), warning


def read_jsonl(path: Path) -> Source:
    """One item per line: ``path`` (relative to the JSONL file), optional ``item_id``,
    ``instances`` (``label``, optional ``kind``, ``bbox`` [x_min, y_min, x_max, y_max],
    ``polygon`` [x, y, ...], ``attributes``), ``attributes`` and ``tags``."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise IngestError(f"JSONL file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise IngestError(f"cannot read JSONL file {path}: {exc}") from None
    base = path.parent
    items: list[SourceItem] = []
    labels: dict[str, None] = {}
    rejected: list[Rejection] = []
    warnings: list[str] = []
    seen: set[str] = set()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path.name}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            rejected.append(Rejection(where, f"invalid JSON: {exc.msg} at column {exc.colno}"))
            continue
        try:
            item = _jsonl_item(record, base, where)
        except ValueError as exc:
            file = record.get("path") if isinstance(record, dict) else None
            rejected.append(Rejection(str(file or where), f"{where}: {exc}"))
            continue
        if item.item_id in seen:
            rejected.append(Rejection(item.source_name, f"{where}: duplicate item_id {item.item_id!r}"))
            continue
        seen.add(item.item_id)
        for inst in item.instances:
            labels.setdefault(inst.label)
        items.append(item)
    return Source(items, list(labels), rejected, warnings)


def _jsonl_item(record: Any, base: Path, where: str) -> SourceItem:
    if not isinstance(record, dict):
        raise ValueError("each line must be a JSON object")
    rel = record.get("path")
    if not isinstance(rel, str) or not rel:
        raise ValueError("missing 'path' (the media file, relative to the JSONL file)")
    instances = []
    for n, raw in enumerate(record.get("instances") or []):
        if not isinstance(raw, dict) or not isinstance(raw.get("label"), str) or not raw["label"]:
            raise ValueError(f"instance {n} needs a non-empty string 'label'")
        bbox = _finite(raw["bbox"], 4) if raw.get("bbox") is not None else []
        polygon = _finite(raw["polygon"]) if raw.get("polygon") is not None else []
        if bbox is None:
            raise ValueError(f"instance {n} bbox must be 4 numbers [x_min, y_min, x_max, y_max]")
        if polygon is None or len(polygon) % 2:
            raise ValueError(f"instance {n} polygon must be an even-length list of numbers")
        kind = raw.get("kind") or ("polygon" if polygon else "box" if bbox else "tag")
        if kind not in INSTANCE_KINDS:
            raise ValueError(f"instance {n} kind {kind!r} is not one of {', '.join(INSTANCE_KINDS)}")
        if kind == "polygon" and not polygon:
            raise ValueError(f"instance {n} has kind 'polygon' but no polygon")
        if kind == "box" and not bbox:
            raise ValueError(f"instance {n} has kind 'box' but no bbox")
        if polygon and not bbox:
            xs, ys = polygon[0::2], polygon[1::2]
            bbox = [min(xs), min(ys), max(xs), max(ys)]
        attrs = _stringify(raw.get("attributes"), f"instance {n} attributes")
        instances.append(SourceInstance(raw["label"], kind, bbox, polygon, attrs))
    return SourceItem(
        item_id=str(record.get("item_id") or Path(rel).as_posix()),
        path=str((base / rel).resolve()),
        source_name=rel,
        instances=instances,
        attributes=_stringify(record.get("attributes"), "attributes"),
        tags=_tags(record.get("tags"), "tags"),
    )
