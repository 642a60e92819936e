"""Statistics of a dataset version or slice, from its manifest alone (no media is fetched):
per label its instances and the images holding one; instances per image; image sizes; box
sizes and aspect ratios; instance kinds; tag and attribute value counts.

Everything is computed with Arrow and numpy over the columns it needs, so a million items take
seconds, and what a principal may not see (hidden attributes, filtered rows) never enters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from orchestrator.manifest import label_name

#: Manifest columns the statistics read.
COLUMNS = ("width", "height", "instances", "labels", "tags", "attributes")
TOP_VALUES = 20  # attribute values listed per key (the rest are summed as "other")


def _summary(values: np.ndarray) -> dict[str, float]:
    """min, median, mean and max (zeros for no values)."""
    if not len(values):
        return {"min": 0.0, "median": 0.0, "mean": 0.0, "max": 0.0}
    return {"min": float(values.min()), "median": float(np.median(values)), "mean": float(values.mean()),
            "max": float(values.max())}


def _value_counts(values: pa.Array) -> dict[str, int]:
    if not len(values):
        return {}
    counts = pc.value_counts(values.drop_null() if values.null_count else values)
    pairs = sorted(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()),
                   key=lambda p: (-p[1], str(p[0])))
    return {str(v): int(n) for v, n in pairs}


@dataclass(frozen=True)
class DatasetStats:
    """``Dataset.stats()``: see the module docstring. ``as_dict`` is the JSON the CLI prints."""

    dataset: str
    version: int
    query: str | None
    items: int
    labels: dict[str, dict[str, int]]  # label -> {"instances", "images"}
    instances_per_image: dict[str, Any]  # summary, plus "histogram": {count: images}
    kinds: dict[str, int]  # box / polygon / tag -> instances
    image_width: dict[str, float]
    image_height: dict[str, float]
    box_width: dict[str, float]  # pixels of the image the item carries
    box_height: dict[str, float]
    box_aspect: dict[str, float]  # width / height
    tags: dict[str, int]  # tag -> items
    attributes: dict[str, dict[str, int]]  # key -> value -> items (top TOP_VALUES, then "other")
    histograms: dict[str, dict[str, list[float]]]  # name -> {"edges", "counts"}: what ``plot`` draws

    def plot(self, path: str | Path | None = None) -> Any:
        """A matplotlib figure of the statistics (labels, instances per image, image sizes, box
        sizes and aspect ratios, tags); saved to ``path`` when given (PNG, SVG, PDF by suffix).
        Notebooks display the returned figure."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)  # no display needed to save a file
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
        where = f", slice {self.query!r}" if self.query else ""
        fig.suptitle(f"{self.dataset} version {self.version}{where}: {self.items:,} items")
        names = list(self.labels)
        x = np.arange(len(names))
        ax = axes[0][0]
        ax.bar(x - 0.2, [self.labels[n]["instances"] for n in names], 0.4, label="instances")
        ax.bar(x + 0.2, [self.labels[n]["images"] for n in names], 0.4, label="images")
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_title("labels")
        ax.legend()
        for ax, (name, title, xlabel) in zip(
                [axes[0][1], axes[0][2], axes[1][0], axes[1][1]],
                [("instances_per_image", "instances per image", "instances"),
                 ("image_width", "image widths", "pixels"), ("box_area", "box areas", "sqrt(area), pixels"),
                 ("box_aspect", "box aspect ratios", "width / height (log scale)")]):
            h = self.histograms.get(name, {"edges": [0.0, 1.0], "counts": [0.0]})
            edges = np.asarray(h["edges"])
            ax.stairs(h["counts"], edges, fill=True)
            ax.set_title(title)
            ax.set_xlabel(xlabel)
            if name == "box_aspect":
                ax.set_xscale("log")
        ax = axes[1][2]
        tags = list(self.tags.items())[:15]
        ax.barh([t for t, _ in tags][::-1], [n for _, n in tags][::-1])
        ax.set_title("tags (items)" if tags else "no tags")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=100)
        return fig

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def summary(self) -> str:
        """Aligned tables for a terminal."""
        where = f" (slice {self.query!r})" if self.query else ""
        lines = [f"dataset {self.dataset!r} version {self.version}{where}: {self.items:,} items"]
        lines += _table(["label", "instances", "images"],
                        [[k, f"{v['instances']:,}", f"{v['images']:,}"] for k, v in self.labels.items()])
        ipi = self.instances_per_image
        lines.append(f"instances per image: min {ipi['min']:g}, median {ipi['median']:g}, "
                     f"mean {ipi['mean']:.2f}, max {ipi['max']:g}; kinds: "
                     + ", ".join(f"{k} {n:,}" for k, n in self.kinds.items()))
        rows = [[name, *(f"{d[k]:.1f}" for k in ("min", "median", "mean", "max"))] for name, d in (
            ("image width", self.image_width), ("image height", self.image_height),
            ("box width", self.box_width), ("box height", self.box_height), ("box aspect w/h", self.box_aspect))]
        lines += _table(["measure", "min", "median", "mean", "max"], rows)
        if self.tags:
            lines += _table(["tag", "items"], [[k, f"{n:,}"] for k, n in self.tags.items()])
        for key, values in self.attributes.items():
            lines += _table([f"attributes.{key}", "items"], [[v, f"{n:,}"] for v, n in values.items()])
        return "\n".join(lines)


