"""``orchestrator browse``: a read-only web app over a store (Starlette; plain HTML/JS/CSS).

The server acts as the principal of the store's credentials: every page and every JSON endpoint
reads through ``Store.dataset``, so the policy's row filter and hidden fields hold everywhere,
and images are served only by URLs the server signed for items it listed (``browse.media``).

JSON endpoints (the page at ``/`` uses them; scripts may too):

=============================================  ================================================
``GET /api/datasets``                          the datasets this principal may read, with their
                                               latest version and item count
``GET /api/datasets/{name}/versions``          every version (time, items, operation, who, message)
``GET /api/datasets/{name}/items``             one page of a version or slice: ``version``,
                                               ``query``, ``offset``, ``limit`` (<= 200); the
                                               match count, label colours, per item its size,
                                               instances (boxes, polygons, labels), tags and the
                                               URLs of its thumbnail and image
``GET /api/datasets/{name}/item?id=&version=`` one item: instances with attributes, tags,
                                               attributes, and its history across versions
``GET /api/datasets/{name}/diff``              ``before``, ``after``, ``query``, ``limit``:
                                               added, removed, changed (parts, label deltas),
                                               with thumbnails before and after
``GET /api/datasets/{name}/stats``             ``ds.stats()`` as JSON; ``stats.png`` its figure
=============================================  ================================================

Errors are JSON ``{"error": message, "kind": class}`` with 400 (a bad query, with its caret), 403
(access), 404 (no such dataset, version or item), 503 (the store does not answer), never a
traceback; the server keeps serving. With a ``token`` every request needs it, once as
``?token=`` (the page then keeps it in a cookie) or in the ``X-Orchestrator-Token`` header.
"""

from __future__ import annotations

import hmac
import io
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from orchestrator.browse.media import MediaRef, Signer, ThumbCache, make_thumbnail, media_type_of
from orchestrator.dataset import Dataset
from orchestrator.diff import COLUMNS as DIFF_COLUMNS
from orchestrator.diff import compare_rows
from orchestrator.errors import (
    AccessDenied,
    ConfigError,
    DatasetNotFound,
    ItemError,
    OrchestratorError,
    QueryError,
    StoreUnavailable,
    VersionNotFound,
)
from orchestrator.query.parse import Compare, Field, to_text
from orchestrator.sheet import label_colour
from orchestrator.store import Store
from orchestrator.stream.item import ITEM_COLUMNS, ItemBlock
from orchestrator.stream.reader import ItemLoader

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
PAGE_MAX = 200
COOKIE = "orchestrator_browse_token"
_FETCH_COLUMNS = ["item_id", "blob", "size_bytes", "pack", "pack_offset"]


class Browser:
    """What the endpoints share: the store, opened datasets (each version and slice indexed once,
    kept in a small LRU), the URL signer and the thumbnail cache."""

    def __init__(self, store: Store, *, keep: int = 16) -> None:
        self.store = store
        self.signer = Signer()
        self.thumbs = ThumbCache()
        self._keep = keep
        self._open: OrderedDict[tuple[str, int | None, str | None], tuple[Dataset, threading.Lock]] = OrderedDict()
        self._lock = threading.Lock()
        self._loaders: dict[str, ItemLoader] = {}

    def dataset(self, name: str, version: int | None, query: str | None) -> tuple[Dataset, threading.Lock]:
        """The version (latest when None) or its slice, opened once; with a lock for its reader."""
        key = (name, version, query or None)
        with self._lock:
            hit = self._open.get(key)
            if hit is not None:
                self._open.move_to_end(key)
                return hit
        ds = self.store.dataset(name, version)
        if query:
            ds = ds.slice(query)
        entry = (ds, threading.Lock())
        with self._lock:
            self._open[key] = entry
            if version is None:  # the latest is pinned now: later pages read the same version
                self._open[(name, ds.version, query or None)] = entry
            while len(self._open) > self._keep:
                self._open.popitem(last=False)
            self._loaders.setdefault(name, ItemLoader(ds.plan))
        return entry

    def media(self, ref: MediaRef) -> bytes:
        loader = self._loaders.get(ref.dataset)
        if loader is None:
            self.dataset(ref.dataset, None, None)
            loader = self._loaders[ref.dataset]
        return loader.media_of(ref.item_id, ref.blob, ref.size_bytes, ref.pack, ref.pack_offset)

    def urls(self, name: str, row: dict[str, Any]) -> dict[str, str]:
        token = self.signer.token(MediaRef(name, row["item_id"], row["blob"], row["size_bytes"], row["pack"],
                                           row["pack_offset"]))
        return {"thumb": f"/thumb/{token}", "media": f"/media/{token}"}


