"""Export one version (or slice) of a dataset as files another tool reads: COCO, JSONL or YOLO.

What an export holds, whatever the format:

* the media: each item's original bytes, byte-identical to what was ingested (read through the
  one reader, ``ItemLoader``, so every byte is checked against its sha256; never re-encoded);
* the annotations as this principal sees them: the access policy's row filter decides which
  items, its hidden fields are absent (the rows come from ``ReadPlan.rows``, which redacts);
* ``export.json``: where it came from (store, dataset, version, query, principal), what it holds,
  and what its format could not hold.

Formats, and what each drops:

======== ================================================================================
coco     ``annotations.json`` + ``images/``: categories in label-map order (ids 1..N, so a
         re-ingest keeps the label ids), boxes as ``[x, y, w, h]``, polygons as
         ``segmentation``, item and instance ``attributes``/``tags`` as extra keys, the item
         id as ``item_id`` on each image, tag-kind instances as annotations without geometry
         (``"kind": "tag"``), and each box's corners as ``bbox_xyxy`` (see below). Drops
         nothing ``ingest`` reads back; a polygon of fewer than three points (JSONL ingest
         accepts one) becomes a box, counted.
jsonl    ``items.jsonl`` + ``images/``: one item per line, exactly the JSONL ``ingest`` reads.
         Drops labels no exported item uses (JSONL has no label list): the re-ingested label
         map holds the used labels, in order of first use.
yolo     ``images/`` + ``labels/*.txt`` (``class cx cy w h``, normalised) + ``data.yaml``
         (``names``: the label map). Drops polygons (their boxes are kept), tag-kind
         instances, tags, item and instance attributes, and item ids that cannot be file
         names (the file name is the item id where it can be; see ``media_name``); counted.
======== ================================================================================

Round trip: ``ingest(export(v))`` gives the same items (ids, bytes, labels, boxes, polygons,
tags, attributes) for COCO and JSONL, bit for bit in float64: numbers are written with Python's
shortest round-trip repr, and a COCO box also as its corners (``bbox_xyxy``), because
``x + (x_max - x)`` differs from ``x_max`` by one ulp for about 3% of boxes with two-decimal
corners and no width gives it back exactly; ``ingest`` reads ``bbox_xyxy`` when it agrees with
``bbox`` (so a box another tool edited is read from ``bbox``).

The folder appears whole or not at all: files are written into a hidden sibling folder which is
renamed to ``out`` at the end; ``overwrite`` replaces an existing folder only then. Media are
read in runs of adjacent manifest rows on a few threads (a packed run is one range request).
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from orchestrator.errors import ExportError, ItemError, OrchestratorError
from orchestrator.meter import Meter
from orchestrator.stream.cache import BlobCache
from orchestrator.stream.item import ITEM_COLUMNS, ItemBlock
from orchestrator.stream.plan import OnError, ReadPlan
from orchestrator.stream.reader import ItemLoader, apply_error_policy
from orchestrator.stream.skips import Skips

Format = Literal["coco", "jsonl", "yolo"]
FORMATS: tuple[Format, ...] = ("coco", "jsonl", "yolo")
#: Manifest columns an export reads: what builds the fetches, plus the media type.
COLUMNS = (*ITEM_COLUMNS, "media_type")
_RUN = 64  # rows per fetch task: a packed run is one or a few range requests
_NAME_BYTES = 200  # a path component longer than this is renamed (file systems allow 255)


@dataclass
class ExportReport:
    """What an export wrote: the CLI prints ``summary()`` or, with ``--json``, ``as_dict()``."""

    dataset: str
    version: int
    query: str | None
    format: str
    out: str
    items: int = 0
    instances: int = 0
    bytes: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # what the format could not hold
    renamed: int = 0  # items whose media file is not named by their id
    skipped: dict[str, Any] = field(default_factory=dict)  # on_error="skip": what was left out
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "version": self.version, "query": self.query,
                "format": self.format, "out": self.out, "items": self.items,
                "instances": self.instances, "bytes": self.bytes, "dropped": dict(self.dropped),
                "renamed": self.renamed, "skipped": self.skipped, "seconds": round(self.seconds, 3)}

    def summary(self) -> str:
        where = f" matching {self.query!r}" if self.query else ""
        lines = [f"exported {self.items} items{where} of {self.dataset!r} version {self.version} "
                 f"({self.instances} instances, {self.bytes / 1e6:.1f} MB of media) as {self.format} "
                 f"into {self.out} in {self.seconds:.1f} s"]
        if self.dropped:
            held = ", ".join(f"{n} {what}" for what, n in self.dropped.items())
            lines.append(f"  {self.format} cannot hold: {held}")
        if self.renamed:
            kept = "" if self.format == "yolo" else "; the annotations keep the id"
            lines.append(f"  {self.renamed} media files are not named by their item id (not a usable file name){kept}")
        if self.skipped.get("count"):
            lines.append(f"  skipped {self.skipped['count']} unreadable items: {self.skipped.get('by_reason')}")
        return "\n".join(lines)


# -- names --------------------------------------------------------------------------------------
def media_name(item_id: str, media_type: str | None, taken: set[str]) -> tuple[str, bool]:
    """The media file's path under ``images/`` for an item, and whether it differs from the id.

    The id itself where it is a safe relative path (no empty, ``.`` or ``..`` part, no control
    characters or backslashes, no part over 200 bytes), with the extension of its media type
    added when it has none; otherwise ``item-<sha256 of the id>.<ext>``. Unique among the names
    in ``taken`` (which it updates), case-folded and without the extension, so that ``a.jpg``
    and ``A.png`` cannot meet on a case-insensitive file system or in YOLO's ``labels/a.txt``;
    a file never takes the name of another item's folder, nor a folder a file's."""
    ext = mimetypes.guess_extension(media_type or "") or ".bin"
    parts = item_id.split("/")
    safe = (not any(p in ("", ".", "..") or len(p.encode()) > _NAME_BYTES for p in parts)
            and not any(ord(c) < 32 or c in "\\\x7f" for c in item_id))
    name = item_id if safe else _hashed(item_id, ext)
    if not Path(name).suffix or mimetypes.guess_type(name)[0] != media_type:
        name += ext
    n = 0
    while _clashes(name, taken):
        n += 1
        name = _hashed(item_id, ext, n)
    stem = str(Path(name).with_suffix("")).casefold()
    taken.update({f"s:{stem}", f"n:{name.casefold()}"})
    taken.update(f"d:{str(p).casefold()}" for p in Path(name).parents if str(p) != ".")
    return name, name != item_id


def _hashed(item_id: str, ext: str, n: int = 0) -> str:
    return f"item-{hashlib.sha256(item_id.encode()).hexdigest()[:20]}{f'-{n}' if n else ''}{ext}"


def _clashes(name: str, taken: set[str]) -> bool:
    stem = str(Path(name).with_suffix("")).casefold()
    return (f"s:{stem}" in taken or f"d:{name.casefold()}" in taken
            or any(f"n:{str(p).casefold()}" in taken for p in Path(name).parents if str(p) != "."))


# -- geometry -----------------------------------------------------------------------------------
def _area(polygon: list[float]) -> float:
    xs, ys = polygon[0::2], polygon[1::2]
    return abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs)))) / 2


# -- formats ------------------------------------------------------------------------------------
class _Writer(ABC):
    """One format's annotation files, fed one item at a time in manifest order."""

    def __init__(self, out: Path, labels: tuple[str, ...], final: Path) -> None:
        self.out, self.labels, self.final = out, labels, final  # final: where ``out`` will be renamed to
        self.dropped: Counter[str] = Counter()

    @abstractmethod
    def add(self, row: dict[str, Any], name: str) -> None:
        """Write (or collect) one item's annotations; its media file is ``images/<name>``."""

    @abstractmethod
    def finish(self) -> None:
        """Write what is left (the annotation file) once every item was added."""


