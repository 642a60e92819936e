"""Deterministic synthetic street-scene data: annotated JPEGs plus a COCO file.

Why this exists: demos, tests and benchmarks of the dataset store need a corpus of annotated
images whose *label distribution is known in advance*, that anyone can regenerate byte-for-byte
from a seed without downloading anything. :func:`make_demo_data` draws simple but recognisable
street scenes with Pillow (sky, buildings, road; day and night; clear, overcast, rain, fog) and
places four kinds of object on them:

=============  ===========  ====================================================================
category       count/image  drawn as
=============  ===========  ====================================================================
car (1)        0..8         body rectangle + cabin + two wheels (side view) or a rear view
pedestrian (2) 0..5         head circle + torso + arms + two legs
traffic light  0..3         dark housing with three lamps (one lit) on a grey pole
bicycle (4)    0..3         two wheel circles + frame, saddle and handlebar
=============  ===========  ====================================================================

Counts are binomial: cars ``B(8, 0.35)``; pedestrians ``B(5, 0.30)`` by day and ``B(5, 0.15)``
at night; traffic lights ``B(3, 0.35)``; bicycles ``B(3, 0.20)``. About 30% of scenes are night,
so the query ``labels.car > 3 and labels.pedestrian >= 1`` selects about 22% of images
(a real minority, never empty, never everything). Measured on n=2000 (seed 0): mean objects per
image car 2.82, pedestrian 1.27, traffic light 1.07, bicycle 0.59; 2.2-2.6 ms per image on one
core.

Properties the callers rely on:

* **Determinism.** Image ``i`` depends only on ``(seed, i)``: the same seed gives byte-identical
  JPEGs and JSON, ``n=100`` yields the same first 100 images as ``n=200``, and ``workers>1``
  (a process pool) writes exactly what ``workers=1`` writes. JPEG settings are fixed (quality 90,
  4:2:0, baseline).
* **Tight boxes.** Each ``bbox`` ``[x, y, w, h]`` (integer pixels, COCO convention) encloses
  exactly the pixels drawn for the object. Traffic-light poles are street furniture, not part of
  the object (as in COCO). Objects overlap and occlude each other (drawn far to near); rain and
  fog are painted over everything afterwards.
* **Border overflow.** About 1.5% of objects (at most ~2% of boxes) are pushed up to 8 px past
  the left, right, bottom (ground objects) or top (traffic lights) image border, so the box
  extends slightly outside the image and an ingester has something to clip. All other boxes lie
  fully inside the image.
* **EXIF orientation.** About 3% of images are stored rotated with an EXIF Orientation tag of
  3, 6 or 8; after :func:`PIL.ImageOps.exif_transpose` they look upright, and the COCO
  ``width``/``height``/annotations always describe that upright image.
* **Extra fields.** Each COCO image carries ``"attributes": {"time_of_day": "day"|"night",
  "weather": "clear"|"overcast"|"rain"|"fog"}``. Cars and traffic lights carry a
  ``segmentation`` polygon; ``area`` is the polygon area where there is one, else ``w * h``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from orchestrator.errors import ConfigError

__all__ = ["CATEGORIES", "CATEGORY_IDS", "make_demo_data"]

log = logging.getLogger(__name__)

CATEGORIES: tuple[dict[str, Any], ...] = (
    {"id": 1, "name": "car", "supercategory": "vehicle"},
    {"id": 2, "name": "pedestrian", "supercategory": "person"},
    {"id": 3, "name": "traffic light", "supercategory": "outdoor"},
    {"id": 4, "name": "bicycle", "supercategory": "vehicle"},
)
CATEGORY_IDS: dict[str, int] = {c["name"]: c["id"] for c in CATEGORIES}

JPEG_QUALITY = 90
_SEED_DOMAIN = 0x5EED_DE30  # separates these streams from any other use of the same seed
_NIGHT_P = 0.30
_PORTRAIT_P = 0.10
_EXIF_P = 0.03
_OVERFLOW_P = 0.015
_MAX_OVERFLOW_PX = 8
_WEATHERS = ("clear", "overcast", "rain", "fog")
_WEATHER_W = (0.55, 0.20, 0.15, 0.10)
# exif Orientation -> transpose that turns the upright image into the stored one (the inverse of
# what exif_transpose applies when reading).
_EXIF_STORE = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}

Color = tuple[int, int, int]
Ann = dict[str, Any]

_CAR_COLORS: tuple[Color, ...] = (
    (200, 30, 35), (30, 70, 170), (235, 235, 235), (25, 25, 28), (130, 135, 140), (200, 170, 30),
    (30, 120, 60), (110, 20, 30), (70, 160, 200), (190, 190, 200), (230, 110, 20),
)
_SKIN: tuple[Color, ...] = ((240, 200, 170), (210, 160, 120), (160, 110, 75), (100, 65, 40))
_CLOTHES: tuple[Color, ...] = (
    (180, 30, 40), (30, 60, 140), (40, 40, 45), (230, 230, 220), (60, 120, 60), (200, 140, 30),
    (120, 60, 140), (90, 90, 95), (20, 130, 160),
)
_PANTS: tuple[Color, ...] = ((35, 40, 70), (40, 40, 40), (90, 80, 60), (60, 60, 70), (20, 30, 50))
_BUILDINGS: tuple[Color, ...] = (
    (150, 80, 60), (170, 160, 150), (200, 185, 150), (110, 120, 135), (90, 110, 140), (180, 120, 90),
    (140, 140, 130),
)
_BIKE_COLORS: tuple[Color, ...] = ((200, 30, 30), (30, 30, 30), (30, 90, 180), (220, 220, 220), (40, 140, 70))
_LAMPS: tuple[Color, ...] = ((235, 35, 30), (245, 175, 20), (40, 225, 100))


# ----------------------------------------------------------------------------------------------
# public API


def make_demo_data(out_dir: Path, n: int, seed: int = 0, *, workers: int = 1) -> Path:
    """Draw ``n`` street scenes into ``out_dir/images/`` and write ``out_dir/annotations.json``.

    Image ``i`` is ``images/street_{i:06d}.jpg`` with COCO image id ``i + 1``; annotation ids
    run from 1 in image order. Returns the path of the COCO JSON file.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"demo data needs a count n >= 0, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"demo data needs an integer seed >= 0, got {seed!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"demo data needs workers >= 1, got {workers!r}")
    out_dir = Path(out_dir)
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    images: list[dict[str, Any]] = []
    annotations: list[Ann] = []
    for image, anns in _generate(img_dir, n, seed, workers):
        images.append(image)
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, **ann})
    coco = {
        "info": {
            "description": "orchestrator synthetic street scenes (orchestrator.demo)",
            "version": "1",
            "seed": seed,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in CATEGORIES],
    }
    coco_path = out_dir / "annotations.json"
    tmp = coco_path.with_name(coco_path.name + ".tmp")
    tmp.write_text(json.dumps(coco, separators=(",", ":")), encoding="utf-8")
    os.replace(tmp, coco_path)
    dt = time.perf_counter() - t0
    log.info(
        "wrote %d demo images (%d annotations, seed %d, %d workers) to %s in %.2fs (%.2f ms/image)",
        n, len(annotations), seed, workers, out_dir, dt, 1000 * dt / max(n, 1),
    )
    return coco_path


