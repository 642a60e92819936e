"""The item: the one record every read path yields, and its encodings for Ray and TensorFlow.

An item (a plain dict) has these fields, whatever the path (``ds[i]``, iteration,
``to_pytorch``, ``to_tensorflow``, ``to_ray``, training); ``tests/integration/test_read_contract.py``
checks that every path yields the same values::

    id                   str                        the item id (unique in a version)
    image                uint8 [H, W, 3] | None     RGB pixels, EXIF orientation applied (None: decode=False);
                                                    [h, w, 3] with StreamOptions.image_size (w, h)
    boxes                float32 [N, 4]             x_min, y_min, x_max, y_max in pixels of ``image``
                                                    as delivered (see below)
    labels               int64 [N]                  label ids (``ds.label_map``: stable across versions)
    label_names          list[str] (N)              label names, aligned with boxes
    polygons             list[float32 [2k]] (N)     x0, y0, x1, y1, ... per instance (empty: none),
                                                    in pixels of ``image`` as delivered
    instance_attributes  list[dict] (N)             each instance's attributes
    instance_tags        list[str]                  labels of tag-kind instances (no geometry)
    tags                 list[str]                  item tags
    attributes           dict[str, str]             item attributes
    width, height        int                        the SOURCE image's pixels after EXIF orientation
                                                    (manifest columns), whatever ``image_size``
    version              int                        the dataset version read

The N instances are those with geometry (box or polygon), in manifest order. Under an access
policy, hidden attribute keys are absent. Items are built in one place, ``ItemBlock.item``, from a
block of manifest rows held as columns (the reader keeps one block per row group; the Ray stage
makes one per batch); ``ItemRow`` is a row as the fetch step sees it.

PyTorch gets the same dict with ``image``, ``boxes``, ``labels`` and ``polygons`` as tensors
(``adapters.torch.to_tensors``). Ray Data and TensorFlow need columns of fixed type, so variable
structures are encoded: ``to_ray_row`` / ``from_ray_row`` here, ``to_tf_element`` /
``from_tf_element`` in ``adapters.tensorflow``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from orchestrator.errors import ItemError
from orchestrator.manifest import LabelMap, base_field

#: Manifest columns an item is built from and its bytes found by (they never change type across
#: versions; ``pack`` and ``pack_offset`` read as null in versions written before packs).
ITEM_COLUMNS = ["item_id", "blob", "size_bytes", "pack", "pack_offset", "width", "height", "instances",
                "attributes", "tags"]

#: The item's fields, in the order documented above.
ITEM_FIELDS = ("id", "image", "boxes", "labels", "label_names", "polygons", "instance_attributes",
               "instance_tags", "tags", "attributes", "width", "height", "version")

#: Item fields that Ray rows and TF elements carry as JSON text (variable nested structure).
JSON_FIELDS = ("label_names", "polygons", "instance_attributes", "instance_tags", "tags", "attributes")


@dataclass(slots=True, eq=False)
class ItemRow:
    """One manifest row as the reader needs it: where its bytes are (``blob``; ``pack``,
    ``pack_offset`` and ``size_bytes`` when packed), and the ``ItemBlock`` that builds its item
    (row ``at`` of it). The annotations stay columnar in the block until the item is built."""

    item_id: str
    blob: str
    size_bytes: int | None
    pack: str | None
    pack_offset: int | None
    block: ItemBlock
    at: int

    def item(self, image: np.ndarray | None, version: int, size: tuple[int, int] | None = None) -> dict[str, Any]:
        """This row's item (see ``ItemBlock.item``)."""
        return self.block.item(self.at, image, version, size)