# -- helpers ------------------------------------------------------------------------------------
def _int(request: Request, key: str, default: int | None = None, *, low: int = 0,
         high: int | None = None) -> int | None:
    raw = request.query_params.get(key)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r} is not a whole number") from None
    if value < low or (high is not None and value > high):
        raise ConfigError(f"{key}={value} is out of range", hint=f"use {low} .. {high}" if high else f"use >= {low}")
    return value


def _query(request: Request) -> str | None:
    return request.query_params.get("query") or None


def _items_json(browser: Browser, ds: Dataset, table: pa.Table) -> list[dict[str, Any]]:
    """Page rows (redacted ``ITEM_COLUMNS``) as the JSON the grid draws."""
    block = ItemBlock(table, ds.label_map)
    rows = table.select(_FETCH_COLUMNS).to_pylist()
    out = []
    for k, row in enumerate(rows):
        try:
            item = block.item(k, None, ds.version)
        except ItemError as exc:  # an instance that cannot be drawn: shown as the item's error
            out.append({"id": row["item_id"], "error": str(exc), **browser.urls(ds.name, row)})
            continue
        out.append({
            "id": item["id"], "width": item["width"], "height": item["height"],
            "instances": [{"label": name, "box": [round(float(v), 2) for v in box],
                           "polygon": [round(float(v), 2) for v in poly]}
                          for name, box, poly in zip(item["label_names"], item["boxes"], item["polygons"])],
            "instance_tags": item["instance_tags"], "tags": item["tags"],
            **browser.urls(ds.name, row),
        })
    return out


def _colours(names: Any) -> dict[str, str]:
    return {n: "#{:02x}{:02x}{:02x}".format(*label_colour(n)) for n in names}


# -- endpoints ----------------------------------------------------------------------------------
def datasets(request: Request) -> JSONResponse:
    store: Store = request.app.state.browser.store
    out = []
    for name in store.datasets():
        versions = store.versions(name)
        latest = versions[-1]
        out.append({"name": name, "latest": latest.version, "items": latest.items, "versions": len(versions),
                    "updated": latest.timestamp.isoformat(timespec="seconds")})
    return JSONResponse({"store": store.uri, "principal": store.principal, "datasets": out})


def versions(request: Request) -> JSONResponse:
    name = request.path_params["name"]
    rows = [v.as_dict() for v in request.app.state.browser.store.versions(name)]
    return JSONResponse({"dataset": name, "versions": rows}, headers={"Cache-Control": "no-store"})


def items(request: Request) -> JSONResponse:
    browser: Browser = request.app.state.browser
    name, query = request.path_params["name"], _query(request)
    offset = _int(request, "offset", 0)
    limit = _int(request, "limit", 48, low=1, high=PAGE_MAX)
    assert offset is not None and limit is not None
    ds, lock = browser.dataset(name, _int(request, "version"), query)
    with lock:
        count = len(ds.stream.index)
        positions = np.arange(offset, min(offset + limit, count))
        table = ds.stream.row_reader.table(positions)
    return JSONResponse({
        "dataset": name, "version": ds.version, "query": query, "count": count, "offset": offset,
        "limit": limit, "colours": _colours(ds.label_map.names), "items": _items_json(browser, ds, table),
    })


