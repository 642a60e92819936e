"""Decode cost per image: full size vs straight to the model's size (``StreamOptions.image_size``).

    python benchmarks/decode_size.py [--n 200] [--rounds 5] [--size 128] [--large-size 256]

No I/O in the timed part: the bytes are in memory. Two inputs:

* demo scenes (``orchestrator.dev.demo``, 320-640 px JPEGs, some EXIF-rotated) to ``--size``
  square, the training configs' usual size;
* one 2000x1500 JPEG (noise over gradients, quality 90) to ``--large-size`` square, where
  Pillow's draft mode decodes at 1/4 scale.

Printed per input (median over ``--rounds`` rounds, the three ways interleaved in each
round; one thread):

* ``full``: ``decode_image(data)``, what every read path did before ``image_size``;
* ``full+resize``: that, then the bilinear resize ``train.batches.prepare_item`` makes
  (the old pipeline's total for one image);
* ``to size``: ``decode_image(data, size=...)``, decode and resize in one step;
* the bytes of one decoded image that cross a process boundary (a DataLoader worker's queue,
  Ray's object store) either way.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.dev.demo import make_demo_data  # noqa: E402
from orchestrator.stream.decode import RESIZE_FILTER, decode_image  # noqa: E402


def _large_jpeg(width: int = 2000, height: int = 1500) -> bytes:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([255 * x / width, 255 * y / height, 127 + 100 * np.sin(x / 37.0) * np.cos(y / 23.0)], axis=2)
    pixels = np.clip(base + rng.normal(0, 12, size=base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


def _report(name: str, blobs: list[bytes], size: int, rounds: int) -> None:
    wh = (size, size)
    ways: dict[str, Callable[[bytes], np.ndarray]] = {
        "full": decode_image,
        "full+resize": lambda d: np.asarray(Image.fromarray(decode_image(d)).resize(wh, RESIZE_FILTER)),
        "to size": lambda d: decode_image(d, size=wh),
    }
    times: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(rounds):  # interleaved: a change in the machine's load hits every way alike
        for way, fn in ways.items():
            t0 = time.perf_counter()
            for data in blobs:
                fn(data)
            times[way].append((time.perf_counter() - t0) / len(blobs))
    ms = {way: 1000 * statistics.median(t) for way, t in times.items()}
    full_bytes = statistics.mean(decode_image(d).nbytes for d in blobs[:50])
    print(f"{name}: {len(blobs)} images -> {size}x{size}, median of {rounds} interleaved rounds, 1 thread")
    for way, v in ms.items():
        print(f"  {way:<12} {v:7.2f} ms/image  ({1000 / v:7.0f}/s)")
    print(f"  to size: {ms['full+resize'] / ms['to size']:.2f}x full+resize, {ms['full'] / ms['to size']:.2f}x full")
    print(f"  decoded bytes per image: {full_bytes / 1e3:,.0f} kB full, {size * size * 3 / 1e3:,.0f} kB to size")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200, help="demo scenes")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size", type=int, default=128, help="target side for the demo scenes")
    ap.add_argument("--large-size", type=int, default=256, help="target side for the 2000x1500 JPEG")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        make_demo_data(Path(tmp), args.n, seed=0)
        demo = [f.read_bytes() for f in sorted(Path(tmp, "images").glob("*.jpg"))]
    sizes = [Image.open(io.BytesIO(d)).size for d in demo]
    print(f"demo scenes: {min(s[0] for s in sizes)}-{max(s[0] for s in sizes)} x "
          f"{min(s[1] for s in sizes)}-{max(s[1] for s in sizes)} px, {statistics.mean(map(len, demo)) / 1e3:.0f} kB")
    _report("demo scenes", demo, args.size, args.rounds)
    _report("2000x1500 JPEG", [_large_jpeg()] * 20, args.large_size, args.rounds)


if __name__ == "__main__":
    main()
