"""`create_app`: the FastAPI app of `retrain serve`, its routes, error answers and middleware.

    POST /v1/classify         one image: raw body (image/*, application/octet-stream) or multipart
                              field `file` -> top-k labels and scores, the model's id, timings
    POST /v1/classify/batch   multipart, several `files` -> one result (or error) per image
    GET  /v1/model            labels, architecture, input size, metrics, limits
    GET  /healthz             liveness (never needs the API key)
    GET  /openapi.json        the OpenAPI spec (retrain.serve.schema)
    GET  /                    a page to pick, drop, paste or photograph an image (no CDN assets)

The handlers only read the request (retrain.serve.limits) and hand it to the Service
(retrain.serve.service), which does the work. Imports FastAPI: retrain.serve imports this module
only when create_app is asked for.
"""

import sys
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

from retrain.errors import MissingDependency

try:
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:
    raise MissingDependency(f"retrain serve needs FastAPI and uvicorn ({e.name} is missing); "
                            "install them with: pip install 'retrain[serve]'") from None

from retrain.serve.auth import ApiKeyMiddleware
from retrain.serve.config import MAX_TOP_K, ServeConfig
from retrain.serve.http_errors import ApiError, error_body
from retrain.serve.limits import DrainUnreadBody, read_batch_files, read_image
from retrain.serve.schema import batch_spec, install_openapi, single_spec
from retrain.serve.service import Service

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# The page's files, by URL. Read into memory at start: no request ever names a file.
STATIC_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
                "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
                "/static/style.css": ("style.css", "text/css; charset=utf-8")}
# The page may load nothing from anywhere but this server (it must work offline).
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
            "style-src 'self'; script-src 'self'; connect-src 'self'; object-src 'none'; "
            "base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


def create_app(model, config: ServeConfig | None = None, **settings):
    """The FastAPI app serving `model` (a run folder or .onnx). Loads the model now, so a bad
    model is a ModelError before anything listens. Settings: a ServeConfig, and/or its fields
    by name (max_upload_mb=2, api_key=..., ...); out-of-range values are a ConfigError."""
    cfg = replace(config or ServeConfig(), **settings).check()
    svc = Service(model, cfg)
    pages = {url: ((STATIC_DIR / name).read_bytes(), ctype) for url, (name, ctype) in STATIC_FILES.items()}
    app = FastAPI(title="retrain", version=str(svc.clf.meta.get("retrain_version", "")),
                  lifespan=lifespan(svc),
                  docs_url=None, redoc_url=None,  # their pages load assets from a CDN
                  description="Image classifier trained with `retrain fit`. Errors are "
                              "`{\"error\": {\"code\", \"message\"}}` with a 4xx status.")
    app.state.classifier, app.state.model_id, app.state.batcher = svc.clf, svc.model_id, svc.batcher
    add_error_handlers(app)
    add_api_routes(app, svc)
    for url, (body, ctype) in pages.items():
        app.add_api_route(url, page(body, ctype, url == "/"), methods=["GET", "HEAD"], include_in_schema=False)
    install_openapi(app)
    if cfg.api_key:
        app.add_middleware(ApiKeyMiddleware, key=cfg.api_key)
    # Added last, so outermost: it also holds back the API key's 401 until the body is in.
    app.add_middleware(DrainUnreadBody, limit=min(4 * svc.limit, svc.limit + 64 * 1024 * 1024),
                       timeout_s=cfg.body_timeout_s)
    return app


def lifespan(svc: Service):
    """The app's lifespan: the batcher runs while the server does; the pools stop with it."""
    @asynccontextmanager
    async def run(_app):
        await svc.start()
        yield
        await svc.stop()

    return run


# ------------------------------------------------------------------------------ error answers

def json_error(status, code, message, headers=None):
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


async def api_error(_req, e: ApiError):
    return json_error(e.status, e.code, e.message, e.headers)


async def validation_error(_req, e: RequestValidationError):
    parts = []
    for err in e.errors()[:5]:
        where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "body"))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", "invalid"))
    return json_error(422, "invalid_parameter", "; ".join(parts) or "invalid request")


async def http_error(_req, e: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    msg = {404: "no such endpoint; see /openapi.json",
           405: "method not allowed here; see /openapi.json"}.get(e.status_code, str(e.detail))
    return json_error(e.status_code, code, msg, getattr(e, "headers", None))


async def unexpected_error(_req, e: Exception):
    print(f"retrain serve: internal error: {type(e).__name__}: {e}", file=sys.stderr)
    return json_error(500, "internal_error", f"internal error ({type(e).__name__}); the server keeps running")


def add_error_handlers(app) -> None:
    """Every failure becomes {"error": {"code", "message"}}; never a traceback to the client."""
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)


# ------------------------------------------------------------------------------------- routes

def add_api_routes(app, svc: Service) -> None:
    """/v1/classify, /v1/classify/batch, /v1/model and /healthz. (The handlers' names and
    docstrings are their operationId and description in /openapi.json.)"""
    n_labels = len(svc.clf.labels)
    TopK = Query(svc.default_k, ge=1, le=MAX_TOP_K, description="how many labels (at most the model's)")
    Tta = Query(svc.clf.tta_default, description="average with the mirror image (default: the model's setting)")

    @app.post("/v1/classify", summary="Classify one image", response_class=JSONResponse,
              openapi_extra=single_spec())
    async def classify(request: Request, top_k: int = TopK, tta: bool = Tta):
        """The image as the raw body (Content-Type image/* or application/octet-stream) or as
        multipart/form-data field `file`."""
        with svc.admitted():
            name, data = await read_image(request, svc.limit, svc.cfg.body_timeout_s)
            return await svc.classify_one(data, name, tta, min(top_k, n_labels))

    @app.post("/v1/classify/batch", summary="Classify several images", response_class=JSONResponse,
              openapi_extra=batch_spec())
    async def classify_batch(request: Request, top_k: int = TopK, tta: bool = Tta):
        """multipart/form-data with up to 32 file fields (named `files`); the whole body is
        bounded by the upload limit. Each image gets a result or an `error`; the request as a whole
        succeeds unless the body itself is wrong."""
        with svc.admitted():
            files = await read_batch_files(request, svc.limit, svc.cfg.body_timeout_s)
            results = await svc.classify_many(files, tta, min(top_k, n_labels))
            return {"model_id": svc.model_id, "results": results}

    @app.get("/v1/model", summary="The model's labels, architecture, input size and metrics")
    async def model_info():
        return svc.model_info()

    @app.get("/healthz", summary="Liveness: 200 while the server can classify")
    async def healthz():
        return {"status": "ok", "model_id": svc.model_id, "batches": svc.batcher.batches,
                "images": svc.batcher.images}


def page(body: bytes, ctype: str, is_index: bool):
    """The handler of one of the page's files (read at start); the page itself gets a strict CSP."""
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    if is_index:
        headers.update({"Content-Security-Policy": PAGE_CSP, "Referrer-Policy": "no-referrer",
                        "X-Frame-Options": "DENY"})

    async def handler():
        return Response(body, media_type=ctype, headers=dict(headers))

    return handler