class ItemBlock:
    """A run of manifest rows (``ITEM_COLUMNS``, as Arrow) and the one builder of their items.

    Why columnar: converting rows with their nested ``instances`` to Python dicts and looping
    over instances per item was the reader's largest cost on a warm pass (it runs under the GIL,
    against the decode threads). A block flattens each nested column once for all its rows, with
    a fixed number of Arrow/numpy calls (kinds, label ids, boxes as one float32 [M, 4] array,
    polygon values and offsets, attribute maps), and keeps them compact (about 1 KB a row of
    demo data, less than the Arrow rows; most of it polygon values); ``item(k, ...)`` is a handful
    of slices of those.

    Guarantees: ``item(k, ...)`` equals what building row ``k`` instance by instance gives
    (field order, dtypes and Python types of the table above); each call returns new arrays,
    lists and dicts, except the polygons, which are views into the block's float32 buffer
    (disjoint between instances). A row whose annotations cannot make an item (a box or polygon
    instance without a 4-number bbox, a label missing from the label map) raises ``ItemError``
    for that item only, when its item is built. Access redaction happens before
    (``access.redact`` on the table): a block shows what it is given.
    """

    def __init__(self, table: pa.Table, label_map: LabelMap) -> None:
        table = _canonical(table)
        self.num_rows = table.num_rows
        self.item_id: list[str] = table.column("item_id").to_pylist()
        self.blob: list[str] = table.column("blob").to_pylist()
        self.size_bytes: list[int | None] = table.column("size_bytes").to_pylist()
        self.pack: list[str | None] = _strings(_one_array(table.column("pack")))
        self.pack_offset: list[int | None] = table.column("pack_offset").to_pylist()
        self.width: list[int | None] = table.column("width").to_pylist()
        self.height: list[int | None] = table.column("height").to_pylist()
        tag_off, tags = _ragged(table.column("tags"))
        self._tag_off, self._tags = tag_off.tolist(), _strings(tags)
        self._attributes = _Pairs(table.column("attributes"), None)

        inst_off, inst = _ragged(table.column("instances"))
        is_tag = pc.fill_null(pc.equal(inst.field("kind"), "tag"), False).to_numpy(zero_copy_only=False)
        geo = np.flatnonzero(~is_tag)
        # Row r's box/polygon instances are geo[g_off[r]:g_off[r+1]] (manifest order), its tags alike.
        self._geo_off = np.concatenate([[0], np.cumsum(~is_tag)])[inst_off].tolist()
        self._itag_off = np.concatenate([[0], np.cumsum(is_tag)])[inst_off].tolist()
        label = pc.dictionary_encode(inst.field("label"))
        names: list[str | None] = label.dictionary.to_pylist()
        name_idx = pc.fill_null(label.indices, len(names)).to_numpy(zero_copy_only=False)
        names.append(None)
        self._names = names  # one str per distinct label, shared by the items
        self._name_idx = name_idx[geo]
        self._itags = [names[i] for i in name_idx[is_tag].tolist()]
        known = {n: i for i, n in enumerate(label_map.names)}
        to_id = np.array([known.get(n, -1) for n in names], dtype=np.int64)  # type: ignore[arg-type]
        self._labels = to_id[self._name_idx]

        box_off, box_values = _ragged(inst.field("bbox"))
        box_len = np.diff(box_off)[geo]
        good_box = box_len == 4
        values = box_values.to_numpy(zero_copy_only=False).astype(np.float32)
        self._boxes = np.zeros((len(geo), 4), np.float32)
        self._boxes[good_box] = values[box_off[:-1][geo][good_box, None] + np.arange(4)]
        # An instance that cannot be an item's instance poisons its row (found per item).
        self._bad_instance = {int(j): (names[self._name_idx[j]], int(box_len[j]), self._labels[j] < 0)
                              for j in np.flatnonzero(~good_box | (self._labels < 0))}

        poly_off, poly_values = _ragged(inst.field("polygon"))
        self._poly = poly_values.to_numpy(zero_copy_only=False).astype(np.float32)
        self._poly_start, self._poly_end = poly_off[:-1][geo], poly_off[1:][geo]
        self._instance_attributes = _Pairs(inst.field("attributes"), geo)

    def __len__(self) -> int:
        return self.num_rows

    def row(self, k: int) -> ItemRow:
        """Row ``k`` as the reader needs it."""
        return ItemRow(self.item_id[k], self.blob[k], self.size_bytes[k], self.pack[k], self.pack_offset[k],
                       self, k)

    def rows(self) -> list[ItemRow]:
        """Every row of the block, in order."""
        return [self.row(k) for k in range(self.num_rows)]

    def item(self, k: int, image: np.ndarray | None, version: int,
             size: tuple[int, int] | None = None) -> dict[str, Any]:
        """The item of row ``k`` with its decoded pixels (``ITEM_FIELDS``, in order).

        The N instances are the row's box and polygon instances in manifest order; its tag
        instances give ``instance_tags``. ``size`` = (w, h): the image was decoded to that size
        (or would have been: decode=False); boxes and polygons are scaled from the row's oriented
        ``width`` x ``height`` to it. Raises ``ItemError`` (naming the item) when the row's
        annotations cannot make an item."""
        g0, g1 = self._geo_off[k], self._geo_off[k + 1]
        for j in range(g0, g1) if self._bad_instance else ():
            if j in self._bad_instance:
                raise self._bad(k, *self._bad_instance[j])
        names, poly = self._names, self._poly
        boxes = self._boxes[g0:g1].copy()
        polygons = [poly[a:b] for a, b in zip(self._poly_start[g0:g1].tolist(), self._poly_end[g0:g1].tolist(),
                                              strict=True)]
        if size is not None:
            boxes, polygons = scale_geometry(boxes, polygons, size[0] / self.width[k],  # type: ignore[operator]
                                             size[1] / self.height[k])  # type: ignore[operator]
        return {
            "id": self.item_id[k],
            "image": image,
            "boxes": boxes,
            "labels": self._labels[g0:g1].copy(),
            "label_names": [names[i] for i in self._name_idx[g0:g1].tolist()],
            "polygons": polygons,
            "instance_attributes": self._instance_attributes.dicts(g0, g1),
            "instance_tags": self._itags[self._itag_off[k]:self._itag_off[k + 1]],
            "tags": self._tags[self._tag_off[k]:self._tag_off[k + 1]],
            "attributes": self._attributes.dicts(k, k + 1)[0],
            "width": self.width[k],
            "height": self.height[k],
            "version": version,
        }

    def _bad(self, k: int, label: str | None, box_len: int, unknown: bool) -> ItemError:
        what = (f"instance label {label!r} is not in the version's label map" if unknown
                else f"a {label!r} instance has a bbox of {box_len} numbers, not 4")
        return ItemError(f"item {self.item_id[k]!r}: its manifest row cannot make an item: {what}",
                         hint="re-ingest the item: ingest stores a 4-number bbox for every box and "
                              "polygon instance and adds every label to the label map",
                         reason="unreadable")