class _Coco(_Writer):
    def __init__(self, out: Path, labels: tuple[str, ...], final: Path) -> None:
        super().__init__(out, labels, final)
        self.ids = {name: i + 1 for i, name in enumerate(labels)}
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any], name: str) -> None:
        image_id = len(self.images) + 1
        entry: dict[str, Any] = {"id": image_id, "file_name": name, "width": row["width"],
                                 "height": row["height"], "item_id": row["item_id"]}
        if row["attributes"]:
            entry["attributes"] = row["attributes"]
        if row["tags"]:
            entry["tags"] = row["tags"]
        self.images.append(entry)
        for inst in row["instances"]:
            ann: dict[str, Any] = {"id": len(self.annotations) + 1, "image_id": image_id,
                                   "category_id": self.ids[inst["label"]], "iscrowd": 0}
            polygon, bbox = inst["polygon"] or [], inst["bbox"] or []
            if inst["kind"] == "tag":
                ann["kind"] = "tag"
            else:
                x0, y0, x1, y1 = bbox
                ann["bbox"] = [x0, y0, x1 - x0, y1 - y0]
                ann["bbox_xyxy"] = bbox  # exact: x0 + (x1 - x0) is one ulp off x1 for ~3% of boxes
                if len(polygon) >= 6:
                    ann["segmentation"] = [polygon]
                    ann["area"] = _area(polygon)
                else:
                    if polygon:
                        self.dropped["polygons of fewer than 3 points (kept as boxes)"] += 1
                    ann["area"] = (x1 - x0) * (y1 - y0)
            if inst["attributes"]:
                ann["attributes"] = inst["attributes"]
            self.annotations.append(ann)

    def finish(self) -> None:
        doc = {"info": {"description": "exported by orchestrator", "date_created": _now()},
               "categories": [{"id": i, "name": name} for name, i in self.ids.items()],
               "images": self.images, "annotations": self.annotations}
        _write_json(self.out / "annotations.json", doc)


