"""A contact sheet: a grid of thumbnails with their boxes, polygons and label names drawn in
stable per-label colours and each item's id under it (``Dataset.contact_sheet``,
``orchestrator show``).

Pillow only, so a notebook displays the returned image as it is and a terminal user gets a PNG.
A label's colour comes from a hash of its name, not from its position in the label map, so
``car`` has the same colour in every sheet of every version and dataset. Where each thumbnail and
each drawn box landed is kept in ``image.info["cells"]`` (what a test or a caller can check).
"""

from __future__ import annotations

import colorsys
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (24, 24, 24)
CAPTION_PX = 16


def label_colour(name: str) -> tuple[int, int, int]:
    """A bright colour for a label name, the same everywhere."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:2], "big") / 65536
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def contact_sheet(items: Sequence[dict[str, Any]], *, columns: int = 6, thumb: int = 192,
                  labels: bool = True) -> Image.Image:
    """Draw ``items`` (as ``ds[i]`` returns them) in a grid of ``columns`` cells of ``thumb``
    pixels, each image scaled to fit its cell (aspect kept), geometry scaled with it."""
    if columns < 1 or thumb < 16:
        raise ValueError(f"columns must be >= 1 and thumb >= 16, got {columns} and {thumb}")
    rows = max(1, -(-len(items) // columns))
    sheet = Image.new("RGB", (columns * thumb, rows * (thumb + CAPTION_PX)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    cells = []
    for k, item in enumerate(items):
        x0, y0 = (k % columns) * thumb, (k // columns) * (thumb + CAPTION_PX)
        image = np.asarray(item["image"])
        h, w = image.shape[:2]
        scale = min(thumb / w, thumb / h)
        tw, th = max(1, round(w * scale)), max(1, round(h * scale))
        ox, oy = x0 + (thumb - tw) // 2, y0 + (thumb - th) // 2
        sheet.paste(Image.fromarray(image).resize((tw, th), Image.BILINEAR), (ox, oy))
        drawn = []
        names = item.get("label_names") or []
        polygons = item.get("polygons") or [None] * len(names)
        for box, name, polygon in zip(np.asarray(item["boxes"]).reshape(-1, 4), names, polygons, strict=False):
            colour = label_colour(str(name))
            poly = np.asarray(polygon if polygon is not None else [], dtype=np.float64).reshape(-1, 2)
            if len(poly) >= 3:
                draw.polygon([(ox + px * scale, oy + py * scale) for px, py in poly], outline=colour, width=2)
            bx = [ox + box[0] * scale, oy + box[1] * scale, ox + box[2] * scale, oy + box[3] * scale]
            if len(poly) < 3:
                draw.rectangle(bx, outline=colour, width=2)
            if labels:
                draw.text((bx[0] + 2, max(y0, bx[1] - 11)), str(name), fill=colour, font=font)
            drawn.append({"label": str(name), "box": [round(v, 1) for v in bx], "polygon": len(poly) >= 3})
        caption = str(item["id"])
        if draw.textlength(caption, font=font) > thumb - 4:
            while caption and draw.textlength(caption + "…", font=font) > thumb - 4:
                caption = caption[:-1]
            caption += "…"
        draw.text((x0 + 2, y0 + thumb + 2), caption, fill=(230, 230, 230), font=font)
        cells.append({"id": str(item["id"]), "x": ox, "y": oy, "width": tw, "height": th, "drawn": drawn})
    sheet.info["cells"] = cells
    return sheet
