"""What changed between two sets of manifest rows: items added, removed and changed, and for a
changed item which parts (the image bytes, labels, boxes, polygons, tags, attributes, instance
attributes), computed from manifest columns alone (no media is fetched).

Why fingerprints and not row equality: the nested columns (``instances``: a list of structs
holding lists and maps) have no equality in Arrow's compute functions, and turning a million
rows into Python objects takes longer than reading them. Every part of every row is reduced to
one 64-bit fingerprint with numpy over the flattened Arrow buffers: strings are hashed once per
distinct value (labels, kinds, tags and attribute keys and values repeat), numbers by their
bits, a list's elements mixed with their position (a box's coordinates are ordered) and summed
per row, and a row's instances, tags and attribute entries summed as multisets (the order of
instances or tags is not a change). Two parts are equal when their fingerprints are (a collision
needs 2**-64 luck). The same fingerprints decide whether an ingest changes anything at all.

Parts, and what changes them:

==================== =====================================================================
image                the media bytes (``blob``: their sha256)
labels               the multiset of instance labels (box, polygon and tag instances)
boxes                the multiset of box geometries (a relabelled box is a labels change)
polygons             the multiset of polygon geometries
instance_attributes  the multiset of the instances' attribute maps
tags                 the item's tags
attributes           the item's attributes
==================== =====================================================================
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from orchestrator.manifest import label_name

PARTS = ("image", "labels", "boxes", "polygons", "instance_attributes", "tags", "attributes")
#: Manifest columns the fingerprints read (``labels`` is read for the label totals only).
COLUMNS = ("item_id", "blob", "instances", "tags", "attributes")

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_SALTS = {name: np.uint64(int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big"))
          for name in ("pos", "key", "value", "label", "box", "polygon", "iattr", "tag", "attr", "image")}


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, vectorized (uint64 arithmetic wraps, as it should here)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= _M1
        x ^= x >> np.uint64(27)
        x *= _M2
        x ^= x >> np.uint64(31)
    return x


def _salted(x: np.ndarray, salt: str) -> np.ndarray:
    return _mix(x ^ _SALTS[salt])


class _Strings:
    """Hashes of strings, computed once per distinct value (Python's sha256 on a few thousand
    distinct labels, tags and attribute values; the rows only index them)."""

    def __init__(self) -> None:
        self._known: dict[str | None, int] = {}

    def hashes(self, values: pa.Array) -> np.ndarray:
        values = values.cast(pa.string()) if values.type != pa.string() else values
        encoded = pc.dictionary_encode(values)
        distinct = encoded.dictionary.to_pylist()
        table = np.fromiter((self._hash(v) for v in distinct), dtype=np.uint64, count=len(distinct))
        indices = encoded.indices.to_numpy(zero_copy_only=False)
        if encoded.indices.null_count:  # a null string hashes as its own value
            indices = np.where(np.asarray(encoded.indices.is_null()), len(distinct), indices)
            table = np.append(table, np.uint64(self._hash(None)))
        return table[indices.astype(np.int64)] if len(indices) else np.zeros(0, np.uint64)

    def _hash(self, value: str | None) -> int:
        got = self._known.get(value)
        if got is None:
            raw = b"\x00null" if value is None else value.encode()
            got = self._known[value] = int.from_bytes(hashlib.sha256(raw).digest()[:8], "big")
        return got


_HEX_DIGITS = np.zeros(256, bool)
_HEX_DIGITS[np.frombuffer(b"0123456789abcdef", np.uint8)] = True


def _blob_bits(blobs: pa.Array, strings: _Strings) -> np.ndarray:
    """A fingerprint of each blob's name from its first 16 hex digits (64 bits of a sha256:
    already a hash, unique per row, so hashing it again per distinct value would be the slowest
    step of a diff); any name that is not 64 lowercase hex digits is hashed as a string."""
    n = len(blobs)
    if n and blobs.null_count == 0 and blobs.type == pa.string():
        raw = np.frombuffer(blobs.buffers()[1], np.int32)[blobs.offset: blobs.offset + n + 1]
        data = np.frombuffer(blobs.buffers()[2], np.uint8)
        if np.all(np.diff(raw) == 64):
            head = np.ascontiguousarray(data[raw[0]: raw[-1]].reshape(n, 64)[:, :16])
            if _HEX_DIGITS[head].all():
                words = head.view(np.uint64)  # (n, 2): the 16 digits' ASCII bytes
                with np.errstate(over="ignore"):
                    return _mix(words[:, 0]) + words[:, 1]
    return strings.hashes(blobs)


def _offsets(arr: pa.Array) -> np.ndarray:
    """A list or map array's offsets into ``arr.flatten()`` (nulls as empty lists)."""
    off = np.asarray(arr.offsets, dtype=np.int64)
    return off - off[0]