def item(request: Request) -> JSONResponse:
    browser: Browser = request.app.state.browser
    name = request.path_params["name"]
    item_id = request.query_params.get("id")
    if not item_id:
        raise ConfigError("which item? pass ?id=ITEM_ID")
    ds, lock = browser.dataset(name, _int(request, "version"), None)
    by_id = ds.slice(to_text(Compare(Field("file", "item_id", 0), "=", item_id, 0)))
    table = by_id.stream.row_reader.table(np.arange(len(by_id.stream.index)))
    if table.num_rows == 0:
        raise DatasetNotFound(f"dataset {name!r} version {ds.version} has no item {item_id!r}",
                              hint="it may be filtered out for you, or not in this version")
    block = ItemBlock(table, ds.label_map)
    row = table.select(_FETCH_COLUMNS).to_pylist()[0]
    it = block.item(0, None, ds.version)
    media_error = None
    try:
        browser.media(MediaRef(name, item_id, row["blob"], row["size_bytes"], row["pack"], row["pack_offset"]))
    except ItemError as exc:
        media_error = f"{exc} (check the dataset with `orchestrator verify {name}`)"
    return JSONResponse({
        "dataset": name, "version": ds.version, "id": item_id, "width": it["width"], "height": it["height"],
        "colours": _colours(ds.label_map.names), "media_error": media_error, **browser.urls(name, row),
        "instances": [{"label": n, "box": [round(float(v), 2) for v in b], "polygon": [round(float(v), 2) for v in p],
                       "attributes": a}
                      for n, b, p, a in zip(it["label_names"], it["boxes"], it["polygons"], it["instance_attributes"])],
        "instance_tags": it["instance_tags"], "tags": it["tags"], "attributes": it["attributes"],
        "history": _history(browser, name, item_id, ds.version),
    })


def _history(browser: Browser, name: str, item_id: str, upto: int) -> list[dict[str, Any]]:
    """The item in each version up to ``upto`` (the last 50): added, changed (which parts),
    unchanged, removed or absent; from the manifests, as this principal sees them."""
    store = browser.store
    out: list[dict[str, Any]] = []
    before: pa.Table | None = None
    query = to_text(Compare(Field("file", "item_id", 0), "=", item_id, 0))
    for info in [v for v in store.versions(name) if v.version <= upto][-50:]:
        rows = store.dataset(name, info.version).slice(query).manifest_rows(list(DIFF_COLUMNS))
        here = rows.num_rows > 0
        if before is None or before.num_rows == 0:
            state, parts = ("added" if here else "absent"), []
        elif not here:
            state, parts = "removed", []
        else:
            change = compare_rows(before, rows).changed
            state, parts = ("changed", list(change[0].parts)) if change else ("unchanged", [])
        out.append({"version": info.version, "time": info.timestamp.isoformat(timespec="seconds"),
                    "operation": info.operation, "message": info.message, "state": state, "parts": parts})
        before = rows
    return out


def diff(request: Request) -> JSONResponse:
    browser: Browser = request.app.state.browser
    name, query = request.path_params["name"], _query(request)
    before_v, after_v = _int(request, "before"), _int(request, "after")
    limit = _int(request, "limit", 60, low=1, high=PAGE_MAX)
    assert limit is not None
    if before_v is None:
        raise ConfigError("which versions? pass ?before=A&after=B (after: default the latest)")
    a, _ = browser.dataset(name, before_v, query)
    b, _ = browser.dataset(name, after_v, query)
    d = a.diff(b)
    changed = d.changed[:limit]
    rows_a = _rows_by_id(browser, a, [*d.removed[:limit], *(c.item_id for c in changed)])
    rows_b = _rows_by_id(browser, b, [*d.added[:limit], *(c.item_id for c in changed)])
    summary = d.as_dict()
    return JSONResponse({
        "dataset": name, "before": a.version, "after": b.version, "query": query,
        "counts": summary["counts"], "parts_changed": summary["parts_changed"],
        "label_totals": summary["label_totals"], "colours": _colours(b.label_map.names),
        "added": [rows_b[i] for i in d.added[:limit]],
        "removed": [rows_a[i] for i in d.removed[:limit]],
        "changed": [{"id": c.item_id, "parts": list(c.parts), "label_deltas": c.label_deltas,
                     "before": rows_a[c.item_id], "after": rows_b[c.item_id]} for c in changed],
    })


