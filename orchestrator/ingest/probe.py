"""Look at one media file: its content hash, size, MIME type and oriented dimensions.

Pure and self-contained so it runs unchanged inside a Ray Data stage. The image is fully decoded
once here, so a truncated or corrupt file is rejected at ingest instead of failing a training run
weeks later.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

# EXIF orientations 5..8 rotate by 90 degrees: the displayed width and height swap.
_SWAPS_AXES = {5, 6, 7, 8}
_ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class Probe:
    blob: str | None = None
    size_bytes: int = 0
    width: int = 0
    height: int = 0
    media_type: str | None = None
    error: str | None = None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def probe_bytes(data: bytes) -> Probe:
    """Hash and decode ``data``; on failure return a Probe whose ``error`` says why."""
    if not data:
        return Probe(size_bytes=0, error="empty file")
    blob = sha256_hex(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format
                width, height = img.size
                orientation = img.getexif().get(_ORIENTATION_TAG, 1)
                img.load()  # full decode: catches truncated and corrupt data
    except UnidentifiedImageError:
        return Probe(blob=blob, size_bytes=len(data), error="not an image Pillow can read")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return Probe(blob=blob, size_bytes=len(data), error=f"image too large: {exc}")
    except (OSError, SyntaxError, ValueError) as exc:  # PIL reports truncation as OSError
        return Probe(blob=blob, size_bytes=len(data), error=f"corrupt or truncated image: {exc}")
    if orientation in _SWAPS_AXES:
        width, height = height, width
    media_type = Image.MIME.get(fmt or "", "application/octet-stream")
    return Probe(blob, len(data), width, height, media_type, None)


def probe_file(path: str) -> Probe:
    """Read and probe a local file; a missing or unreadable file is an error, not a raise.

    ``path`` is the resolved path that ``sources`` confined to the source, so it is opened
    without following a link (one swapped in since is refused) and without blocking (a FIFO or
    device is refused, unread, instead of hanging the stage or streaming forever)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return Probe(error="file not found")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return Probe(error="is a symbolic link (it changed since the source was read)")
        return Probe(error=f"cannot read file: {exc.strerror or exc}")
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            return Probe(error="is a directory, not a file")
        return Probe(error="not a regular file (a FIFO, socket or device); not read")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read()
        except OSError as exc:
            return Probe(error=f"cannot read file: {exc.strerror or exc}")
    return probe_bytes(data)