def _per_row_sum(hashes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Sum (mod 2**64) of each row's element hashes; a row with no elements sums to 0."""
    with np.errstate(over="ignore"):
        prefix = np.concatenate([np.zeros(1, np.uint64), np.cumsum(hashes, dtype=np.uint64)])
        return prefix[offsets[1:]] - prefix[offsets[:-1]]


def _positions(offsets: np.ndarray) -> np.ndarray:
    """Each element's position within its row."""
    total = int(offsets[-1])
    starts = np.repeat(offsets[:-1], np.diff(offsets))
    return np.arange(total, dtype=np.int64) - starts


def _number_list(arr: pa.Array) -> np.ndarray:
    """Per row: a fingerprint of an ordered list of float64 (a bbox, a polygon): the values'
    bits times a constant per position, summed, then mixed with the length. A linear sum is
    enough to tell any real edit apart (a collision needs the bit patterns' weighted sums to
    cancel mod 2**64) and is the cheapest pass over millions of coordinates; boxes, all of one
    length, skip the per-element positions altogether."""
    offsets = _offsets(arr)
    lengths = np.diff(offsets)
    flat = arr.flatten()
    flat = flat.cast(pa.float64()) if flat.type != pa.float64() else flat
    values = np.asarray(flat.fill_null(np.nan) if flat.null_count else flat, dtype=np.float64)
    bits = values.view(np.uint64).copy()
    bits[bits == np.uint64(1 << 63)] = 0  # -0.0 is 0.0
    longest = int(lengths.max()) if len(lengths) else 0
    weights = _salted(np.arange(max(longest, 1), dtype=np.uint64), "pos") | np.uint64(1)  # odd
    with np.errstate(over="ignore"):
        if len(lengths) and longest and (lengths == longest).all():
            sums = (bits.reshape(-1, longest) * weights).sum(axis=1, dtype=np.uint64)
        else:
            sums = _per_row_sum(bits * weights[_positions(offsets)], offsets)
        return _mix(sums + lengths.astype(np.uint64) * _SALTS["pos"])


def _string_map(arr: pa.Array, strings: _Strings) -> np.ndarray:
    """Per row: a fingerprint of a map<string, string> as a set of entries."""
    if not len(arr):
        return np.zeros(0, np.uint64)
    raw = np.asarray(arr.offsets, dtype=np.int64)
    offsets = raw - raw[0]
    span = (int(raw[0]), int(raw[-1] - raw[0]))  # ``keys``/``items`` are the whole children
    keys = _salted(strings.hashes(arr.keys.slice(*span)), "key")
    values = _salted(strings.hashes(arr.items.slice(*span)), "value")
    with np.errstate(over="ignore"):
        return _per_row_sum(_mix(keys * np.uint64(3) + values), offsets)


def _string_list(arr: pa.Array, strings: _Strings, salt: str) -> np.ndarray:
    offsets = _offsets(arr)
    return _per_row_sum(_salted(strings.hashes(arr.flatten()), salt), offsets)


def fingerprints(table: pa.Table, strings: _Strings | None = None) -> dict[str, np.ndarray]:
    """Per part (``PARTS``, those whose columns ``table`` has), one uint64 per row.

    Use one ``_Strings`` for tables that will be compared (only for speed: string hashes do not
    depend on it)."""
    strings = strings or _Strings()
    out: dict[str, np.ndarray] = {}
    n = table.num_rows
    if "blob" in table.column_names:
        out["image"] = _salted(_blob_bits(table.column("blob").combine_chunks(), strings), "image")
    if "tags" in table.column_names:
        out["tags"] = _string_list(table.column("tags").combine_chunks(), strings, "tag")
    if "attributes" in table.column_names:
        out["attributes"] = _string_map(table.column("attributes").combine_chunks(), strings)
    if "instances" in table.column_names:
        instances = table.column("instances").combine_chunks()
        offsets = _offsets(instances)
        flat = instances.flatten()
        if len(flat):
            labels = strings.hashes(flat.field("label"))
            is_box = np.asarray(pc.equal(flat.field("kind"), "box").fill_null(False), dtype=bool)
            is_polygon = np.asarray(pc.equal(flat.field("kind"), "polygon").fill_null(False), dtype=bool)
            attrs = _string_map(flat.field("attributes"), strings)
            zero = np.uint64(0)
            out["labels"] = _per_row_sum(_salted(labels, "label"), offsets)
            out["boxes"] = _per_row_sum(np.where(is_box, _salted(_number_list(flat.field("bbox")), "box"), zero),
                                        offsets)
            out["polygons"] = _per_row_sum(
                np.where(is_polygon, _salted(_number_list(flat.field("polygon")), "polygon"), zero), offsets)
            out["instance_attributes"] = _per_row_sum(np.where(attrs != 0, _salted(attrs, "iattr"), zero), offsets)
        else:
            for part in ("labels", "boxes", "polygons", "instance_attributes"):
                out[part] = np.zeros(n, np.uint64)
    return out


def label_counts(table: pa.Table) -> dict[str, np.ndarray]:
    """Per label name, the instance count of each row (from the ``labels`` struct; null is 0)."""
    if "labels" not in table.column_names:
        return {}
    labels = table.column("labels").combine_chunks()
    return {label_name(f.name): np.asarray(labels.field(i).fill_null(0), dtype=np.int64)
            for i, f in enumerate(labels.type)}


@dataclass(frozen=True)
class ItemChange:
    """One item present in both row sets whose content differs."""

    item_id: str
    parts: tuple[str, ...]  # of PARTS, in that order
    label_deltas: dict[str, int] = field(default_factory=dict)  # label -> instances (after - before)

    def as_dict(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "parts": list(self.parts), "label_deltas": dict(self.label_deltas)}


@dataclass(frozen=True)
class RowsDiff:
    """Rows ``after`` against rows ``before``, matched by ``item_id``."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[ItemChange, ...]
    unchanged: int
    label_totals: dict[str, tuple[int, int]]  # label -> (instances before, after)

    @property
    def label_deltas(self) -> dict[str, int]:
        """Instances per label, after minus before (labels whose total moved)."""
        return {k: b - a for k, (a, b) in self.label_totals.items() if a != b}

    def parts_changed(self) -> dict[str, int]:
        """How many changed items changed each part."""
        counts = {p: 0 for p in PARTS}
        for c in self.changed:
            for p in c.parts:
                counts[p] += 1
        return {p: n for p, n in counts.items() if n}


def compare_rows(before: pa.Table, after: pa.Table) -> RowsDiff:
    """Diff two row sets (each with ``COLUMNS`` and optionally ``labels``); ids are unique in each."""
    strings = _Strings()
    ids_a, ids_b = before.column("item_id").combine_chunks(), after.column("item_id").combine_chunks()
    where_in_a = np.asarray(pc.index_in(ids_b, value_set=ids_a).fill_null(-1), dtype=np.int64)
    in_b = np.asarray(pc.is_in(ids_a, value_set=ids_b), dtype=bool)
    matched_b = np.flatnonzero(where_in_a >= 0)
    matched_a = where_in_a[matched_b]
    with ThreadPoolExecutor(2, thread_name_prefix="diff") as pool:  # numpy and Arrow release the GIL
        fa, fb = pool.map(lambda t: fingerprints(t, strings), (before, after))
    parts = [p for p in PARTS if p in fa and p in fb]
    differs = {p: fa[p][matched_a] != fb[p][matched_b] for p in parts}
    any_diff = np.zeros(len(matched_b), dtype=bool)
    for mask in differs.values():
        any_diff |= mask
    counts_a, counts_b = label_counts(before), label_counts(after)
    names = list(dict.fromkeys([*counts_a, *counts_b]))
    zeros_a, zeros_b = np.zeros(before.num_rows, np.int64), np.zeros(after.num_rows, np.int64)
    changed = []
    ids_after = ids_b.to_numpy(zero_copy_only=False)
    for k in np.flatnonzero(any_diff):
        ia, ib = int(matched_a[k]), int(matched_b[k])
        deltas = {}
        if "labels" in differs and differs["labels"][k]:
            for name in names:
                d = int(counts_b.get(name, zeros_b)[ib]) - int(counts_a.get(name, zeros_a)[ia])
                if d:
                    deltas[name] = d
        changed.append(ItemChange(str(ids_after[ib]), tuple(p for p in parts if differs[p][k]), deltas))
    totals = {name: (int(counts_a.get(name, zeros_a).sum()), int(counts_b.get(name, zeros_b).sum()))
              for name in names}
    return RowsDiff(
        added=tuple(str(i) for i in ids_after[where_in_a < 0]),
        removed=tuple(str(i) for i in ids_a.to_numpy(zero_copy_only=False)[~in_b]),
        changed=tuple(changed), unchanged=int(len(matched_b) - any_diff.sum()), label_totals=totals)


def unchanged_rows(existing: pa.Table, incoming: pa.Table) -> np.ndarray:
    """A mask over ``incoming``: True where ``existing`` holds the same item with the same
    content in every part (an ingest need not write it again)."""
    strings = _Strings()
    ids_e, ids_i = existing.column("item_id").combine_chunks(), incoming.column("item_id").combine_chunks()
    where = np.asarray(pc.index_in(ids_i, value_set=ids_e).fill_null(-1), dtype=np.int64)
    same = where >= 0
    if not same.any():
        return same
    fe, fi = fingerprints(existing, strings), fingerprints(incoming, strings)
    for part in PARTS:
        if part in fe and part in fi:
            same &= np.where(where >= 0, fe[part][np.maximum(where, 0)] == fi[part], False)
    return same


def select_columns(table: pa.Table, wanted: Sequence[str]) -> pa.Table:
    """``table`` with those of ``wanted`` it has (hidden fields are absent under a policy)."""
    return table.select([c for c in wanted if c in table.column_names])


@dataclass(frozen=True)
class DatasetDiff:
    """``Dataset.diff``: two pinned versions (or slices) of a dataset, compared item by item."""

    dataset: str
    before: int
    after: int
    query: str | None
    rows: RowsDiff

    @property
    def added(self) -> tuple[str, ...]:
        return self.rows.added

    @property
    def removed(self) -> tuple[str, ...]:
        return self.rows.removed

    @property
    def changed(self) -> tuple[ItemChange, ...]:
        return self.rows.changed

    def as_dict(self) -> dict[str, Any]:
        """The JSON ``orchestrator diff --json`` prints (stable keys)."""
        r = self.rows
        return {
            "dataset": self.dataset, "before": self.before, "after": self.after, "query": self.query,
            "counts": {"added": len(r.added), "removed": len(r.removed), "changed": len(r.changed),
                       "unchanged": r.unchanged},
            "parts_changed": r.parts_changed(),
            "label_totals": {k: {"before": a, "after": b, "delta": b - a} for k, (a, b) in r.label_totals.items()},
            "added": list(r.added), "removed": list(r.removed), "changed": [c.as_dict() for c in r.changed],
        }

    def summary(self, limit: int = 10) -> str:
        """Human lines: counts, label deltas, then up to ``limit`` items of each kind."""
        r = self.rows
        where = f" (slice {self.query!r})" if self.query else ""
        lines = [f"dataset {self.dataset!r} version {self.before} -> {self.after}{where}: "
                 f"{len(r.added)} added, {len(r.removed)} removed, {len(r.changed)} changed, "
                 f"{r.unchanged} unchanged"]
        if r.parts_changed():
            lines.append("changed parts: " + ", ".join(f"{p} {n}" for p, n in r.parts_changed().items()))
        if r.label_deltas:
            lines.append("label instances: " + ", ".join(
                f"{k} {r.label_totals[k][0]} -> {r.label_totals[k][1]} ({d:+d})" for k, d in r.label_deltas.items()))

        def listed(kind: str, items: Sequence[str]) -> None:
            if items:
                more = f" … and {len(items) - limit} more" if len(items) > limit else ""
                lines.append(f"{kind}: " + ", ".join(items[:limit]) + more)

        listed("added", r.added)
        listed("removed", r.removed)
        for c in r.changed[:limit]:
            deltas = " (" + ", ".join(f"{k} {d:+d}" for k, d in c.label_deltas.items()) + ")" if c.label_deltas else ""
            lines.append(f"  ~ {c.item_id}: {', '.join(c.parts)}{deltas}")
        if len(r.changed) > limit:
            lines.append(f"  … and {len(r.changed) - limit} more changed (--json lists every one)")
        return "\n".join(lines)
