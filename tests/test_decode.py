"""stream.decode: decoding straight to a size (``StreamOptions.image_size``) gives what decoding
at full size and resizing gives, up to a stated tolerance; geometry is scaled with the image;
``train.batches.prepare_item`` makes the same example of a sized item as of a full-size one.

The reference everywhere is the full-size decode (``decode_image`` without a size, which the
read contract checks against the source) followed by Pillow's bilinear resize, the resize
``prepare_item`` makes. No store, no Ray.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from orchestrator.errors import ConfigError
from orchestrator.manifest import LabelMap, base_field
from orchestrator.stream.decode import _draft, decode_image, image_size_wh
from orchestrator.stream.item import ITEM_COLUMNS, ItemBlock
from orchestrator.stream.plan import StreamOptions
from orchestrator.train.batches import prepare_item

# Mean absolute difference per image (0..255 scale) allowed between decode-to-size and
# decode-then-resize where draft mode reduced first (a JPEG at least twice the size asked for).
# Where it does not (a smaller reduction, non-JPEGs) the two are bit-identical. Measured with
# Pillow 13.0 (libjpeg-turbo):
# - demo scenes (drawn shapes: hard edges, where the DCT-scaled decode is sharper than a
#   bilinear downscale): at most 2.1 at 128x128 (mean 0.8 over 40 scenes), 4.5 at 96x64 (mean
#   1.6); the 99th percentile of one image's differences reaches 26 and 41 on those edges;
# - the 2000x1500 noise-over-gradients JPEG, drafted at 1/4 or 1/2: 0.41 (256x256), 0.42
#   (300x200), 0.65 (640x480), 0.41 for every orientation, 99th percentile 2; drafted at 1/8
#   (the noise is averaged differently): 1.22 (64x64), 1.45 (128x128), 1.57 (200x150), 99th
#   percentile 11-13.
# A wrong orientation (the image rotated by 180°) gives 108: the bounds below are far from it.
DEMO_MAX_MEAN_ABS_DIFF = 5.0
LARGE_MAX_MEAN_ABS_DIFF = 2.0
LARGE_P99_ABS_DIFF = 16


def _jpeg(img: Image.Image, orientation: int = 1, quality: int = 90) -> bytes:
    out = io.BytesIO()
    kw: dict = {"quality": quality}
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    img.save(out, "JPEG", **kw)
    return out.getvalue()


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def _large(width: int = 2000, height: int = 1500, seed: int = 0) -> Image.Image:
    """Noise over gradients and stripes: fine detail everywhere, so any misplaced or
    mis-scaled pixel shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 255 * x / width
    g = 255 * y / height
    b = 127 + 100 * np.sin(x / 37.0) * np.cos(y / 23.0)
    base = np.stack([r, g, b], axis=2) + rng.normal(0, 12, size=(height, width, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")


def _resized(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR))


def _assert_close(got: np.ndarray, want: np.ndarray, max_mean: float = LARGE_MAX_MEAN_ABS_DIFF,
                  max_p99: float | None = LARGE_P99_ABS_DIFF) -> None:
    assert got.shape == want.shape and got.dtype == np.uint8
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.mean() <= max_mean, diff.mean()
    if max_p99 is not None:
        assert np.percentile(diff, 99) <= max_p99, np.percentile(diff, 99)


@pytest.fixture(scope="module")
def demo_jpegs(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    from orchestrator.dev.demo import make_demo_data

    out = tmp_path_factory.mktemp("demo_decode")
    make_demo_data(out, 16, seed=6)  # seed 6: two of the 16 are EXIF-rotated (3 and 8)
    files = sorted(Path(out, "images").glob("*.jpg"))
    assert len(files) == 16
    return [f.read_bytes() for f in files]


def _orientation(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as img:
        return int(img.getexif().get(0x0112, 1))


def test_demo_jpegs_decode_to_size_like_decode_then_resize(demo_jpegs):
    drafted = 0
    for data in demo_jpegs:
        full = decode_image(data)
        for size in [(128, 128), (96, 64)]:
            got = decode_image(data, "demo", size)
            assert got.shape == (size[1], size[0], 3)
            _assert_close(got, _resized(full, size), DEMO_MAX_MEAN_ABS_DIFF, None)
            with Image.open(io.BytesIO(data)) as img:
                stored = img.size
                _draft(img, size)
                drafted += img.size != stored
    # Guards: the demo set has EXIF-rotated images, and draft mode did reduce some of them
    # (otherwise this test compared two identical code paths).
    assert any(_orientation(d) != 1 for d in demo_jpegs)
    assert drafted >= 4, drafted


def test_a_large_jpeg_is_drafted_then_resized_to_exactly_the_size():
    img = _large()
    data = _jpeg(img)
    with Image.open(io.BytesIO(data)) as opened:
        _draft(opened, (256, 256))
        assert opened.size == (500, 375)  # 1/4 scale: the smallest that still covers 256x256
    full = decode_image(data)
    assert full.shape == (1500, 2000, 3)
    for size in [(256, 256), (300, 200), (640, 480), (128, 96)]:
        got = decode_image(data, "large", size)
        assert got.shape == (size[1], size[0], 3)
        _assert_close(got, _resized(full, size))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_jpegs_come_out_in_the_oriented_frame(orientation):
    """The stored image is the oriented one transposed back (as a camera writes it); size is
    asked for in the oriented frame, like the manifest's width and height."""
    oriented = _large(seed=orientation)  # 2000 x 1500 as seen
    store = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    data = _jpeg(oriented.transpose(store[orientation]), orientation)
    full = decode_image(data)
    assert full.shape == (1500, 2000, 3)
    # Same orientation as the full path (a wrong one would differ by far more than resampling).
    for size in [(256, 256), (300, 900), (400, 100)]:
        got = decode_image(data, "rotated", size)
        assert got.shape == (size[1], size[0], 3)
        _assert_close(got, _resized(full, size))
    # Draft is asked for in the stored frame: for a 90° rotation, (300, 900) oriented is
    # (900, 300) stored, which 1500 x 2000 only covers at full scale; the unswapped request
    # (300, 900) would have halved it to 1000 x 750 oriented, under the 900 rows asked for.
    with Image.open(io.BytesIO(data)) as opened:
        _draft(opened, (300, 900))
        w, h = opened.size if orientation == 3 else opened.size[::-1]
        assert w >= 300 and h >= 900


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "LA"])
def test_non_jpeg_images_decode_to_size_exactly_like_decode_then_resize(mode):
    rgb = _large(97, 61, seed=3)
    img = rgb.convert(mode) if mode != "P" else rgb.quantize(64)
    data = _png(img)
    full = decode_image(data)
    assert full.shape == (61, 97, 3)
    for size in [(32, 32), (50, 20), (97, 61), (200, 150)]:
        got = decode_image(data, "png", size)
        assert got.shape == (size[1], size[0], 3)
        assert np.array_equal(got, _resized(full, size) if size != (97, 61) else full)


def test_a_grayscale_jpeg_is_drafted_and_delivered_as_rgb():
    data = _jpeg(_large(seed=4).convert("L"))
    got = decode_image(data, "gray", (128, 96))
    assert got.shape == (96, 128, 3)
    assert np.array_equal(got[..., 0], got[..., 2])
    _assert_close(got, _resized(decode_image(data), (128, 96)))


@pytest.mark.parametrize("value, want", [(None, None), (128, (128, 128)), ((160, 120), (160, 120)),
                                         ([7, 5], (7, 5)), (np.int64(3), (3, 3))])
def test_image_size_forms(value, want):
    assert image_size_wh(value) == want
    assert StreamOptions(image_size=value).image_size is value


@pytest.mark.parametrize("value", [0, -1, (0, 5), (5, 0), (1, 2, 3), (1.5, 2), 1.5, True, "128", (True, 2)])
def test_image_size_must_be_positive_ints(value):
    with pytest.raises(ConfigError, match="image_size"):
        StreamOptions(image_size=value)
    with pytest.raises(ConfigError, match="image_size"):
        StreamOptions().replace(image_size=value)


ROW = {"item_id": "x", "width": 200, "height": 100, "tags": [], "attributes": [],
       "instances": [
           {"kind": "box", "label": "car", "bbox": [10.0, 20.0, 110.0, 70.0], "polygon": None,
            "attributes": []},
           {"kind": "polygon", "label": "person", "bbox": [0.0, 0.0, 200.0, 100.0],
            "polygon": [0.0, 0.0, 200.0, 0.0, 100.0, 100.0], "attributes": []},
           {"kind": "tag", "label": "blurry", "bbox": None, "polygon": None, "attributes": []},
       ]}
LABELS = LabelMap(("car", "person", "blurry"))
_SCHEMA = pa.schema([base_field(c) for c in ITEM_COLUMNS])


def make_item(row: dict, image: np.ndarray | None, label_map: LabelMap, version: int,
              size: tuple[int, int] | None = None) -> dict:
    """The reader's item of one manifest row dict (through ``ItemBlock``, the one builder)."""
    table = pa.Table.from_pylist([{"blob": "0" * 64, **row}], schema=_SCHEMA)
    return ItemBlock(table, label_map).item(0, image, version, size)


@pytest.mark.parametrize("decoded", [True, False])
def test_make_item_scales_geometry_to_the_delivered_size(decoded):
    """x by w / width, y by h / height; width/height keep the source size. Also without an
    image (decode=False): the geometry depends only on the size asked for."""
    full = make_item(ROW, None, LABELS, 0)
    image = np.zeros((40, 50, 3), np.uint8) if decoded else None
    sized = make_item(ROW, image, LABELS, 0, (50, 40))
    sx, sy = 50 / 200, 40 / 100
    np.testing.assert_allclose(sized["boxes"], full["boxes"] * np.array([sx, sy, sx, sy]), rtol=1e-7)
    assert sized["boxes"].dtype == np.float32 and sized["boxes"].tolist()[0] == [2.5, 8.0, 27.5, 28.0]
    assert sized["polygons"][0].size == 0
    assert sized["polygons"][1].tolist() == [0.0, 0.0, 50.0, 0.0, 25.0, 40.0]
    assert sized["polygons"][1].dtype == np.float32
    assert (sized["width"], sized["height"]) == (200, 100)
    assert np.array_equal(sized["labels"], full["labels"])
    rest = ("boxes", "polygons", "image", "labels")
    assert {k: v for k, v in sized.items() if k not in rest} == {k: v for k, v in full.items() if k not in rest}


@pytest.mark.parametrize("source", ["png", "large_jpeg"])
def test_prepare_item_gives_the_same_example_from_a_sized_item(source):
    """What training makes of a full-size item and of one decoded straight to its size agree:
    boxes within float32 rounding, pixels exactly (no draft) or within the stated tolerance."""
    size, max_boxes = 64, 4
    if source == "png":
        data, (w, h) = _png(_large(200, 100, seed=5)), (200, 100)
    else:
        data, (w, h) = _jpeg(_large(seed=6)), (2000, 1500)
    row = {**ROW, "width": w, "height": h, "instances": [
        {"kind": "box", "label": "car", "bbox": [0.1 * w, 0.2 * h, 0.55 * w, 0.7 * h], "polygon": None,
         "attributes": []},
        {"kind": "box", "label": "person", "bbox": [0.3 * w, 0.0, 1.1 * w, 0.33 * h], "polygon": None,
         "attributes": []},  # overflows the border: clipped alike
    ]}
    full = prepare_item(make_item(row, decode_image(data), LABELS, 0), size, max_boxes)
    sized_item = make_item(row, decode_image(data, "x", (size, size)), LABELS, 0, (size, size))
    sized = prepare_item(sized_item, size, max_boxes)
    assert sized.keys() == full.keys()
    np.testing.assert_allclose(sized["boxes"], full["boxes"], rtol=0, atol=1e-6)
    assert np.array_equal(sized["labels"], full["labels"]) and sized["num_boxes"] == full["num_boxes"] == 2
    if source == "png":
        assert np.array_equal(sized["image"], full["image"])
    else:
        _assert_close(sized["image"], full["image"])


def _pillow_rgb(data: bytes) -> np.ndarray:
    """The reference full-size decode: Pillow, EXIF orientation applied, as RGB."""
    from PIL import ImageOps

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


def test_full_size_jpegs_take_the_turbo_path_with_pillows_pixels(demo_jpegs, monkeypatch):
    """Unrotated full-size JPEGs go through simplejpeg (counted), rotated ones through Pillow;
    every image equals Pillow's decode bit for bit, subsampled or not, at any quality."""
    import simplejpeg

    from orchestrator.stream import decode as decode_module

    calls = []
    real = simplejpeg.decode_jpeg
    monkeypatch.setattr(decode_module.simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(1) or real(*a, **k))
    extra = [_jpeg(_large(333, 219, seed=s), quality=q) for s, q in [(1, 95), (2, 75), (3, 40)]]
    extra.append(_jpeg(_large(160, 120, seed=4).transpose(Image.Transpose.ROTATE_90), orientation=6))
    with io.BytesIO() as out:  # 4:4:4, no chroma subsampling
        _large(97, 61, seed=5).save(out, "JPEG", quality=90, subsampling=0)
        extra.append(out.getvalue())
    blobs = demo_jpegs + extra
    for data in blobs:
        assert np.array_equal(decode_image(data), _pillow_rgb(data))
    rotated = sum(1 for data in blobs if Image.open(io.BytesIO(data)).getexif().get(0x0112, 1) != 1)
    assert rotated == 3 and len(calls) == len(blobs) - rotated


def test_a_jpeg_simplejpeg_refuses_keeps_pillows_verdict():
    """A truncated JPEG: simplejpeg (strict) refuses it, and the Pillow path decides as before:
    an undecodable item, named."""
    from orchestrator.errors import ItemError

    data = _jpeg(_large(333, 219, seed=7))
    with pytest.raises(ItemError, match="'cut'.*not a readable image"):
        decode_image(data[: len(data) // 2], "cut")
