"""Media for the browser: signed references to an item's bytes, and thumbnails made on demand.

Why signed references: a page lists items the principal may see (the row filter applied by the
endpoint that made the page); the browser then asks for each image by URL. The URL carries where
the bytes are (dataset, blob, pack range) and an HMAC of that with a secret of this server
process, so a URL the server did not hand out, for an item the principal may not see, is refused
without a manifest scan per image. Thumbnails are keyed by blob hash (content-addressed: the same
bytes have the same thumbnail in every version and slice) in a bounded LRU; the bytes come
through the node blob cache (``ItemLoader.media_of``), and only for the thumbnails asked for.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import secrets
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass

from PIL import Image, ImageOps

from orchestrator.errors import ItemError

THUMB_PX = 256
#: Thumbnail bytes kept (a 256 px JPEG is ~10-20 KB: ~5,000 of them).
THUMB_CACHE_BYTES = 96 << 20


@dataclass(frozen=True)
class MediaRef:
    """Where one item's bytes are, as its manifest row says."""

    dataset: str
    item_id: str
    blob: str
    size_bytes: int | None
    pack: str | None
    pack_offset: int | None


class Signer:
    """Signs ``MediaRef``s into URL tokens and checks them (HMAC-SHA256 with a per-process key)."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    def token(self, ref: MediaRef) -> str:
        payload = base64.urlsafe_b64encode(json.dumps(asdict(ref), separators=(",", ":")).encode()).decode()
        return f"{payload.rstrip('=')}.{self._sign(payload.rstrip('='))}"

    def ref(self, token: str) -> MediaRef | None:
        """The reference a token names, or None when it was not signed here (or was altered)."""
        payload, _, sig = token.partition(".")
        if not sig or not hmac.compare_digest(sig, self._sign(payload)):
            return None
        try:
            fields = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            return MediaRef(**fields)
        except (ValueError, TypeError):
            return None

    def _sign(self, payload: str) -> str:
        digest = hmac.new(self._key, payload.encode(), hashlib.sha256).digest()[:18]
        return base64.urlsafe_b64encode(digest).decode()


def make_thumbnail(data: bytes, item_id: str, px: int = THUMB_PX) -> bytes:
    """A JPEG of at most ``px`` on its longer side, upright (EXIF orientation applied, as every
    read path orients images and their geometry). JPEGs are decoded at a reduced scale
    (``draft``), so a thumbnail costs a fraction of a full decode."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (px, px))
            img = ImageOps.exif_transpose(img).convert("RGB")
            img.thumbnail((px, px), Image.BILINEAR)
            out = io.BytesIO()
            img.save(out, "JPEG", quality=82)
            return out.getvalue()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ItemError(f"item {item_id!r}: the image does not decode ({exc})", reason="undecodable",
                        hint="check the dataset with `orchestrator verify`") from None


def media_type_of(data: bytes) -> str:
    """The MIME type of image bytes, from their header."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return Image.MIME.get(img.format or "", "application/octet-stream")
    except (OSError, ValueError):
        return "application/octet-stream"


class ThumbCache:
    """Thumbnail bytes by (blob, size), least recently used out past ``budget`` bytes; thread-safe."""

    def __init__(self, budget: int = THUMB_CACHE_BYTES) -> None:
        self.budget = budget
        self._items: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple[str, int]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
            return data

    def put(self, key: tuple[str, int], data: bytes) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = data
            self._size += len(data)
            while self._size > self.budget and self._items:
                self._size -= len(self._items.popitem(last=False)[1])