class _Pairs:
    """The (key, value) pairs of a ``map<string, string>`` column, for ``selected`` rows of it
    (None: all), as dicts on demand (no dicts kept: most maps of a block are empty)."""

    def __init__(self, column: pa.ChunkedArray | pa.Array, selected: np.ndarray | None) -> None:
        offsets, entries = _ragged(column)
        rows = slice(None) if selected is None else selected
        self.start: np.ndarray = offsets[:-1][rows]
        self.end: np.ndarray = offsets[1:][rows]
        self.pairs: list[tuple[str, str | None]] = []
        if len(entries) and (self.end > self.start).any():
            self.pairs = list(zip(_strings(entries.field("key")), _strings(entries.field("value")), strict=True))

    def dicts(self, i: int, j: int) -> list[dict[str, str | None]]:
        """The maps of selected rows ``i`` to ``j`` as new dicts."""
        if not self.pairs:
            return [{} for _ in range(j - i)]
        pairs = self.pairs
        return [dict(pairs[a:b]) for a, b in zip(self.start[i:j].tolist(), self.end[i:j].tolist(), strict=True)]


def _canonical(table: pa.Table) -> pa.Table:
    """``table`` with the item columns in their schema types: delta-rs may write ``string_view``
    (and view lists), for which Arrow has no compare or take kernels."""
    for i, name in enumerate(table.column_names):
        want = base_field(name).type if name in ITEM_COLUMNS else None
        if want is not None and table.schema.field(i).type != want:
            table = table.set_column(i, name, table.column(i).cast(want))
    return table


