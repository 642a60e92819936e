"""probe: hashing and decoding every kind of bad file without raising."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from PIL import Image

from orchestrator.ingest.probe import probe_bytes, probe_file


def _jpeg(size=(40, 30), exif_orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", size, (10, 200, 30))
    if exif_orientation is None:
        img.save(buf, "JPEG")
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        img.save(buf, "JPEG", exif=exif)
    return buf.getvalue()


def test_good_jpeg_has_hash_size_and_type():
    data = _jpeg()
    p = probe_bytes(data)
    assert p.error is None
    assert p.blob == hashlib.sha256(data).hexdigest()
    assert (p.width, p.height, p.size_bytes, p.media_type) == (40, 30, len(data), "image/jpeg")


def test_png_rgba_and_palette_are_images():
    for mode in ("RGBA", "P", "L"):
        buf = io.BytesIO()
        Image.new(mode, (7, 5)).save(buf, "PNG")
        p = probe_bytes(buf.getvalue())
        assert p.error is None and (p.width, p.height) == (7, 5) and p.media_type == "image/png"


def test_exif_rotation_swaps_dimensions():
    assert (probe_bytes(_jpeg((40, 30), 6)).width, probe_bytes(_jpeg((40, 30), 6)).height) == (30, 40)
    assert (probe_bytes(_jpeg((40, 30), 3)).width, probe_bytes(_jpeg((40, 30), 3)).height) == (40, 30)


def test_empty_file():
    assert probe_bytes(b"").error == "empty file"


def test_not_an_image():
    p = probe_bytes(b"this is text, not pixels")
    assert p.error == "not an image Pillow can read"
    assert p.blob is not None


def test_truncated_jpeg_is_rejected():
    data = _jpeg((200, 200))
    p = probe_bytes(data[: len(data) // 2])
    assert p.error is not None and "truncated" in p.error


def test_missing_and_directory(tmp_path: Path):
    assert probe_file(str(tmp_path / "nope.jpg")).error == "file not found"
    assert "directory" in probe_file(str(tmp_path)).error


def test_fifo_and_link_are_refused_without_blocking_or_following(tmp_path: Path):
    import os
    import threading

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    result = []
    t = threading.Thread(target=lambda: result.append(probe_file(str(fifo))), daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():  # it blocked in open(): let it go, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
    assert result and "not a regular file" in result[0].error

    (tmp_path / "real.jpg").write_bytes(_jpeg())
    (tmp_path / "link.jpg").symlink_to(tmp_path / "real.jpg")
    assert "symbolic link" in probe_file(str(tmp_path / "link.jpg")).error
    assert probe_file(str(tmp_path / "real.jpg")).error is None
