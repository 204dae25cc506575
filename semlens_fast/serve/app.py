"""The web application: HTML pages and a JSON API over one :class:`~semlens_fast.serve.explorer.Explorer`.

FastAPI (on Starlette) with uvicorn: the pages are rendered on the server by Jinja2 with
autoescaping on (every query, label and concept name is escaped; no page builds HTML from
user input in JavaScript), the JSON API under ``/api/v1`` has an OpenAPI schema at
``/api/openapi.json``. Safety, in layers:

* only three kinds of bytes leave the server: rendered pages and JSON, PNGs the explorer
  draws from the data set (addressed by sample id / layer, component and rank, never by a
  path), package files under ``/static`` and files under ``RUN/report/`` (resolved, and
  refused unless they are regular files inside that folder);
* request bodies are bounded (``Limits.max_upload_bytes`` plus a small allowance for the
  multipart framing) before they are parsed; uploads are decoded by
  :func:`~semlens_fast.serve.images.decode_upload`;
* the ``Host`` header must name an allowed host (DNS rebinding), cross-site POSTs (an
  ``Origin`` of another host) are refused, and every response carries a strict
  Content-Security-Policy (no inline script, nothing from other origins).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from .._version import __version__
from ..errors import ArgumentError, DTypeError, SemlensError
from .explorer import Explorer, NotAvailable, NotFound
from .images import UploadError, decode_upload

log = logging.getLogger("semlens_fast")

HERE = Path(__file__).resolve().parent
API = "/api/v1"
CSP = ("default-src 'none'; img-src 'self'; style-src 'self'; script-src 'self'; form-action 'self'; "
       "base-uri 'none'; frame-ancestors 'none'; connect-src 'self'")
# the run's static report (report/html.py) is one self-contained page with inline CSS and a few lines
# of inline script (it escapes its own content); it may use them, and nothing else
REPORT_CSP = ("default-src 'none'; img-src 'self'; style-src 'self' 'unsafe-inline'; script-src 'unsafe-inline'; "
              "form-action 'none'; base-uri 'none'; frame-ancestors 'none'; connect-src 'none'")
MULTIPART_ALLOWANCE = 64 * 1024  # form fields and multipart framing around an upload
MAP_PX = 640


# --------------------------------------------------------------------------- middleware (plain ASGI)


class BodyLimit:
    """Refuse request bodies larger than ``limit`` bytes (413) before the application reads them:
    at once from ``Content-Length``, else while the body streams in."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, int(limit)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    return await _plain(send, 400, "bad Content-Length")
                if n > self.limit:
                    return await _plain(send, 413, f"request body of {n} bytes is larger than the limit of {self.limit}")
        seen = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return msg

        async def tracking_send(msg: dict) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _plain(send, 413, f"request body is larger than the limit of {self.limit} bytes")


class _TooLarge(Exception):
    pass


async def _plain(send: Any, status: int, text: str) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class SecurityHeaders:
    """Strict headers on every response; POSTs whose ``Origin`` is another host (or ``null``) are refused (403).

    The referrer policy is ``same-origin``, not ``no-referrer``: under ``no-referrer`` browsers send
    ``Origin: null`` even with the pages' own form posts, which could then not be told from a
    cross-site post.
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", []))
        if scope.get("method") not in ("GET", "HEAD", "OPTIONS") and b"origin" in headers:
            origin = headers[b"origin"].decode("latin-1")
            host = headers.get(b"host", b"").decode("latin-1")
            if origin == "null" or urlsplit(origin).netloc != host:
                return await _plain(send, 403, f"cross-site request refused (Origin {origin!r}, Host {host!r})")

        csp = REPORT_CSP if scope.get("path", "").startswith("/report/") else CSP

        async def send_with_headers(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                h = list(msg.get("headers", []))
                names = {k.lower() for k, _ in h}
                extra = [(b"content-security-policy", csp.encode()), (b"x-content-type-options", b"nosniff"),
                         (b"referrer-policy", b"same-origin"), (b"x-frame-options", b"DENY"),
                         (b"cross-origin-resource-policy", b"same-origin")]
                h += [(k, v) for k, v in extra if k not in names]
                if b"cache-control" not in names:
                    h.append((b"cache-control", b"no-store"))
                msg = dict(msg, headers=h)
            await send(msg)

        await self.app(scope, receive, send_with_headers)


# --------------------------------------------------------------------------- request models (the OpenAPI schema)


class SearchRequest(BaseModel):
    """One text, or one or more embeddings (``dim`` numbers each, the run's embedding space)."""

    text: str | None = Field(None, description="a text query (needs a foundation model with a text encoder)")
    embedding: list[float] | list[list[float]] | None = Field(None, description="query embedding(s), [d] or [Q, d]")
    k: int = Field(10, description="components per query")
    layers: list[str] | None = Field(None, description="layers to search (default all)")
    per_layer: bool = Field(False, description="rank within each layer instead of across layers")
    examples: int = Field(8, description="example crops listed per result (0: none)")


class AuditRequest(BaseModel):
    """Concepts as texts, or ``class:NAME`` image probes (mean embedding of 32 training images of
    the class); the two kinds cannot be mixed."""

    valid: list[str] = Field(..., description="what the decision should rely on")
    spurious: list[str] = Field(..., description="what it should not rely on")
    target: int | None = Field(None, description="class index: add each component's relevance for it")
    layers: list[str] | None = None
    threshold: float | None = Field(0.0, description="minimum spurious score of a flagged component (null: none)")
    margin: float = Field(0.0, description="lead of the spurious over the valid score needed to be spurious-aligned")
    top: int = Field(8, description="training samples listed per component")
    save: bool = Field(False, description="write the result to RUN/audit.json (writable servers only)")


# --------------------------------------------------------------------------- rendering helpers


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v[:12]) + (", ..." if len(v) > 12 else "")
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    return str(v)