def _one_array(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A column as one array: its only chunk as it is (a slice, no copy), else concatenated."""
    if not isinstance(column, pa.ChunkedArray):
        return column
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _ragged(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, pa.Array]:
    """A list (or map) column as (offsets [n + 1] from 0, flat values): row ``r``'s values are
    ``values[offsets[r]:offsets[r + 1]]``; a null list is an empty one."""
    arr = _one_array(column)
    if arr.null_count:  # a null's segment may be non-empty in Arrow's format: flatten skips it
        lengths = pc.fill_null(pc.list_value_length(arr.cast(_as_list(arr.type))), 0)
        offsets = np.zeros(len(arr) + 1, dtype=np.int64)
        np.cumsum(lengths.to_numpy(zero_copy_only=False), out=offsets[1:])
        return offsets, pc.list_flatten(arr.cast(_as_list(arr.type)))
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    values = arr.values.slice(offsets[0], offsets[-1] - offsets[0])
    return offsets - offsets[0], values


def _as_list(kind: pa.DataType) -> pa.DataType:
    """A map type as the list of (key, value) structs it is stored as; other types as they are."""
    if not isinstance(kind, pa.MapType):
        return kind
    return pa.list_(pa.struct([pa.field("key", kind.key_type, nullable=False), pa.field("value", kind.item_type)]))


def _strings(arr: pa.Array | pa.ChunkedArray) -> list:
    """A string column as Python strs, one object per distinct value (labels, pack ids and tag
    names repeat: sharing them keeps a block small)."""
    encoded = pc.dictionary_encode(_one_array(arr))
    values: list = encoded.dictionary.to_pylist()
    values.append(None)
    idx = pc.fill_null(encoded.indices, len(values) - 1).to_numpy(zero_copy_only=False)
    return [values[i] for i in idx.tolist()]


def scale_geometry(boxes: np.ndarray, polygons: list[np.ndarray], sx: float, sy: float
                   ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Boxes [N, 4] and flat polygons (x0, y0, x1, y1, ...) with x scaled by ``sx`` and y by
    ``sy``: computed in float64 and rounded once to float32, so the result is the float32
    nearest to the exact product."""
    box_scale = np.array([sx, sy, sx, sy], dtype=np.float64)
    scaled_boxes = (boxes.astype(np.float64) * box_scale).astype(np.float32)
    scaled_polygons = []
    for polygon in polygons:
        xy = polygon.astype(np.float64)
        xy[0::2] *= sx
        xy[1::2] *= sy
        scaled_polygons.append(xy.astype(np.float32))
    return scaled_boxes, scaled_polygons


def encode_json(value: Any) -> str:
    """One JSON encoding for every converter (sorted keys: equal values encode equally)."""
    if isinstance(value, list) and value and isinstance(value[0], np.ndarray):
        value = [v.tolist() for v in value]
    return json.dumps(value, sort_keys=True)


def to_ray_row(item: dict[str, Any], fetch_node: str = "") -> dict[str, Any]:
    """The Ray Data row of an item: arrays as tensors, ``JSON_FIELDS`` as JSON text, integers
    as int64; plus ``fetch_node``, the Ray node that fetched the blob (shard locality is
    checked with it; not an item field)."""
    row: dict[str, Any] = {}
    for name in ITEM_FIELDS:
        value = item[name]
        if name in JSON_FIELDS:
            row[name] = encode_json(value)
        elif name in ("width", "height", "version"):
            row[name] = np.int64(value)
        else:
            row[name] = value
    row["fetch_node"] = fetch_node
    return row


def from_ray_row(row: dict[str, Any]) -> dict[str, Any]:
    """The item of a Ray Data row (inverse of ``to_ray_row``; ``fetch_node`` dropped)."""
    item: dict[str, Any] = {}
    for name in ITEM_FIELDS:
        value = row[name]
        if name in JSON_FIELDS:
            value = json.loads(value)
            if name == "polygons":
                value = [np.asarray(p, dtype=np.float32) for p in value]
        elif name in ("width", "height", "version"):
            value = int(value)
        elif name == "boxes":
            value = np.asarray(value, dtype=np.float32).reshape(-1, 4)
        elif name == "labels":
            value = np.asarray(value, dtype=np.int64).reshape(-1)
        item[name] = value
    return item
