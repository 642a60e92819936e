"""Read annotation sources (COCO, JSONL) into plain item records, rejecting what cannot be used.

Pure functions over files: no Ray, no store. Every problem found here becomes a ``Rejection``
(the item is left out, with the reason) or a warning (the item is kept, something was fixed or
dropped), never an exception, except when the annotation file itself cannot be read at all.

An item with an annotation that cannot be interpreted (unknown category, missing label, an
inverted box, an image id shared by two files) is rejected whole: ingesting it with that
annotation silently dropped, flipped or moved would make its label counts, and every slice
built on them, wrong. What can be kept with one reading (an annotation without geometry kept
as an image-level tag) is kept with a warning, never silently.

Nothing outside the source is read: every file name is confined by ``SourceRoots`` before the
pipeline opens it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
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


_OPT_IN = "--allow-root DIR (allow_roots= in Python)"


@dataclass(frozen=True)
class SourceRoots:
    """The folders a source's files may be read from: its own folder, plus any the user named.

    ``confine`` resolves a file name the way the OS would follow it (``..``, symlinks at every
    level) and compares the result with the resolved roots before anything opens the file, so
    a name or link that leads out of the folder is refused without being read. Names are taken
    literally: nothing URL-decodes or Unicode-normalises them, so ``%2e%2e`` or ``．．`` name
    (missing) files inside the folder, never its parent. Absolute names are refused unless
    the user named a root that holds them. The path handed on is the resolved one, and the probe
    opens it without following a final link (one swapped in after the check is refused there).
    """

    folder: Path  # resolved
    what: str  # "the images folder": how reasons name it
    allowed: tuple[Path, ...] = ()  # resolved; named explicitly by the user

    @classmethod
    def of(cls, folder: Path, what: str, allowed: Iterable[str | Path] = ()) -> SourceRoots:
        roots = []
        for root in allowed:
            resolved = Path(root).expanduser().resolve()
            if not resolved.is_dir():
                raise IngestError(
                    f"allowed root {str(root)!r} is not a folder",
                    hint="pass --allow-root (allow_roots= in Python) an existing folder that "
                    "holds the files the source names",
                )
            roots.append(resolved)
        return cls(Path(folder).resolve(), what, tuple(roots))

    def confine(self, name: str) -> str:
        """The resolved absolute path of ``name``; ``ValueError`` (the reason and the fix) when it
        is not a usable name or would be read from outside every root."""
        if "\x00" in name:
            raise ValueError("the file name contains a NUL byte; no file can have that name")
        relative = not Path(name).is_absolute()
        if not relative and not self.allowed:
            raise ValueError(
                f"absolute path: file names must be relative to {self.what} {self.folder}; "
                f"to read files elsewhere pass {_OPT_IN} naming a folder that holds them"
            )
        try:
            resolved = (self.folder / name).resolve()  # an absolute name replaces the folder
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
            raise ValueError(f"cannot resolve the path: {exc}") from None
        roots = (self.folder, *self.allowed) if relative else self.allowed
        if not any(resolved.is_relative_to(root) for root in roots):
            where = f"{self.what} {self.folder}" if relative else "every allowed root"
            if relative and self.allowed:
                where += " and every allowed root"
            raise ValueError(
                f"resolves to {resolved}, outside {where}; nothing outside the source is read: "
                f"move the file into {self.what}, or pass {_OPT_IN} naming a folder that holds it"
            )
        return str(resolved)


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


def _key(value: Any) -> Any:
    """``value`` if it can be an id (hashable), else a marker that matches nothing."""
    try:
        hash(value)
    except TypeError:
        return _UNUSABLE
    return value


_UNUSABLE = object()


def read_coco(
    annotations: Path, images_dir: Path, *, allowed_roots: Iterable[str | Path] = ()
) -> Source:
    """COCO detection JSON: ``images``, ``annotations`` (bbox x,y,w,h; polygon segmentation),
    ``categories``. Extra ``attributes``/``tags`` on images and annotations are kept, as is an
    image's ``item_id``; an annotation without geometry is an image-level tag (``"kind": "tag"``
    says it is meant to be, as ``orchestrator export`` writes it). An annotation's ``bbox_xyxy``
    (the box's corners, as an export writes them) is read instead of ``x + w``, ``y + h`` where it
    agrees with ``bbox`` (within 1e-9), because that sum can be one ulp off the exported corner.

    Every ``file_name`` must resolve inside ``images_dir`` (or, for absolute names and links,
    inside one of ``allowed_roots``); see ``SourceRoots``. Images that share an ``id`` are all
    rejected: which of them an annotation belongs to cannot be known.
    """
    annotations, images_dir = Path(annotations), Path(images_dir)
    roots = SourceRoots.of(images_dir, "the images folder", allowed_roots)
    doc = _load_json(annotations)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise IngestError(
            f"{annotations} is not a COCO file: it needs an 'images' list",
            hint="pass a COCO detection JSON with 'images', 'annotations' and 'categories'",
        )
    categories: dict[Any, str] = {}
    for cat in doc.get("categories") or []:
        if isinstance(cat, dict) and isinstance(cat.get("name"), str):
            if _key(cat.get("id")) is not _UNUSABLE:
                categories[cat["id"]] = cat["name"]
    labels = list(dict.fromkeys(categories.values()))  # file order: stable label ids

    rejected: list[Rejection] = []
    warnings: list[str] = []
    entries = []
    names_by_id: dict[Any, list[str]] = {}
    for img in doc["images"]:
        if (
            not isinstance(img, dict)
            or _key(img.get("id")) in (None, _UNUSABLE)
            or not isinstance(img.get("file_name"), str)
        ):
            rejected.append(Rejection(str(img)[:80], "image entry needs 'id' and 'file_name'"))
            continue
        entries.append(img)
        names_by_id.setdefault(img["id"], []).append(img["file_name"])

    items: dict[Any, SourceItem] = {}
    refused: set[Any] = set()  # image ids whose entry was rejected: their annotations go with it
    bad: dict[Any, str] = {}  # image id -> first reason its annotations are unusable
    seen_ids: set[str] = set()
    for img in entries:
        name = img["file_name"]
        sharing = names_by_id[img["id"]]
        if len(sharing) > 1:
            refused.add(img["id"])
            rejected.append(Rejection(name, (
                f"image id {img['id']!r} is used by {len(sharing)} images in {annotations.name} "
                f"({', '.join(sharing)}): which one its annotations belong to is ambiguous; "
                "give each image its own id"
            )))
            continue
        item_id = str(img.get("item_id") or Path(name).as_posix())
        if item_id in seen_ids:
            refused.add(img["id"])
            rejected.append(Rejection(name, f"duplicate item_id {item_id!r} in {annotations.name}"))
            continue
        try:
            path = roots.confine(name)
            attrs = _stringify(img.get("attributes"), f"image {img['id']} attributes")
            tags = _tags(img.get("tags"), f"image {img['id']} tags")
        except ValueError as exc:
            refused.add(img["id"])
            rejected.append(Rejection(name, str(exc)))
            continue
        seen_ids.add(item_id)
        items[img["id"]] = SourceItem(
            item_id=item_id, path=path, source_name=name, attributes=attrs, tags=tags
        )

    for ann in doc.get("annotations") or []:
        if not isinstance(ann, dict):
            rejected.append(Rejection(str(ann)[:80], "annotation is not an object"))
            continue
        ann_id = ann.get("id", "?")
        image_id = _key(ann.get("image_id"))
        if image_id in refused:
            continue  # its image is rejected, with the reason
        item = items.get(image_id)
        if item is None:
            rejected.append(
                Rejection(
                    f"annotation {ann_id}",
                    f"image_id {ann.get('image_id')!r} is not in 'images' of {annotations.name}",
                )
            )
            continue
        label = categories.get(_key(ann.get("category_id")))
        if label is None:
            known = ", ".join(f"{k}={v}" for k, v in categories.items())
            bad.setdefault(
                image_id,
                f"annotation {ann_id} has unknown category_id {ann.get('category_id')!r} "
                f"(known: {known})",
            )
            continue
        try:
            inst, notes = _coco_instance(ann, label)
        except ValueError as exc:
            bad.setdefault(image_id, str(exc))
            continue
        warnings += [f"{item.source_name}: {note}" for note in notes]
        if inst is not None:
            item.instances.append(inst)

    for image_id, reason in bad.items():
        item = items.pop(image_id)
        rejected.append(Rejection(item.source_name, reason))
    return Source(list(items.values()), labels, rejected, warnings)


def _coco_instance(ann: dict, label: str) -> tuple[SourceInstance | None, list[str]]:
    """The instance and warnings for what was changed or dropped; ``ValueError`` when the
    annotation cannot be read one way only (its item is then rejected)."""
    ann_id = ann.get("id", "?")
    try:
        attrs = _stringify(ann.get("attributes"), f"annotation {ann_id} attributes")
    except ValueError as exc:
        return None, [f"annotation {ann_id} dropped: {exc}"]
    bbox = None
    if ann.get("bbox") is not None:
        xywh = _finite(ann["bbox"], 4)
        if xywh is None:
            return None, [f"annotation {ann_id} dropped: bbox {ann['bbox']!r} is not 4 numbers"]
        x, y, w, h = xywh
        if w < 0 or h < 0:
            raise ValueError(
                f"annotation {ann_id} bbox {ann['bbox']!r} has a negative width or height; "
                "COCO boxes are [x, y, width, height] from the top-left corner: fix the box"
            )
        bbox = [x, y, x + w, y + h]
        corners = _finite(ann.get("bbox_xyxy"), 4)
        if corners is not None and all(abs(a - b) <= 1e-9 * max(1.0, abs(b)) for a, b in zip(bbox, corners)):
            bbox = corners  # exact (``orchestrator export`` writes it); not if another tool moved the box
    seg = ann.get("segmentation")
    notes: list[str] = []
    polygon: list[float] = []
    if isinstance(seg, list) and seg:
        rings = [r for r in (_finite(s) for s in seg) if r and len(r) >= 6 and len(r) % 2 == 0]
        if rings:
            polygon = max(rings, key=len)
            if len(rings) > 1:
                notes.append(f"annotation {ann_id} has {len(rings)} polygon parts; kept the largest")
            if bbox is None:
                xs, ys = polygon[0::2], polygon[1::2]
                bbox = [min(xs), min(ys), max(xs), max(ys)]
        else:
            notes.append(f"annotation {ann_id}: segmentation holds no polygon of 3+ points; ignored")
    elif isinstance(seg, dict):
        notes.append(
            f"annotation {ann_id}: RLE masks are not stored" + ("; kept its bbox" if bbox else "")
        )
    if bbox is None:
        if ann.get("kind") != "tag":  # an export says so: nothing was lost
            notes.append(
                f"annotation {ann_id} ({label}) has no bbox or polygon segmentation: "
                'kept as an image-level tag; write "kind": "tag" to say so'
            )
        return SourceInstance(label, "tag", [], [], attrs), notes
    return SourceInstance(label, "polygon" if polygon else "box", bbox, polygon, attrs), notes


def read_jsonl(
    path: Path, *, base: Path | None = None, allowed_roots: Iterable[str | Path] = ()
) -> Source:
    """One item per line: ``path`` (relative to ``base``, by default the JSONL file's folder),
    optional ``item_id``, ``instances`` (``label``, optional ``kind``, ``bbox`` [x_min, y_min,
    x_max, y_max], ``polygon`` [x, y, ...], ``attributes``), ``attributes`` and ``tags``.

    Every ``path`` must resolve inside ``base`` (or, for absolute paths and links, inside one of
    ``allowed_roots``); see ``SourceRoots``."""
    path = Path(path)
    roots = SourceRoots.of(
        path.parent if base is None else Path(base),
        "the JSONL file's folder" if base is None else "the base folder",
        allowed_roots,
    )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise IngestError(f"JSONL file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise IngestError(f"cannot read JSONL file {path}: {exc}") from None
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
            item, notes = _jsonl_item(record, roots)
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
        warnings += [f"{item.source_name}: {note}" for note in notes]
    return Source(items, list(labels), rejected, warnings)


def _jsonl_item(record: Any, roots: SourceRoots) -> tuple[SourceItem, list[str]]:
    """The item and warnings for what was read one way of several; ``ValueError`` rejects it."""
    if not isinstance(record, dict):
        raise ValueError("each line must be a JSON object")
    rel = record.get("path")
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"missing 'path' (the media file, relative to {roots.what})")
    media = roots.confine(rel)
    instances = []
    notes: list[str] = []
    for n, raw in enumerate(record.get("instances") or []):
        if not isinstance(raw, dict) or not isinstance(raw.get("label"), str) or not raw["label"]:
            raise ValueError(f"instance {n} needs a non-empty string 'label'")
        bbox = _finite(raw["bbox"], 4) if raw.get("bbox") is not None else []
        polygon = _finite(raw["polygon"]) if raw.get("polygon") is not None else []
        if bbox is None:
            raise ValueError(f"instance {n} bbox must be 4 numbers [x_min, y_min, x_max, y_max]")
        if bbox and (bbox[0] > bbox[2] or bbox[1] > bbox[3]):
            raise ValueError(
                f"instance {n} bbox {raw['bbox']!r} has x_min > x_max or y_min > y_max; "
                "write it as [x_min, y_min, x_max, y_max]"
            )
        if polygon is None or len(polygon) % 2:
            raise ValueError(f"instance {n} polygon must be an even-length list of numbers")
        kind = raw.get("kind") or ("polygon" if polygon else "box" if bbox else "tag")
        if kind not in INSTANCE_KINDS:
            raise ValueError(f"instance {n} kind {kind!r} is not one of {', '.join(INSTANCE_KINDS)}")
        if kind == "polygon" and not polygon:
            raise ValueError(f"instance {n} has kind 'polygon' but no polygon")
        if kind == "box" and not bbox:
            raise ValueError(f"instance {n} has kind 'box' but no bbox")
        if kind == "tag" and not raw.get("kind"):
            notes.append(
                f"instance {n} ({raw['label']}) has no bbox or polygon: kept as an image-level "
                'tag; write "kind": "tag" to say so'
            )
        if polygon and not bbox:
            xs, ys = polygon[0::2], polygon[1::2]
            bbox = [min(xs), min(ys), max(xs), max(ys)]
        attrs = _stringify(raw.get("attributes"), f"instance {n} attributes")
        instances.append(SourceInstance(raw["label"], kind, bbox, polygon, attrs))
    item = SourceItem(
        item_id=str(record.get("item_id") or Path(rel).as_posix()),
        path=media,
        source_name=rel,
        instances=instances,
        attributes=_stringify(record.get("attributes"), "attributes"),
        tags=_tags(record.get("tags"), "tags"),
    )
    return item, notes