class _Jsonl(_Writer):
    def __init__(self, out: Path, labels: tuple[str, ...], final: Path) -> None:
        super().__init__(out, labels, final)
        self.file = (out / "items.jsonl").open("w", encoding="utf-8")
        self.used: set[str] = set()

    def add(self, row: dict[str, Any], name: str) -> None:
        instances = []
        for inst in row["instances"]:
            self.used.add(inst["label"])
            one: dict[str, Any] = {"label": inst["label"], "kind": inst["kind"]}
            if inst["bbox"]:
                one["bbox"] = inst["bbox"]
            if inst["polygon"]:
                one["polygon"] = inst["polygon"]
            if inst["attributes"]:
                one["attributes"] = inst["attributes"]
            instances.append(one)
        record = {"item_id": row["item_id"], "path": f"images/{name}", "width": row["width"],
                  "height": row["height"], "instances": instances}
        if row["attributes"]:
            record["attributes"] = row["attributes"]
        if row["tags"]:
            record["tags"] = row["tags"]
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")

    def finish(self) -> None:
        self.file.close()
        unused = len(set(self.labels) - self.used)
        if unused:
            self.dropped["labels no exported item uses (JSONL has no label list)"] = unused


class _Yolo(_Writer):
    def __init__(self, out: Path, labels: tuple[str, ...], final: Path) -> None:
        super().__init__(out, labels, final)
        self.ids = {name: i for i, name in enumerate(labels)}
        (out / "labels").mkdir()

    def add(self, row: dict[str, Any], name: str) -> None:
        w, h = row["width"], row["height"]
        lines = []
        for inst in row["instances"]:
            if inst["kind"] == "tag":
                self.dropped["tag instances (no geometry)"] += 1
                continue
            if inst["polygon"]:
                self.dropped["polygons (their boxes are kept)"] += 1
            if inst["attributes"]:
                self.dropped["instance attribute maps"] += 1
            x0, y0, x1, y1 = inst["bbox"]
            lines.append(f"{self.ids[inst['label']]} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} "
                         f"{(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}\n")
        self.dropped["item tag lists"] += bool(row["tags"])
        self.dropped["item attribute maps"] += bool(row["attributes"])
        target = (self.out / "labels" / name).with_suffix(".txt")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(lines), encoding="utf-8")

    def finish(self) -> None:
        names = "\n".join(f"  {i}: {json.dumps(n, ensure_ascii=False)}" for n, i in self.ids.items())
        (self.out / "data.yaml").write_text(
            "# Ultralytics YOLO dataset (orchestrator export): every image is in both splits;\n"
            "# `path` is the folder at export time: change it if you move the folder.\n"
            f"path: {json.dumps(str(self.final))}\ntrain: images\nval: images\n"
            f"nc: {len(self.ids)}\nnames:\n{names}\n", encoding="utf-8")
        for what in ("item tag lists", "item attribute maps"):
            if not self.dropped[what]:
                del self.dropped[what]