def _columns(rows: list[dict[str, Any]], drop: tuple[str, ...] = ("url", "match_url")) -> list[str]:
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols and k not in drop:
                cols.append(k)
    return cols


def _is_samples(key: str, value: Any) -> bool:
    return "sample" in key and isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)


def _map_svg_points(m: dict[str, Any]) -> list[dict[str, Any]]:
    """Pixel positions of the map's points: one scale for both axes (distances stay honest), centred."""
    pts = m["points"]
    if not pts:
        return []
    xs, ys = [p["x"] for p in pts], [p["y"] for p in pts]
    lo_x, lo_y, w, h = min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)
    span = max(w, h, 1e-12)
    inner = MAP_PX - 40
    off_x, off_y = 20 + (inner - w / span * inner) / 2, 20 + (inner - h / span * inner) / 2
    return [dict(p, cx=off_x + (p["x"] - lo_x) / span * inner, cy=MAP_PX - off_y - (p["y"] - lo_y) / span * inner)
            for p in sorted(pts, key=lambda p: p["flagged"])]


PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def _env() -> Environment:
    env = Environment(loader=FileSystemLoader(str(HERE / "templates")), autoescape=select_autoescape(default=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    env.filters["q"] = lambda s: quote(str(s), safe="")
    env.globals.update(columns=_columns, is_samples=_is_samples, version=__version__,
                       urlencode=lambda d: urlencode([(k, v) for k, v in d.items() if v is not None], doseq=True))
    return env


# --------------------------------------------------------------------------- the app


def _split(values: list[str] | None) -> list[str] | None:
    out: list[str] = []
    for v in values or []:
        out += [p.strip() for p in str(v).split(",") if p.strip()]
    return out or None


def _lines(text: str | None) -> list[str]:
    """Concepts typed in a text area: one per line or comma-separated."""
    out: list[str] = []
    for line in (text or "").replace("\r", "\n").split("\n"):
        out += [p.strip() for p in line.split(",") if p.strip()]
    return out


def _opt_int(value: str | None, name: str) -> int | None:
    if value is None or str(value).strip() == "":
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        raise ArgumentError(f"{name} must be an integer, got {value!r}") from None


def _opt_float(value: str | None, name: str, default: float | None) -> float | None:
    if value is None or str(value).strip() == "":
        return default
    try:
        v = float(str(value).strip())
    except ValueError:
        raise ArgumentError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ArgumentError(f"{name} must be a finite number, got {value!r}")
    return v


def _status(exc: BaseException) -> int:
    if isinstance(exc, UploadError):
        return exc.status
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, NotAvailable):
        return 409
    if isinstance(exc, (ArgumentError, DTypeError)):
        return 400
    return 500


def create_app(explorer: Explorer) -> FastAPI:
    """The FastAPI application over ``explorer`` (without the middleware of :func:`wrap`; use :func:`build`)."""
    ex = explorer
    env = _env()
    app = FastAPI(title="semlens serve", version=__version__, openapi_url="/api/openapi.json", docs_url=None,
                  redoc_url=None,
                  description="JSON API of `semlens serve`: search, neurons, layers, compare, audit and the concept "
                              "map of one run folder. See docs/serve.md.")
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    def page(request: Request, template: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        info = ex.info()
        html = env.get_template(template).render(info=info, path=request.url.path, has_report=_report_root() is not None,
                                                 **ctx)
        return HTMLResponse(html, status_code=status)

    def error_response(request: Request, exc: BaseException) -> Response:
        status = _status(exc)
        if status == 500:
            log.error("semlens serve: %s %s failed", request.method, request.url.path, exc_info=exc)
        msg = str(exc) if status != 500 or isinstance(exc, SemlensError) else "internal error (see the server's log)"
        if request.url.path.startswith("/api/") or request.url.path.startswith("/img/"):
            return JSONResponse({"error": type(exc).__name__, "detail": msg}, status_code=status)
        return page(request, "error.html", status=status, title=f"Error {status}", status_code=status, message=msg,
                    error=type(exc).__name__)

    @app.exception_handler(SemlensError)
    async def _semlens_error(request: Request, exc: SemlensError) -> Response:
        return error_response(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if request.url.path.startswith("/api/") or request.url.path.startswith(("/img/", "/static/", "/report/")):
            return JSONResponse({"error": "HTTPException", "detail": exc.detail}, status_code=exc.status_code)
        return page(request, "error.html", status=exc.status_code, title=f"Error {exc.status_code}",
                    status_code=exc.status_code, message=str(exc.detail),
                    error="HTTPException")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = jsonable_encoder(exc.errors())
        if request.url.path.startswith(("/api/", "/img/")):
            return JSONResponse({"error": "RequestValidationError", "detail": errors}, status_code=422)
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', []))}: {e.get('msg')}" for e in errors)
        return page(request, "error.html", status=422, title="Error 422", status_code=422, message=msg,
                    error="RequestValidationError")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        return error_response(request, exc)

    def _report_root() -> Path | None:
        root = ex.run.report_path
        return root.resolve() if root.is_dir() else None

    # ------------------------------------------------------------------ JSON API
    @app.get(f"{API}/run", tags=["run"], summary="what the run holds")
    def api_run() -> Any:
        return ex.info()

    @app.get(f"{API}/search", tags=["search"], summary="components closest to a text query")
    def api_search_get(q: str = Query(..., description="text query"), k: int = 10,
                       layers: list[str] | None = Query(None, description="layers (repeat or comma-separate)"),
                       per_layer: bool = False, examples: int = 8) -> Any:
        return ex.search(text=q, k=k, layers=_split(layers), per_layer=per_layer, examples=examples)

    @app.post(f"{API}/search", tags=["search"], summary="components closest to a text or embedding(s)")
    def api_search_post(body: SearchRequest) -> Any:
        if (body.text is None) == (body.embedding is None):
            raise ArgumentError("give exactly one of 'text' or 'embedding'")
        return ex.search(text=body.text, embedding=body.embedding, k=body.k, layers=_split(body.layers),
                         per_layer=body.per_layer, examples=body.examples)

    @app.post(f"{API}/search/image", tags=["search"], summary="components closest to an uploaded image")
    async def api_search_image(image: UploadFile = File(..., description="PNG, JPEG, GIF, BMP or WebP"), k: int = Form(10),
                               layers: str | None = Form(None), per_layer: bool = Form(False),
                               examples: int = Form(8)) -> Any:
        img = await _read_upload(image)
        return await run_in_threadpool(ex.search, image=img, k=k, layers=_split([layers] if layers else None),
                                       per_layer=per_layer, examples=examples)

    async def _read_upload(upload: UploadFile) -> Any:
        data = await upload.read(ex.limits.max_upload_bytes + 1)
        return await run_in_threadpool(decode_upload, data, max_bytes=ex.limits.max_upload_bytes,
                                       max_pixels=ex.limits.max_upload_pixels, name="image")

    @app.get(f"{API}/neurons/{{layer}}/{{component}}", tags=["neurons"], summary="one component")
    def api_neuron(layer: str, component: int, nearest: int = 10) -> Any:
        return ex.neuron(layer, component, nearest=nearest)

    @app.get(f"{API}/layers/{{layer}}", tags=["layers"], summary="describe a layer")
    def api_describe(layer: str, target: int | None = None, offset: int = 0, limit: int = 200, top: int = 10) -> Any:
        return ex.describe(layer, target=target, offset=offset, limit=limit, top=top)

    @app.get(f"{API}/compare", tags=["compare"], summary="concepts shared between layer sets or runs")
    def api_compare(layers: list[str] | None = Query(None), other_layers: list[str] | None = Query(None),
                    other: str | None = None, threshold: float = 0.8, labels: bool = False, limit: int = 50) -> Any:
        return ex.compare(layers=_split(layers), other_layers=_split(other_layers), other=other, threshold=threshold,
                          vocabulary=labels, limit=limit)

    @app.post(f"{API}/audit", tags=["audit"], summary="run an audit")
    def api_audit(body: AuditRequest) -> Any:
        return ex.audit(valid=body.valid, spurious=body.spurious, target=body.target, layers=_split(body.layers),
                        threshold=body.threshold, margin=body.margin, top=body.top, save=body.save)

    @app.get(f"{API}/audit", tags=["audit"], summary="the audit stored in audit.json")
    def api_last_audit() -> Any:
        a = ex.last_audit()
        if a is None:
            raise NotFound("this run has no audit.json yet")
        return a

    @app.get(f"{API}/map", tags=["map"], summary="2-D PCA of the component embeddings")
    def api_map(max_points: int | None = None) -> Any:
        return ex.concept_map(max_points)

    # ------------------------------------------------------------------ images
    def png(data: bytes) -> Response:
        return Response(data, media_type="image/png", headers={"cache-control": "private, max-age=3600"})

    @app.get("/img/samples/{sample}.png", tags=["images"], summary="a training sample")
    def img_sample(sample: int) -> Response:
        return png(ex.sample_png(sample))

    @app.get("/img/crops/{layer}/{component}/{rank}.png", tags=["images"], summary="the crop a component's example shows")
    def img_crop(layer: str, component: int, rank: int) -> Response:
        return png(ex.crop_png(layer, component, rank))

    # ------------------------------------------------------------------ the static report of the run
    @app.get("/report/{path:path}", include_in_schema=False)
    def report_file(path: str) -> Response:
        root = _report_root()
        if root is None:
            raise NotFound("this run has no report; run `semlens report` (the server never writes it)")
        if path in ("", "/"):
            path = "index.html"
        target = (root / path).resolve()
        if root not in target.parents or not target.is_file():
            raise NotFound(f"no such report file: {path!r}")
        return FileResponse(target, headers={"cache-control": "no-cache"})

    @app.get("/report", include_in_schema=False)
    def report_root() -> Response:
        return RedirectResponse("/report/", status_code=307)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return FileResponse(HERE / "static" / "favicon.svg", media_type="image/svg+xml")

    # ------------------------------------------------------------------ pages
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def overview(request: Request) -> Response:
        return page(request, "overview.html", title="Overview")

    @app.get("/search", response_class=HTMLResponse, include_in_schema=False)
    def search_page(request: Request, q: str | None = None, k: str | None = None,
                    layers: list[str] | None = Query(None), per_layer: bool = False) -> Response:
        kk = _opt_int(k, "k") or 12
        res = ex.search(text=q, k=kk, layers=_split(layers), per_layer=per_layer) if q else None
        return page(request, "search.html", title="Search", q=q or "", k=kk, sel_layers=_split(layers) or [],
                    per_layer=per_layer, result=res)

    @app.post("/search", response_class=HTMLResponse, include_in_schema=False)
    async def search_upload(request: Request, image: UploadFile = File(...), k: str | None = Form(None),
                            layers: list[str] | None = Form(None), per_layer: bool = Form(False)) -> Response:
        kk = _opt_int(k, "k") or 12
        img = await _read_upload(image)
        res = await run_in_threadpool(ex.search, image=img, k=kk, layers=_split(layers), per_layer=per_layer)
        return page(request, "search.html", title="Search", q="", k=kk, sel_layers=_split(layers) or [],
                    per_layer=per_layer, result=res, uploaded=image.filename or "uploaded image")

    @app.get("/neuron/{layer}/{component}", response_class=HTMLResponse, include_in_schema=False)
    def neuron_page(request: Request, layer: str, component: int) -> Response:
        return page(request, "neuron.html", title=f"{layer}:{component}", n=ex.neuron(layer, component))

    @app.get("/neuron", include_in_schema=False)
    def neuron_go(layer: str, component: str) -> Response:
        c = _opt_int(component, "component")
        ex.check_component(layer, c if c is not None else -1)
        return RedirectResponse(f"/neuron/{quote(layer, safe='')}/{c}", status_code=303)

    @app.get("/describe", response_class=HTMLResponse, include_in_schema=False)
    def describe_page(request: Request, layer: str | None = None, target: str | None = None, offset: str | None = None,
                      limit: str | None = None) -> Response:
        lay = layer or ex.layers[0]
        t = _opt_int(target, "target")
        d = ex.describe(lay, target=t, offset=_opt_int(offset, "offset") or 0, limit=_opt_int(limit, "limit") or 200)
        targets = list(range(len(ex.classes))) if ex.classes else ex.relevance_targets()
        return page(request, "describe.html", title=f"Describe {lay}", d=d, targets=targets)

    @app.get("/compare", response_class=HTMLResponse, include_in_schema=False)
    def compare_page(request: Request, layers: list[str] | None = Query(None), other_layers: list[str] | None = Query(None),
                     other: str | None = None, threshold: str | None = None, labels: bool = False) -> Response:
        a, b = _split(layers), _split(other_layers)
        th = _opt_float(threshold, "threshold", 0.8)
        res = None
        if other or b:
            res = ex.compare(layers=a, other_layers=b, other=other or None, threshold=th, vocabulary=labels)
        return page(request, "compare.html", title="Compare", res=res, sel_a=a or [], sel_b=b or [], other=other or "",
                    threshold=th, labels=labels)

    def _audit_page(request: Request, form: dict[str, Any], run_it: bool) -> Response:
        valid, spurious = _lines(form.get("valid")), _lines(form.get("spurious"))
        target = _opt_int(form.get("target"), "target")
        threshold = _opt_float(form.get("threshold"), "threshold", 0.0)
        margin = _opt_float(form.get("margin"), "margin", 0.0)
        layers = _split(form.get("layers"))
        res = None
        if run_it:
            res = ex.audit(valid=valid, spurious=spurious, target=target, layers=layers, threshold=threshold,
                           margin=margin if margin is not None else 0.0, save=bool(form.get("save")))
        return page(request, "audit.html", title="Audit", res=res, last=None if res else ex.last_audit(),
                    form={"valid": "\n".join(valid), "spurious": "\n".join(spurious), "target": target,
                          "threshold": threshold, "margin": margin, "layers": layers or []})

    @app.get("/audit", response_class=HTMLResponse, include_in_schema=False)
    def audit_page(request: Request, valid: str | None = None, spurious: str | None = None, target: str | None = None,
                   threshold: str | None = None, margin: str | None = None,
                   layers: list[str] | None = Query(None)) -> Response:
        form = {"valid": valid, "spurious": spurious, "target": target, "threshold": threshold, "margin": margin,
                "layers": layers}
        return _audit_page(request, form, run_it=bool(valid or spurious))

    @app.post("/audit", response_class=HTMLResponse, include_in_schema=False)
    async def audit_post(request: Request) -> Response:
        f = await request.form(max_files=0, max_fields=64)
        form = {k: f.get(k) for k in ("valid", "spurious", "target", "threshold", "margin", "save")}
        form["layers"] = f.getlist("layers")
        return await run_in_threadpool(_audit_page, request, form, True)

    @app.get("/map", response_class=HTMLResponse, include_in_schema=False)
    def map_page(request: Request) -> Response:
        m = ex.concept_map()
        colour = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(m["layers"])}
        return page(request, "map.html", title="Concept map", m=m, points=_map_svg_points(m), size=MAP_PX, colour=colour)

    return app


def wrap(app: Any, explorer: Explorer, allowed_hosts: list[str] | None = None) -> Any:
    """``app`` behind the host check, the security headers and the body limit (outermost).

    ``allowed_hosts``: values the ``Host`` header may take (default ``127.0.0.1``, ``localhost``;
    ``["*"]`` accepts any).
    """
    hosts = allowed_hosts or ["127.0.0.1", "localhost"]
    inner = TrustedHostMiddleware(app, allowed_hosts=hosts, www_redirect=False)
    return BodyLimit(SecurityHeaders(inner), explorer.limits.max_upload_bytes + MULTIPART_ALLOWANCE)


def build(explorer: Explorer, *, allowed_hosts: list[str] | None = None) -> Any:
    """The complete ASGI application: :func:`create_app` wrapped by :func:`wrap`."""
    return wrap(create_app(explorer), explorer, allowed_hosts)


__all__ = ["create_app", "wrap", "build", "SearchRequest", "AuditRequest"]