# ----------------------------------------------------------------------------------------------
# driver


def _generate(img_dir: Path, n: int, seed: int, workers: int) -> Iterator[tuple[dict[str, Any], list[Ann]]]:
    """Yield (COCO image dict, annotations without ids) in index order, in-process or pooled."""
    if workers == 1 or n < 2:
        for i in range(n):
            yield _write_one(img_dir, seed, i)
        return
    workers = min(workers, n)
    chunk = max(1, min(64, n // (workers * 4)))
    # fork where the platform has it: children only draw and encode (no locks, no logging), and
    # unlike spawn it works from scripts that lack an ``if __name__ == "__main__"`` guard.
    method = "fork" if "fork" in get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context(method)) as pool:
        yield from pool.map(_write_one, [img_dir] * n, [seed] * n, range(n), chunksize=chunk)


def _write_one(img_dir: Path, seed: int, index: int) -> tuple[dict[str, Any], list[Ann]]:
    """Render image ``index``, save it as JPEG (EXIF-rotated when drawn so), return its COCO parts."""
    img, attrs, anns, orientation = _render(seed, index)
    name = f"street_{index:06d}.jpg"
    save_kw: dict[str, Any] = {"quality": JPEG_QUALITY, "subsampling": "4:2:0", "optimize": False}
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation  # Orientation
        save_kw["exif"] = exif.tobytes()
        stored = img.transpose(_EXIF_STORE[orientation])
    else:
        stored = img
    stored.save(img_dir / name, "JPEG", **save_kw)
    image_id = index + 1
    image = {
        "id": image_id,
        "file_name": name,
        "width": img.width,
        "height": img.height,
        "attributes": attrs,
    }
    for a in anns:
        a["image_id"] = image_id
    return image, [
        {k: a[k] for k in ("image_id", "category_id", "bbox", "area", "iscrowd", "segmentation") if k in a}
        for a in anns
    ]


def _rng(seed: int, index: int) -> random.Random:
    """Per-image generator: depends only on (seed, index)."""
    state = np.random.SeedSequence([_SEED_DOMAIN, seed, index]).generate_state(4, dtype=np.uint32)
    return random.Random(int.from_bytes(state.tobytes(), "little"))


# ----------------------------------------------------------------------------------------------
# scene


def _binom(rng: random.Random, n: int, p: float) -> int:
    return sum(rng.random() < p for _ in range(n))


def _shade(c: Color, f: float) -> Color:
    return (min(255, int(c[0] * f)), min(255, int(c[1] * f)), min(255, int(c[2] * f)))


def _render(seed: int, index: int) -> tuple[Image.Image, dict[str, str], list[Ann], int]:
    """Draw image ``index`` upright; return it, its attributes, its annotations and EXIF orientation."""
    rng = _rng(seed, index)
    if rng.random() < _PORTRAIT_P:
        H = rng.randint(320, 640)
        W = min(480, max(240, round(H / rng.uniform(1.25, 1.5))))
    else:
        W = rng.randint(320, 640)
        H = min(480, max(240, round(W / rng.uniform(1.25, 1.8))))
    night = rng.random() < _NIGHT_P
    weather = rng.choices(_WEATHERS, _WEATHER_W)[0]
    orientation = rng.choice((3, 6, 6, 8, 8)) if rng.random() < _EXIF_P else 1
    light = (0.45 if night else 1.0) * rng.uniform(0.85, 1.1)
    horizon = int(H * rng.uniform(0.38, 0.55))

    img = _background(rng, W, H, horizon, night, weather, light)
    d = ImageDraw.Draw(img)
    vx = _road(rng, d, W, H, horizon, night)
    _buildings(rng, d, W, horizon, night, light)

    counts = {
        1: _binom(rng, 8, 0.35),
        2: _binom(rng, 5, 0.15 if night else 0.30),
        3: _binom(rng, 3, 0.35),
        4: _binom(rng, 3, 0.20),
    }
    ref = min(W, H)
    anns: list[Ann] = []
    # traffic lights first: they stand at the back (their poles are background furniture)
    for _ in range(counts[3]):
        anns.append(_traffic_light(rng, d, W, H, horizon, ref, light))
    ground: list[tuple[int, int, int, int, int]] = []  # (category, x0, y0, w, h)
    for cat in (1, 2, 4):
        for _ in range(counts[cat]):
            ground.append(_place_ground(rng, cat, W, H, horizon, ref, vx))
    ground.sort(key=lambda g: (g[2] + g[4], g[1], g[0]))  # by bottom edge: far (high) first
    for cat, x0, y0, w, h in ground:
        if cat == 1:
            anns.append(_car(rng, d, x0, y0, w, h, night, light))
        elif cat == 2:
            anns.append(_pedestrian(rng, d, x0, y0, w, h, light))
        else:
            anns.append(_bicycle(rng, d, x0, y0, w, h, light))

    if weather == "rain":
        _rain(rng, d, W, H, night)
    elif weather == "fog":
        fog = _shade((200, 203, 208), 0.5 if night else 1.0)
        img = Image.blend(img, Image.new("RGB", (W, H), fog), rng.uniform(0.25, 0.45))
    return img, {"time_of_day": "night" if night else "day", "weather": weather}, anns, orientation


def _background(rng: random.Random, W: int, H: int, horizon: int, night: bool, weather: str,
                light: float) -> Image.Image:
    """Sky gradient above the horizon, ground gradient below (numpy, no per-pixel Python)."""
    if night:
        top, bot = (8, 10, 30), (40, 38, 62)
    elif weather in ("overcast", "rain", "fog"):
        top, bot = (135, 140, 150), (195, 197, 202)
    else:
        top, bot = (70, 130, 220), (185, 212, 245)
    top = _shade(top, rng.uniform(0.9, 1.1))
    ground = _shade(rng.choice(((120, 118, 112), (95, 110, 80), (140, 132, 120))), light)
    rows = np.empty((H, 3), dtype=np.float32)
    t = np.linspace(0.0, 1.0, max(horizon, 1), dtype=np.float32)[:, None]
    rows[:horizon] = (1 - t) * np.asarray(top, np.float32) + t * np.asarray(bot, np.float32)
    g = np.linspace(0.85, 1.05, H - horizon, dtype=np.float32)[:, None]
    rows[horizon:] = g * np.asarray(ground, np.float32)
    rows = np.clip(rows, 0, 255).astype(np.uint8)
    arr = np.ascontiguousarray(np.broadcast_to(rows[:, None, :], (H, W, 3)))
    return Image.fromarray(arr, "RGB")


def _road(rng: random.Random, d: ImageDraw.ImageDraw, W: int, H: int, horizon: int, night: bool) -> float:
    """Road trapezoid towards a vanishing point with edge lines and centre dashes; returns its x."""
    vx = W * rng.uniform(0.35, 0.65)
    tw = W * 0.03
    asphalt = _shade((78, 78, 82), 0.45 if night else rng.uniform(0.9, 1.1))
    bl, br = -W * rng.uniform(0.1, 0.4), W * rng.uniform(1.1, 1.4)
    d.polygon([(vx - tw, horizon), (vx + tw, horizon), (br, H), (bl, H)], fill=asphalt)
    paint = _shade((235, 235, 225), 0.6 if night else 1.0)
    d.line([(vx - tw, horizon), (bl + W * 0.05, H)], fill=paint, width=2)
    d.line([(vx + tw, horizon), (br - W * 0.05, H)], fill=paint, width=2)
    cx_bot = (bl + br) / 2
    t = 0.06
    while t < 1.0:
        t2 = min(1.0, t * 1.35)
        ya, yb = horizon + t * (H - horizon), horizon + (t + (t2 - t) * 0.55) * (H - horizon)
        xa, xb = vx + t * (cx_bot - vx), vx + (t + (t2 - t) * 0.55) * (cx_bot - vx)
        wa, wb = 1 + t * W * 0.012, 1 + t2 * W * 0.012
        d.polygon([(xa - wa, ya), (xa + wa, ya), (xb + wb, yb), (xb - wb, yb)], fill=paint)
        t = t2 + 0.02
    return vx


def _buildings(rng: random.Random, d: ImageDraw.ImageDraw, W: int, horizon: int, night: bool,
               light: float) -> None:
    """A skyline of blocks with window grids (lit at random by night) standing on the horizon."""
    x = -rng.randint(0, 20)
    lit = _shade((255, 215, 120), 1.0)
    while x < W:
        bw = rng.randint(max(12, W // 14), max(13, W // 4))
        bh = rng.randint(max(6, horizon // 6), max(7, int(horizon * 0.9)))
        if rng.random() < 0.15:  # gap between buildings
            x += bw // 2
            continue
        col = _shade(rng.choice(_BUILDINGS), light * rng.uniform(0.85, 1.1))
        top = horizon - bh
        d.rectangle([x, top, x + bw - 1, horizon], fill=col)
        if bw >= 16 and bh >= 16 and rng.random() < 0.8:
            ws = max(3, bw // 7)
            step = ws * 2
            dark = _shade(col, 0.55)
            day_win = _shade((150, 175, 200), light)
            for wy in range(top + ws, horizon - ws, step):
                for wx in range(x + ws // 2 + 1, x + bw - ws - 1, step):
                    if night:
                        fill = lit if rng.random() < 0.35 else dark
                    else:
                        fill = day_win
                    d.rectangle([wx, wy, wx + ws - 1, wy + ws - 1], fill=fill)
        x += bw


def _rain(rng: random.Random, d: ImageDraw.ImageDraw, W: int, H: int, night: bool) -> None:
    c = _shade((205, 210, 220), 0.55 if night else 1.0)
    slant = rng.uniform(-0.35, 0.1)
    for _ in range(W * H // 2500):
        x, y, ln = rng.randint(0, W), rng.randint(0, H), rng.randint(5, 14)
        d.line([(x, y), (x + slant * ln, y + ln)], fill=c, width=1)


# ----------------------------------------------------------------------------------------------
# objects. Every drawer gets an integer box (x0, y0, w, h) and draws exactly inside
# [x0, x0 + w - 1] x [y0, y0 + h - 1], touching all four edges, so the box is tight.


def _place_ground(rng: random.Random, cat: int, W: int, H: int, horizon: int, ref: int,
                  vx: float) -> tuple[int, int, int, int, int]:
    """Pick a box for a ground object: perspective size from its foot row, random x."""
    s = rng.uniform(0.08, 1.0) ** 0.8  # depth: 0 at the horizon, 1 at the bottom row
    bottom = horizon + int(s * (H - 1 - horizon))
    u = rng.uniform(0.8, 1.2)
    if cat == 1:  # car: side view (wide) or rear view
        h = max(10, round(ref * 0.28 * s * u))
        w = round(h * (rng.uniform(1.9, 2.5) if rng.random() < 0.7 else rng.uniform(1.15, 1.4)))
    elif cat == 2:  # pedestrian
        h = max(16, round(ref * 0.5 * s * u))
        w = max(6, round(h * rng.uniform(0.32, 0.45)))
    else:  # bicycle
        h = max(12, round(ref * 0.26 * s * u))
        w = round(h * rng.uniform(1.55, 1.8))
    if w > W - 4 or h > H - 4:  # never larger than the frame
        f = min((W - 4) / w, (H - 4) / h)
        w, h = max(6, int(w * f)), max(10, int(h * f))
    y0 = min(max(0, bottom - h + 1), H - h)
    x0 = rng.randint(0, W - w)
    if rng.random() < _OVERFLOW_P:
        x0, y0 = _overflow(rng, x0, y0, w, h, W, H, ("left", "right", "bottom"))
    return cat, x0, y0, w, h


def _overflow(rng: random.Random, x0: int, y0: int, w: int, h: int, W: int, H: int,
              sides: tuple[str, ...]) -> tuple[int, int]:
    """Push a box 1..8 px past one image border (the few boxes an ingester must clip)."""
    side = rng.choice(sides)
    dmax = max(1, min(_MAX_OVERFLOW_PX, w // 4 if side in ("left", "right") else h // 4))
    dd = rng.randint(1, dmax)
    if side == "left":
        return -dd, y0
    if side == "right":
        return W - w + dd, y0
    if side == "bottom":
        return x0, H - h + dd
    return x0, -dd  # top


def _ann(cat: int, x0: int, y0: int, w: int, h: int, seg: list[float] | None = None) -> Ann:
    a: Ann = {"category_id": cat, "bbox": [x0, y0, w, h], "iscrowd": 0}
    if seg is not None:
        a["segmentation"] = [seg]
        a["area"] = round(_poly_area(seg), 2)
    else:
        a["area"] = float(w * h)
    return a


def _poly_area(p: list[float]) -> float:
    xs, ys = p[0::2], p[1::2]
    n = len(xs)
    return abs(sum(xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n))) / 2


def _car(rng: random.Random, d: ImageDraw.ImageDraw, x0: int, y0: int, w: int, h: int, night: bool,
         light: float) -> Ann:
    x1, y1 = x0 + w - 1, y0 + h - 1
    paint = _shade(rng.choice(_CAR_COLORS), light * rng.uniform(0.9, 1.05))
    glass = _shade((120, 150, 175), light * 0.8)
    tyre = _shade((22, 22, 24), light)
    if w >= 1.7 * h:  # side view
        r = max(2, round(h * 0.19))
        cy = y1 - r
        yb0 = y0 + max(2, round(h * 0.38))
        yb0 = min(yb0, cy - 1)
        front_right = rng.random() < 0.5
        a, b, c, e = (0.18, 0.32, 0.66, 0.84) if front_right else (0.16, 0.34, 0.68, 0.82)
        cab = [(x0 + a * w, yb0), (x0 + b * w, y0), (x0 + c * w, y0), (x0 + e * w, yb0)]
        d.polygon(cab, fill=paint)
        if h >= 14:
            ins = max(1, h * 0.08)
            d.polygon([(cab[0][0] + 2 * ins, yb0), (cab[1][0] + ins, y0 + ins), (cab[2][0] - ins, y0 + ins),
                       (cab[3][0] - 2 * ins, yb0)], fill=glass)
        d.rectangle([x0, yb0, x1, cy], fill=paint)
        off = max(r, round(w * 0.2))
        for cx in (x0 + off, x1 - off):
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tyre)
            if r >= 4:
                hr = max(1, r // 2)
                d.ellipse([cx - hr, cy - hr, cx + hr, cy + hr], fill=_shade((170, 170, 175), light))
        lh = max(1, (cy - yb0) // 3)
        lw = max(1, w // 25)
        head = (255, 245, 190) if night else _shade((230, 225, 200), light)
        tail = (230, 30, 30) if night else _shade((170, 30, 30), light)
        fx, rx = (x1 - lw + 1, x0) if front_right else (x0, x1 - lw + 1)
        d.rectangle([fx, yb0 + 1, fx + lw - 1, yb0 + lh], fill=head)
        d.rectangle([rx, yb0 + 1, rx + lw - 1, yb0 + lh], fill=tail)
        # silhouette: cabin + body, with the lower halves of the wheels as two tabs
        rl, rr, fl, fr = x0 + off - r, x0 + off + r + 1, x1 - off - r, x1 - off + r + 1
        seg = [x0, yb0, cab[0][0], yb0, cab[1][0], y0, cab[2][0] + 1, y0, cab[3][0] + 1, yb0, x1 + 1, yb0,
               x1 + 1, cy + 1, fr, cy + 1, fr, y1 + 1, fl, y1 + 1, fl, cy + 1, rr, cy + 1, rr, y1 + 1,
               rl, y1 + 1, rl, cy + 1, x0, cy + 1]
    else:  # rear view
        yb0 = y0 + max(2, round(h * 0.36))
        yb1 = y1 - max(1, round(h * 0.13))
        inset = round(w * 0.12)
        d.polygon([(x0 + inset // 2, yb0), (x0 + inset, y0), (x1 - inset, y0), (x1 - inset // 2, yb0)], fill=paint)
        if h >= 14:
            g = max(1, round(h * 0.07))
            d.polygon([(x0 + inset // 2 + 2 * g, yb0 - 1), (x0 + inset + g, y0 + g), (x1 - inset - g, y0 + g),
                       (x1 - inset // 2 - 2 * g, yb0 - 1)], fill=glass)
        d.rectangle([x0, yb0, x1, yb1], fill=paint)
        tw = max(1, round(w * 0.2))
        d.rectangle([x0 + 1, yb1 + 1, x0 + tw, y1], fill=tyre)
        d.rectangle([x1 - tw, yb1 + 1, x1 - 1, y1], fill=tyre)
        lw, lh = max(1, round(w * 0.14)), max(1, (yb1 - yb0) // 4)
        tail = (240, 35, 35) if night else _shade((190, 30, 30), light)
        d.rectangle([x0 + 1, yb0 + 1, x0 + lw, yb0 + lh], fill=tail)
        d.rectangle([x1 - lw, yb0 + 1, x1 - 1, yb0 + lh], fill=tail)
        pw, ph = max(1, round(w * 0.12)), max(1, (yb1 - yb0) // 5)
        cx = (x0 + x1) // 2
        d.rectangle([cx - pw, yb1 - ph - 1, cx + pw, yb1 - 1], fill=_shade((235, 235, 230), light))
        seg = [x0 + inset / 2, yb0, x0 + inset, y0, x1 + 1 - inset, y0, x1 + 1 - inset / 2, yb0, x1 + 1, yb0,
               x1 + 1, y1 + 1, x0, y1 + 1, x0, yb0]
    return _ann(1, x0, y0, w, h, [round(float(v), 1) for v in seg])


def _pedestrian(rng: random.Random, d: ImageDraw.ImageDraw, x0: int, y0: int, w: int, h: int,
                light: float) -> Ann:
    x1, y1 = x0 + w - 1, y0 + h - 1
    cx = (x0 + x1) // 2
    skin = _shade(rng.choice(_SKIN), light)
    shirt = _shade(rng.choice(_CLOTHES), light)
    pants = _shade(rng.choice(_PANTS), light)
    r = max(2, round(h * 0.085))
    tw = max(1, round(w * 0.2))
    neck = y0 + 2 * r + 1
    hip = y0 + round(h * 0.55)
    lw = max(1, round(w * 0.16))
    # legs: from the hips out to the two lower corners of the box
    d.polygon([(cx - tw, hip), (cx, hip), (x0 + lw, y1), (x0, y1)], fill=pants)
    d.polygon([(cx, hip), (cx + tw, hip), (x1, y1), (x1 - lw, y1)], fill=pants)
    d.rectangle([cx - tw, neck, cx + tw, hip], fill=shirt)
    aw = max(1, round(w * 0.1))
    arm_end = y0 + round(h * 0.52)
    d.rectangle([max(x0, cx - tw - aw), neck + 1, cx - tw - 1, arm_end], fill=shirt)
    d.rectangle([cx + tw + 1, neck + 1, min(x1, cx + tw + aw), arm_end], fill=shirt)
    d.ellipse([cx - r, y0, cx + r, y0 + 2 * r], fill=skin)
    return _ann(2, x0, y0, w, h)


def _traffic_light(rng: random.Random, d: ImageDraw.ImageDraw, W: int, H: int, horizon: int, ref: int,
                   light: float) -> Ann:
    h = max(12, round(ref * rng.uniform(0.06, 0.15)))
    w = max(5, round(h * rng.uniform(0.36, 0.44)))
    x0 = rng.randint(0, W - w)
    y0 = rng.randint(2, max(2, min(horizon - h, H // 2 - h)))
    if rng.random() < _OVERFLOW_P:
        x0, y0 = _overflow(rng, x0, y0, w, h, W, H, ("left", "right", "top"))
    x1, y1 = x0 + w - 1, y0 + h - 1
    cx = (x0 + x1) // 2
    pw = max(1, w // 8)
    ground = min(H - 1, max(y1 + 2, horizon + rng.randint(0, max(1, (H - horizon) // 3))))
    if y1 + 1 <= ground:  # pole: background furniture below the housing, not part of the box
        d.rectangle([cx - pw, y1 + 1, cx + pw, ground], fill=_shade((95, 98, 100), light))
    d.rectangle([x0, y0, x1, y1], fill=_shade(rng.choice(((28, 28, 30), (30, 45, 35), (45, 45, 40))), 1.0))
    on = rng.randrange(3)
    pad = max(1, w // 6)
    rr = max(1, min((w - 2 * pad) // 2, (h - 4 * pad) // 6))
    for k in range(3):
        cy = y0 + pad + rr + k * (h - 2 * pad - 2 * rr) // 2
        col = _LAMPS[k] if k == on else _shade(_LAMPS[k], 0.25)
        d.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=col)
    seg = [x0, y0, x1 + 1, y0, x1 + 1, y1 + 1, x0, y1 + 1]
    return _ann(3, x0, y0, w, h, [float(v) for v in seg])


def _bicycle(rng: random.Random, d: ImageDraw.ImageDraw, x0: int, y0: int, w: int, h: int,
             light: float) -> Ann:
    x1, y1 = x0 + w - 1, y0 + h - 1
    frame = _shade(rng.choice(_BIKE_COLORS), light)
    tyre = _shade((25, 25, 25), light)
    r = max(3, min(round(h * 0.36), (w - 2) // 4))
    tw = max(1, round(h / 13))
    fw = max(1, round(h / 16))
    rear, front = (x0 + r, y1 - r), (x1 - r, y1 - r)
    if rng.random() < 0.5:  # facing left: mirror the frame
        rear, front = front, rear
    sgn = 1 if front[0] > rear[0] else -1
    pedal = (rear[0] + 0.45 * (front[0] - rear[0]), y1 - r + max(1, r // 4))
    seat = (rear[0] + sgn * 0.3 * abs(front[0] - rear[0]), y0 + max(2, round(h * 0.16)))
    bar = (front[0] - sgn * max(1, round(r * 0.25)), y0 + max(tw + 1, round(h * 0.1)))
    for c in (rear, front):
        d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], outline=tyre, width=tw)
    for a, b in ((rear, pedal), (rear, seat), (pedal, seat), (seat, bar), (pedal, bar), (bar, front)):
        d.line([a, b], fill=frame, width=fw)
    hw = max(1, round(r * 0.35))
    bh = max(1, fw)
    d.rectangle([round(bar[0]) - hw, y0, round(bar[0]) + hw, y0 + bh - 1], fill=tyre)  # handlebar
    d.line([(bar[0], y0 + bh), bar], fill=tyre, width=fw)
    sw = max(1, round(r * 0.3))
    d.rectangle([round(seat[0]) - sw, round(seat[1]) - max(1, fw), round(seat[0]) + sw, round(seat[1])],
                fill=tyre)  # saddle
    return _ann(4, x0, y0, w, h)