_WRITERS: dict[str, Callable[[Path, tuple[str, ...], Path], _Writer]] = {"coco": _Coco, "jsonl": _Jsonl, "yolo": _Yolo}


# -- the export ---------------------------------------------------------------------------------
def export(plan: ReadPlan, out: str | Path, fmt: str = "coco", *, query: str | None = None, overwrite: bool = False,
           on_error: OnError = "raise", threads: int = 8, progress: bool | None = None,
           provenance: dict[str, Any] | None = None, protect: Iterable[Path] = ()) -> ExportReport:
    """Write the slice ``plan`` reads into the folder ``out`` in format ``fmt`` (see the module
    docstring). ``on_error="skip"`` leaves out items whose media are missing or corrupt (listed
    in the report and ``export.json``); by default such an item stops the export, naming it
    (``orchestrator verify`` finds them all). A store that does not answer always stops it.
    ``query``: the slice's text, for the report; ``protect``: folders ``out`` may not hold when
    it is replaced (the store's own folder); ``provenance``: extra keys for ``export.json`` (the
    store URI, the principal)."""
    if fmt not in _WRITERS:
        raise ExportError(f"unknown export format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
    started = time.monotonic()
    out = Path(out).expanduser().absolute()
    _check_out(out, overwrite, protect)
    rows = plan.rows(list(COLUMNS)).table
    report = ExportReport(plan.dataset, plan.version, query, fmt, str(out))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    except OSError as exc:
        raise ExportError(f"cannot write into {out.parent}: {exc.strerror or exc}",
                          hint="pass --out a folder in a place you can write") from None
    try:
        (work / "images").mkdir()
        writer = _WRITERS[fmt](work, plan.label_map.names, out)
        skips = _write_items(plan, rows, work, writer, report, on_error, threads, progress)
        writer.finish()
        report.dropped = {k: v for k, v in writer.dropped.items() if v}
        report.skipped = skips.as_dict() if skips.count else {}
        report.seconds = time.monotonic() - started
        _write_json(work / "export.json", {"exported_at": _now(), **(provenance or {}), **report.as_dict(),
                                           "out": str(out), "layout": _LAYOUT[fmt]})
        _move_into_place(work, out)
    except BaseException as exc:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, OrchestratorError):  # the disk, not the store
            raise ExportError(f"cannot write the export into {out}: {exc.strerror or exc}",
                              hint="free some space there, or pass --out another folder") from None
        raise
    return report


_LAYOUT = {
    "coco": "annotations.json (COCO detection; item_id, attributes, tags, kind, bbox_xyxy as extra keys) + images/",
    "jsonl": "items.jsonl (orchestrator's JSONL ingest format, paths relative to this folder) + images/",
    "yolo": "data.yaml + images/ + labels/ (one .txt per image: class cx cy w h, normalised)",
}