def _rows_by_id(browser: Browser, ds: Dataset, ids: list[str]) -> dict[str, dict[str, Any]]:
    """The grid JSON of these items of ``ds`` (one read of the version's item columns)."""
    table = ds.manifest_rows(ITEM_COLUMNS)
    keep = table.filter(pc.is_in(table.column("item_id"), value_set=pa.array(ids, pa.string())))
    return {it["id"]: it for it in _items_json(browser, ds, keep)}


def stats(request: Request) -> Response:
    browser: Browser = request.app.state.browser
    name = request.path_params["name"]
    ds, _ = browser.dataset(name, _int(request, "version"), _query(request))
    figures = ds.stats()
    if request.url.path.endswith(".png"):
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig = figures.plot()
        out = io.BytesIO()
        fig.savefig(out, format="png", dpi=80)
        plt.close(fig)
        return Response(out.getvalue(), media_type="image/png")
    return JSONResponse({**figures.as_dict(), "colours": _colours(ds.label_map.names)})


def thumb(request: Request) -> Response:
    return _media(request, thumbnail=True)


def media(request: Request) -> Response:
    return _media(request, thumbnail=False)


def _media(request: Request, *, thumbnail: bool) -> Response:
    browser: Browser = request.app.state.browser
    ref = browser.signer.ref(request.path_params["token"])
    if ref is None:
        raise AccessDenied("this image link was not issued by this server",
                           hint="open the page again: image links are signed for the items it lists")
    cache = {"Cache-Control": "private, max-age=86400, immutable"}  # content-addressed: never changes
    if thumbnail:
        key = (ref.blob, 256)
        data = browser.thumbs.get(key)
        if data is None:
            data = make_thumbnail(browser.media(ref), ref.item_id)
            browser.thumbs.put(key, data)
        return Response(data, media_type="image/jpeg", headers=cache)
    data = browser.media(ref)
    return Response(data, media_type=media_type_of(data), headers=cache)


def index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})


# -- errors and the token -----------------------------------------------------------------------
_STATUS = [(QueryError, 400), (ConfigError, 400), (AccessDenied, 403), (DatasetNotFound, 404),
           (VersionNotFound, 404), (ItemError, 404), (StoreUnavailable, 503)]


async def _orchestrator_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OrchestratorError)
    status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 400 if exc.user_fault else 500)
    return JSONResponse({"error": str(exc), "kind": type(exc).__name__}, status_code=status)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("browse: %s failed", request.url.path)
    return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}", "kind": "InternalError"},
                        status_code=500)


class TokenGate(BaseHTTPMiddleware):
    """Every request carries the server's token (query, cookie or header); the first page's
    ``?token=`` is kept in an HttpOnly cookie so the page's own requests carry it."""

    def __init__(self, app: Any, token: str) -> None:
        super().__init__(app)
        self.token = token

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        given = (request.query_params.get("token") or request.cookies.get(COOKIE)
                 or request.headers.get("x-orchestrator-token") or "")
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return JSONResponse({"error": "this server needs its token: open the URL `orchestrator browse` printed "
                                          "(it ends in ?token=...)", "kind": "AccessDenied"}, status_code=403)
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
        return response


def create_app(store: Store, *, token: str | None = None) -> Starlette:
    """The browse app over ``store`` (as its principal); ``token``: required on every request."""
    api = "/api/datasets/{name}"
    routes = [
        Route("/", index), Route("/api/datasets", datasets), Route(f"{api}/versions", versions),
        Route(f"{api}/items", items), Route(f"{api}/item", item), Route(f"{api}/diff", diff),
        Route(f"{api}/stats", stats), Route(f"{api}/stats.png", stats),
        Route("/thumb/{token}", thumb), Route("/media/{token}", media),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(TokenGate, token=token)] if token else []
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={OrchestratorError: _orchestrator_error, Exception: _unexpected})
    app.state.browser = Browser(store)
    return app