def _histogram(values: np.ndarray, bins: Any) -> dict[str, list[float]]:
    counts, edges = np.histogram(values, bins=bins)
    return {"edges": edges.astype(float).tolist(), "counts": counts.astype(float).tolist()}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return ["", fmt.format(*header), *(fmt.format(*r) for r in rows)]


def compute_stats(table: pa.Table, *, dataset: str, version: int, query: str | None) -> DatasetStats:
    """The statistics of manifest rows (``COLUMNS``; any a policy hides may be absent)."""
    n = table.num_rows
    labels: dict[str, dict[str, int]] = {}
    if "labels" in table.column_names and n:
        struct = table.column("labels").combine_chunks()
        for i, f in enumerate(struct.type):
            counts = np.asarray(struct.field(i).fill_null(0), dtype=np.int64)
            labels[label_name(f.name)] = {"instances": int(counts.sum()), "images": int((counts > 0).sum())}
    instances = table.column("instances").combine_chunks() if n else pa.array([], pa.list_(pa.null()))
    per_image = np.asarray(pc.list_value_length(instances).fill_null(0), dtype=np.int64) if n else np.zeros(0)
    kinds: dict[str, int] = {}
    box_w = box_h = np.zeros(0)
    if n and len(flat := instances.flatten()):
        kinds = _value_counts(flat.field("kind"))
        boxes = flat.filter(pc.equal(flat.field("kind"), "box"))
        if len(boxes):
            coords = np.asarray(boxes.field("bbox").flatten(), dtype=np.float64).reshape(-1, 4)
            box_w, box_h = coords[:, 2] - coords[:, 0], coords[:, 3] - coords[:, 1]
    aspect = box_w[box_h > 0] / box_h[box_h > 0]
    histogram = dict(zip(*(a.tolist() for a in np.unique(per_image, return_counts=True)))) if n else {}
    tags = _value_counts(table.column("tags").combine_chunks().flatten()) if "tags" in table.column_names and n \
        else {}
    attributes: dict[str, dict[str, int]] = {}
    if "attributes" in table.column_names and n:
        maps = table.column("attributes").combine_chunks()
        raw = np.asarray(maps.offsets)
        keys = maps.keys.slice(int(raw[0]), int(raw[-1] - raw[0]))
        values = maps.items.slice(int(raw[0]), int(raw[-1] - raw[0]))
        for key in sorted(k for k in pc.unique(keys).to_pylist() if k is not None):
            counts = _value_counts(values.filter(pc.equal(keys, key)))
            top = dict(list(counts.items())[:TOP_VALUES])
            if len(counts) > TOP_VALUES:
                top["other"] = sum(list(counts.values())[TOP_VALUES:])
            attributes[key] = top
    width = np.asarray(table.column("width").fill_null(0), dtype=np.float64) if n else np.zeros(0)
    height = np.asarray(table.column("height").fill_null(0), dtype=np.float64) if n else np.zeros(0)
    histograms = {
        "instances_per_image": _histogram(per_image.astype(np.float64), np.arange(-0.5, max(per_image.max(), 1) + 1)
                                          if len(per_image) else 10),
        "image_width": _histogram(width, 20),
        "box_area": _histogram(np.sqrt(np.maximum(box_w * box_h, 0)), 30),
        "box_aspect": _histogram(aspect, np.geomspace(min(aspect.min(), 0.25), max(aspect.max(), 4.0), 31)
                                 if len(aspect) else np.geomspace(0.25, 4.0, 31)),
    }
    return DatasetStats(
        dataset=dataset, version=version, query=query, items=n, labels=labels, histograms=histograms,
        instances_per_image={**_summary(per_image.astype(np.float64)), "histogram": histogram},
        kinds=kinds, image_width=_summary(width), image_height=_summary(height),
        box_width=_summary(box_w), box_height=_summary(box_h), box_aspect=_summary(aspect),
        tags=tags, attributes=attributes)