def _write_items(plan: ReadPlan, rows: pa.Table, work: Path, writer: _Writer, report: ExportReport,
                 on_error: OnError, threads: int, progress: bool | None) -> Skips:
    """Fetch each run of rows on the pool, write its media files, then hand its rows to the
    writer in manifest order (the annotation files list items in that order)."""
    # Not through the node's blob cache: an export reads each blob once, and passing them through
    # the cache would evict what training reads again.
    loader = ItemLoader(plan.with_options(plan.options.replace(cache=BlobCache(memory_budget=0))))
    skips = Skips()
    taken: set[str] = set()
    records = rows.select(["item_id", "media_type", "width", "height", "instances", "attributes", "tags"])
    names: list[tuple[str, bool]] = [media_name(i, m, taken) for i, m in
                                     zip(rows.column("item_id").to_pylist(), rows.column("media_type").to_pylist(),
                                         strict=True)]
    images = work / "images"

    def fetch_and_write(start: int) -> dict[int, int]:
        """Write the media of rows ``start`` .. ``start + _RUN``; their sizes by row."""
        block = ItemBlock(rows.slice(start, _RUN), plan.label_map)
        written = {}
        for k, data in enumerate(loader.fetch_many(block.rows())):
            if isinstance(data, ItemError):
                apply_error_policy(data, on_error, skips.add)  # Skips is thread-safe
                continue
            target = images / names[start + k][0]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            written[k] = len(data)
        return written

    starts = range(0, rows.num_rows, _RUN)
    meter = Meter(f"export {plan.dataset} v{plan.version}", rows.num_rows, "item", show=progress, rate_bytes=True)
    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="export")
    try:
        for start, sizes in zip(starts, pool.map(fetch_and_write, starts), strict=True):
            chunk = records.slice(start, _RUN).to_pylist()
            for k, row in enumerate(chunk):
                name, renamed = names[start + k]
                if k not in sizes:
                    continue  # skipped: its bytes could not be read
                row["attributes"] = dict(row["attributes"] or [])
                row["tags"] = row["tags"] or []
                for inst in row["instances"] or []:
                    inst["attributes"] = dict(inst["attributes"] or [])
                row["instances"] = row["instances"] or []
                writer.add(row, name)
                report.items += 1
                report.instances += len(row["instances"])
                report.renamed += renamed
            report.bytes += sum(sizes.values())
            meter.update(len(chunk), sum(sizes.values()))
    finally:  # after an error or Ctrl-C, runs not started yet are dropped, not fetched
        pool.shutdown(wait=True, cancel_futures=True)
        meter.close()
    return skips


def _check_out(out: Path, overwrite: bool, protect: Iterable[Path]) -> None:
    """Refuse an ``out`` that is a file, a non-empty folder (unless ``overwrite``), or one whose
    replacement would delete the current folder, the home folder or a protected one."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file, not a folder", hint="pass --out a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"{out} is not empty",
                              hint="pass --out a new or empty folder, or --overwrite (overwrite=True) to replace it")
        resolved = out.resolve()
        for keep in (Path.cwd(), Path.home(), *protect):
            keep = Path(keep).resolve()
            if keep == resolved or keep.is_relative_to(resolved):
                raise ExportError(f"refusing to replace {out}: it holds {keep}",
                                  hint="export into a folder of its own, e.g. --out ./export-coco")


def _move_into_place(work: Path, out: Path) -> None:
    """Rename the finished folder to ``out``; an old ``out`` is moved aside first and removed
    after, so ``out`` is never half-written."""
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = out.with_name(f"{work.name}.old")
            out.rename(old)
        else:
            out.rmdir()
    os.replace(work, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, doc: Any) -> None:
    with path.open("w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
