"""`retrain serve RUN`: an HTTP API and a web page for a trained model.

    POST /v1/classify         one image: raw body (image/*, application/octet-stream) or multipart
                              field `file` -> top-k labels and scores, the model's id, timings
    POST /v1/classify/batch   multipart, several `files` -> one result (or error) per image
    GET  /v1/model            labels, architecture, input size, metrics, limits
    GET  /healthz             liveness (never needs the API key)
    GET  /openapi.json        the OpenAPI spec
    GET  /                    a page to pick, drop, paste or photograph an image (no CDN assets)

Requests are decoded in a thread pool (off the event loop) and queued for a micro-batcher that
hands whatever has arrived, up to --max-batch images, to ONNX Runtime in a worker thread:
concurrent requests share model calls (on a CPU, one single-threaded call per core at once).
Every input is bounded: body size (--max-upload-mb), pixels per image (images.MAX_PIXELS),
decoded pixels per request (--max-request-pixels) and in flight (--max-inflight-pixels: memory),
images per batch request, requests in flight. An early answer (413, 401, 503) waits until the
client's body has arrived (up to a bound), so clients that write the whole body before reading
(urllib, requests) get it. The server never takes a file path from a request: the page's three files are read from
the package once, at start.
"""

import asyncio
import base64
import copy
import hashlib
import heapq
import hmac
import io
import ipaddress
import itertools
import math
import os
import queue
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from retrain.errors import ConfigError, ImageError, MissingDependency

API_KEY_ENV = "RETRAIN_API_KEY"
DEFAULT_MAX_UPLOAD_MB = 10.0
MAX_UPLOAD_MB = 1024.0
# Decoded pixels: one request's images together, and all images being decoded at once (each
# pixel costs 3-4 bytes while decoding; a photo is then cut down to the model's input size).
DEFAULT_MAX_REQUEST_PIXELS = 256_000_000
DEFAULT_MAX_INFLIGHT_PIXELS = 128_000_000
PIXELS_RANGE = (1_000_000, 100_000_000_000)
PIXEL_WAIT_S = 10.0            # an image waits this long for room in the in-flight budget, then 503
MAX_BATCH_IMAGES = 32          # images in one /v1/classify/batch request
MAX_TOP_K = 1000
STATIC_DIR = Path(__file__).resolve().parent / "static"
# The page's files, by URL. Read into memory at start: no request ever names a file.
STATIC_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
                "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
                "/static/style.css": ("style.css", "text/css; charset=utf-8")}
# The page may load nothing from anywhere but this server (it must work offline).
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
            "style-src 'self'; script-src 'self'; connect-src 'self'; object-src 'none'; "
            "base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
RAW_TYPES = ("application/octet-stream",)  # plus any image/*


class ApiError(Exception):
    """A request problem: becomes {"error": {"code", "message"}} with this HTTP status."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def model_id(path: Path, architecture: str | None) -> str:
    """`<architecture>-<first 12 hex of the model file's sha256>`: changes whenever the file does."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"{architecture or 'onnx'}-{h.hexdigest()[:12]}"


def image_error(e: ImageError, name: str | None = None) -> ApiError:
    """An ImageError from images.load -> a 4xx naming the problem (413 for pixel bombs)."""
    msg = str(e)
    if msg.startswith("<bytes>: "):
        msg = msg[len("<bytes>: "):]
    if name:
        msg = f"{name}: {msg}"
    low = msg.lower()
    if "decompression bomb" in low or "over the limit" in low:
        return ApiError(413, "image_too_large", msg)
    if "truncated" in low:
        return ApiError(422, "truncated_image", msg)
    if "not an image" in low:
        return ApiError(422, "not_an_image", msg)
    return ApiError(422, "bad_image", msg)


def decoder_error(e: Exception, name: str | None = None) -> ApiError:
    """Any other exception out of a decoder (Pillow's plugins raise TypeError, struct.error,
    NotImplementedError... on malformed files) -> 422 for that image, never a 500."""
    detail = str(e)[:200] or type(e).__name__
    return ApiError(422, "bad_image", f"{name + ': ' if name else ''}the image could not be decoded "
                                      f"({type(e).__name__}: {detail})")


def decoded_pixels(data: bytes, draft: int) -> int:
    """The pixels decoding `data` will allocate, from its header alone (nothing is decoded): w x h,
    or for a JPEG the reduced size its decoder scales to (images.load drafts JPEGs to `draft`).
    0 for what Pillow cannot open or the decoder refuses outright (over images.MAX_PIXELS): the
    decoder then says what is wrong, before it allocates anything."""
    from PIL import Image

    from retrain import images

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                if im.format == "JPEG":
                    im.draft("RGB", (draft, draft))
                w, h = im.size
    except Exception:  # noqa: BLE001 - any failure here is reported by the decoder
        return 0
    n = int(w) * int(h)
    return n if 0 < n <= images.MAX_PIXELS else 0


class PixelBudget:
    """Decoded pixels in flight over all requests, bounded: memory, and the wait behind them.

    An image takes its pixel count (from its header) before it is queued to decode and gives it
    back once decoded (to the model's input size). When the budget is spent it waits, smallest
    image first, so a photo is never stuck behind a flood of huge ones, for at most `wait_s`; then
    `take` says no (the caller answers 503). Used from the event loop only, so no lock.
    """

    def __init__(self, total: int, wait_s: float = PIXEL_WAIT_S):
        self.total, self.wait_s, self.used = int(total), float(wait_s), 0
        self._waiting: list = []  # heap of (pixels, arrival, future)
        self._arrivals = itertools.count()

    async def take(self, n: int) -> bool:
        # Every waiter needs more than is free (give() hands out whatever fits), so an image
        # that fits now is smaller than all of them and passes none over.
        if self.used + n <= self.total:
            self.used += n
            return True
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (n, next(self._arrivals), fut))
        try:
            await asyncio.wait([fut], timeout=self.wait_s)
        except BaseException:  # the request was cancelled while it waited
            if fut.done() and not fut.cancelled():
                self.give(n)
            fut.cancel()
            raise
        if fut.done():
            return True
        fut.cancel()  # left in the heap; give() skips it
        return False

    def give(self, n: int) -> None:
        self.used -= n
        while self._waiting and (self._waiting[0][2].done() or
                                 self.used + self._waiting[0][0] <= self.total):
            need, _, fut = heapq.heappop(self._waiting)
            if not fut.done():
                self.used += need
                fut.set_result(None)


class DrainUnreadBody:
    """Reads and discards what is left of a request body before an early answer goes out.

    An answer sent before the body has arrived (413 on Content-Length, 401, 415, 503) is otherwise
    followed by closing a connection the client is still writing to: clients that write the whole
    body before they read (Python's urllib, requests) see a reset, not the answer. At most `limit`
    bytes within `timeout_s` are read; past that (or a Content-Length over it) the answer goes out
    at once with `Connection: close`. A client that sent `Expect: 100-continue` is answered at once
    too: it waits for the answer and sends no body.
    """

    def __init__(self, app, limit: int, timeout_s: float):
        self.app, self.limit, self.timeout_s = app, int(limit), float(timeout_s)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen = {"asked": False, "bytes": 0, "done": False}

        async def counting_receive():
            seen["asked"] = True
            msg = await receive()
            if msg["type"] == "http.request":
                seen["bytes"] += len(msg.get("body", b""))
                seen["done"] = not msg.get("more_body", False)
            else:  # http.disconnect
                seen["done"] = True
            return msg

        async def send_after_body(msg):
            if msg["type"] == "http.response.start" and not seen["done"]:
                headers = list(msg.get("headers", []))
                if not await self._drain(scope, headers, counting_receive, seen):
                    msg = {**msg, "headers": [*headers, (b"connection", b"close")]}
            await send(msg)

        await self.app(scope, counting_receive, send_after_body)

    async def _drain(self, scope, answer_headers, receive, seen) -> bool:
        """True once the whole body has arrived (the connection can stay open)."""
        if (b"connection", b"close") in [(k.lower(), v.lower()) for k, v in answer_headers]:
            return False  # the answer closes the connection anyway (a body that came too slowly)
        req = {k.lower(): v for k, v in scope.get("headers") or []}
        if not seen["asked"] and req.get(b"expect", b"").lower() == b"100-continue":
            return False
        try:
            if int(req.get(b"content-length", b"0")) > self.limit:
                return False
        except ValueError:
            return False

        async def rest() -> bool:
            while not seen["done"]:
                if seen["bytes"] > self.limit:
                    return False
                await receive()
            return True

        try:
            return await asyncio.wait_for(rest(), self.timeout_s)
        except asyncio.TimeoutError:
            return False


class MicroBatcher:
    """Collects concurrent requests' images and runs them through the model together.

    One asyncio task waits for a free model slot (one per classifier, one thread each), then
    takes the first queued image, waits up to `max_wait_s` for more, and hands up to `max_batch`
    of them to Classifier.predict in that slot's thread. The event loop keeps accepting and
    decoding meanwhile; whatever queues while every slot is busy forms the next batch.
    On a CPU, several single-threaded slots beat one multi-threaded one: no barrier between
    threads waits for the slowest, which matters on a machine shared with other programs.
    """

    def __init__(self, clfs: list, *, max_batch: int = 16, max_wait_s: float = 0.002):
        """clfs: one Classifier per slot (each with its own session); len(clfs) calls run at once."""
        self.max_batch = max(1, int(max_batch))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self.parallel = len(clfs)
        self._queue: asyncio.Queue | None = None
        self._slots: asyncio.Semaphore | None = None
        self._task: asyncio.Task | None = None
        self._running: set = set()
        self._pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="retrain-infer")
        # One classifier (one ONNX Runtime session) per slot: concurrent runs of one session
        # with different batch sizes were measured to serialise (1 core busy out of 2).
        self._free = queue.SimpleQueue()
        for clf in clfs:
            self._free.put(clf)
        self.batches = 0
        self.images = 0

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._slots = asyncio.Semaphore(self.parallel)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        for t in [self._task, *self._running]:
            if t:
                t.cancel()
        if self._task:
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=False)

    async def classify(self, image, tta: bool):
        """uint8 (H, W, 3) -> (probabilities (K,), size of the batch it ran in)."""
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((image, bool(tta), fut))
        return await fut

    async def _run(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = [await self._queue.get()]
                if self._queue.empty() and self.max_wait_s > 0:
                    await asyncio.sleep(self.max_wait_s)
                # Share what is waiting among the free slots (this one included), so one slot
                # does not take everything while another idles.
                free = max(1, self.parallel - len(self._running))
                take = min(self.max_batch, -(-(1 + self._queue.qsize()) // max(1, free)))
                while len(batch) < take and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
            except BaseException:
                self._slots.release()
                raise
            t = asyncio.create_task(self._execute(batch))
            self._running.add(t)
            t.add_done_callback(self._running.discard)

    def _predict(self, x, tta: bool):
        clf = self._free.get()  # never waits: there is one per worker thread
        try:
            return clf.predict(x, tta=tta)
        finally:
            self._free.put(clf)

    async def _execute(self, batch) -> None:
        import numpy as np

        loop = asyncio.get_running_loop()
        try:
            batch = [b for b in batch if not b[2].done()]  # clients that went away
            for tta in (False, True):
                group = [b for b in batch if b[1] == tta]
                if not group:
                    continue
                x = np.stack([b[0] for b in group])  # (N, H, W, 3) uint8
                try:
                    probs = await loop.run_in_executor(self._pool, self._predict, x, tta)
                except Exception as e:  # noqa: BLE001 - handed to every waiting request
                    for _, _, fut in group:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                self.batches += 1
                self.images += len(group)
                for (_, _, fut), p in zip(group, probs):
                    if not fut.done():
                        fut.set_result((p, len(group)))
        finally:
            self._slots.release()


class ApiKeyMiddleware:
    """Every request but GET /healthz needs the key: `Authorization: Bearer KEY`,
    `X-API-Key: KEY`, or HTTP Basic auth with KEY as the password (what a browser sends after
    its login prompt, so the web page works behind the key too)."""

    def __init__(self, app, key: str):
        self.app = app
        self.key = key.encode()

    def _given(self, headers: dict) -> list[bytes]:
        out = []
        if b"x-api-key" in headers:
            out.append(headers[b"x-api-key"].strip())
        auth = headers.get(b"authorization", b"")
        scheme, _, value = auth.partition(b" ")
        if scheme.lower() == b"bearer":
            out.append(value.strip())
        elif scheme.lower() == b"basic":
            try:
                out.append(base64.b64decode(value.strip(), validate=True).partition(b":")[2])
            except ValueError:
                pass
        return out

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/healthz":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if any(hmac.compare_digest(k, self.key) for k in self._given(headers)):
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        given = bool(self._given(headers))
        msg = ("the API key is wrong" if given else "this server needs an API key") + \
            ": send `Authorization: Bearer KEY` or `X-API-Key: KEY` (a browser asks for it as the password)"
        resp = JSONResponse(error_body("unauthorized", msg), status_code=401,
                            headers={"WWW-Authenticate": 'Basic realm="retrain", charset="UTF-8"'})
        await resp(scope, receive, send)


async def read_body(request, limit: int, timeout_s: float = 30.0) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (never buffered past
    it), and with 408 if it has not all arrived within `timeout_s` (a client trickling bytes)."""
    from starlette.requests import ClientDisconnect

    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            n = int(cl)
        except ValueError:
            raise ApiError(400, "bad_content_length", f"Content-Length '{cl[:40]}' is not a number") from None
        if n > limit:
            raise ApiError(413, "too_large", f"the body is {n:,} bytes, over the limit of {limit:,} bytes "
                                             "(the server's --max-upload-mb)")

    async def read() -> bytes:
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                raise ApiError(413, "too_large", f"the body is over the limit of {limit:,} bytes "
                                                 "(the server's --max-upload-mb)")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, "body_timeout", f"the body did not arrive within {timeout_s:g} s",
                       {"Connection": "close"}) from None
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the client closed the connection mid-body") from None


def media_type(request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_files(request, limit: int, max_files: int, timeout_s: float = 30.0) -> list[tuple[str, bytes]]:
    """(filename, bytes) of every file part of a multipart/form-data body, in order."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    body = await read_body(request, limit, timeout_s)
    if not body:
        raise ApiError(400, "empty_body", "the request body is empty; send multipart/form-data with the "
                                          "image in a file field")

    ctype = request.headers.get("content-type", "")
    boundary = next((p.split("=", 1)[1].strip().strip('"') for p in ctype.split(";")[1:]
                     if p.strip().lower().startswith("boundary=")), "")
    if not boundary:
        raise ApiError(400, "bad_multipart", "the multipart Content-Type has no boundary parameter")
    if b"--" + boundary.encode("latin-1", "replace") + b"--" not in body:
        raise ApiError(400, "bad_multipart", "the multipart body is cut short: it has no closing boundary")

    async def stream():
        yield body
        yield b""

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=max_files, max_fields=100).parse()
    except MultiPartException as e:
        raise ApiError(400, "bad_multipart", f"the multipart body could not be parsed: {e.message}") from None
    except Exception as e:  # noqa: BLE001 - python-multipart raises assorted errors on bad bodies
        raise ApiError(400, "bad_multipart", f"the multipart body could not be parsed: {e}") from None
    out = []
    try:
        for _, v in form.multi_items():
            if isinstance(v, UploadFile):
                out.append((v.filename or f"file{len(out) + 1}", await v.read()))
    finally:
        await form.close()
    return out


def check_range(flag: str, value, lo, hi, *, above: bool = False) -> None:
    """ConfigError unless lo <= value <= hi (lo < value with `above`); NaN and infinities never pass."""
    try:
        ok = math.isfinite(value) and (value > lo if above else value >= lo) and value <= hi
    except TypeError:
        ok = False
    if not ok:
        def fmt(x):
            return f"{x:,}" if isinstance(x, int) else f"{x:g}"
        low = f"above {fmt(lo)}" if above else f"at least {fmt(lo)}"
        raise ConfigError(f"{flag} must be {low} and at most {fmt(hi)}, got {value}")


def create_app(model, *, api_key: str | None = None, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
               max_batch: int | None = None, batch_wait_ms: float | None = None, top_k: int = 5,
               provider: str = "auto",
               threads: int | None = None, cores: int | None = None, max_pending: int = 64,
               body_timeout_s: float = 30.0, decode_workers: int | None = None,
               max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
               max_inflight_pixels: int = DEFAULT_MAX_INFLIGHT_PIXELS):
    """The FastAPI app serving `model` (a run folder or .onnx). Loads the model now, so a bad
    model is a ModelError before anything listens."""
    try:
        from fastapi import FastAPI, Query, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse, Response
        from starlette.exceptions import HTTPException as StarletteHTTPException
    except ImportError as e:
        raise MissingDependency(f"retrain serve needs FastAPI and uvicorn ({e.name} is missing); "
                                "install them with: pip install 'retrain[serve]'") from None
    from contextlib import asynccontextmanager

    from retrain.classifier import Classifier

    check_range("--max-upload-mb", max_upload_mb, 0, MAX_UPLOAD_MB, above=True)
    if max_batch is not None:
        check_range("--max-batch", max_batch, 1, 256)
    if batch_wait_ms is not None:
        check_range("--batch-wait-ms", batch_wait_ms, 0, 1000)
    check_range("--max-pending", max_pending, 1, 100_000)
    check_range("--body-timeout-s", body_timeout_s, 0, 3600, above=True)
    check_range("--max-request-pixels", max_request_pixels, *PIXELS_RANGE)
    check_range("--max-inflight-pixels", max_inflight_pixels, *PIXELS_RANGE)
    cores = cores or os.cpu_count() or 1
    if threads is not None:
        check_range("--threads", threads, 1, 1024)
    clf = Classifier(model, provider=provider, threads=threads)
    on_cpu = clf.session.get_providers()[0] == "CPUExecutionProvider"
    if on_cpu:
        # One ONNX Runtime thread per model call and as many calls at once as there are cores.
        threads = threads or 1
        clf.session = _cpu_session(clf.path, threads)
        parallel = max(1, cores // threads)
    else:
        parallel = 1
    # On a CPU a big batch is no faster per image than a single image (its activations fall out
    # of cache), so batches stay small and nobody waits for company; on a GPU, batches amortise
    # the launch costs. benchmarks/bench_serve.py --server-args '--max-batch N' measures it.
    max_batch = max_batch or (4 if on_cpu else 32)
    batch_wait_ms = (0.0 if on_cpu else 2.0) if batch_wait_ms is None else batch_wait_ms
    mid = model_id(clf.path, clf.meta.get("architecture"))
    limit = max(1, int(max_upload_mb * 1024 * 1024))
    # The largest JPEG draft images.load asks for (the crop must keep the model's input size).
    draft = math.ceil(max(clf.width, clf.height) / clf.crop_fraction)
    budget = PixelBudget(max_inflight_pixels)
    image_cap = min(max_request_pixels, max_inflight_pixels)  # one image must fit in both
    default_k = max(1, min(int(top_k), len(clf.labels)))
    pages = {url: ((STATIC_DIR / name).read_bytes(), ctype) for url, (name, ctype) in STATIC_FILES.items()}
    decode_pool = ThreadPoolExecutor(decode_workers or max(2, cores),
                                     thread_name_prefix="retrain-decode")
    # Headers are read apart from the decodes: a photo's header never queues behind huge images.
    header_pool = ThreadPoolExecutor(2, thread_name_prefix="retrain-header")
    slots = [clf]
    for _ in range(parallel - 1):
        twin = copy.copy(clf)
        twin.session = _cpu_session(clf.path, threads)
        slots.append(twin)
    batcher = MicroBatcher(slots, max_batch=max_batch, max_wait_s=batch_wait_ms / 1000)
    pending = {"n": 0}

    @asynccontextmanager
    async def lifespan(_app):
        await batcher.start()
        yield
        await batcher.stop()
        decode_pool.shutdown(wait=False)
        header_pool.shutdown(wait=False)

    app = FastAPI(title="retrain", version=str(clf.meta.get("retrain_version", "")), lifespan=lifespan,
                  docs_url=None, redoc_url=None,  # their pages load assets from a CDN
                  description="Image classifier trained with `retrain fit`. Errors are "
                              "`{\"error\": {\"code\", \"message\"}}` with a 4xx status.")
    app.state.classifier, app.state.model_id, app.state.batcher = clf, mid, batcher

    def json_error(status, code, message, headers=None):
        return JSONResponse(error_body(code, message), status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(_req, e: ApiError):
        return json_error(e.status, e.code, e.message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req, e: RequestValidationError):
        parts = []
        for err in e.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "body"))
            parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", "invalid"))
        return json_error(422, "invalid_parameter", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        msg = {404: "no such endpoint; see /openapi.json",
               405: "method not allowed here; see /openapi.json"}.get(e.status_code, str(e.detail))
        return json_error(e.status_code, code, msg, getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_req, e: Exception):
        print(f"retrain serve: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return json_error(500, "internal_error", f"internal error ({type(e).__name__}); the server keeps running")

    async def pixels_of(data: bytes) -> int:
        return await asyncio.get_running_loop().run_in_executor(header_pool, decoded_pixels, data, draft)

    def over_budget(name: str | None, n: int, left: int) -> ApiError | None:
        """413 for an image that needs more pixels than one image may, or than its request has left."""
        who = f"{name}: " if name else ""
        if n > image_cap:
            flag = "--max-request-pixels" if image_cap == max_request_pixels else "--max-inflight-pixels"
            return ApiError(413, "image_too_large", f"{who}decoding it takes {n:,} pixels, over this "
                                                    f"server's limit of {image_cap:,} pixels per image ({flag})")
        if n > left:
            return ApiError(413, "too_many_pixels",
                            f"{who}the images of this request take more than the {max_request_pixels:,} "
                            "pixels one request may decode (the server's --max-request-pixels); send "
                            "this one in another request")
        return None

    async def refuse(e: ApiError):
        """Stands in gather() for an image refused before decoding, so results keep their order."""
        raise e

    async def decode(data: bytes, name: str | None, pixels: int):
        """Bytes -> uint8 (H, W, 3) in the decode pool (off the event loop), or a 4xx/503 ApiError.
        `pixels` (from the header) are held from the in-flight budget until the decoder is done."""
        if not data:
            raise ApiError(400, "empty_image", f"{name + ': ' if name else ''}the image is empty (0 bytes)")
        if not await budget.take(pixels):
            raise ApiError(503, "busy", f"{name + ': ' if name else ''}the server is decoding "
                                        f"{budget.used:,} pixels of other images; retry shortly",
                           {"Retry-After": "1"})
        loop = asyncio.get_running_loop()

        def done(_):  # in the decode thread: hand the pixels back on the event loop
            try:
                loop.call_soon_threadsafe(budget.give, pixels)
            except RuntimeError:  # the loop has closed: the server is stopping
                pass

        job = decode_pool.submit(clf.load_image, data)
        job.add_done_callback(done)  # when the decoder really finishes, even if this request is cancelled
        try:
            return await asyncio.wrap_future(job)
        except ImageError as e:
            raise image_error(e, name) from None
        except Exception as e:  # noqa: BLE001 - whatever a decoder raises is this image's fault
            raise decoder_error(e, name) from None

    async def infer(image, name: str | None, tta: bool, k: int, t0: float, t1: float) -> dict:
        probs, batch_size = await batcher.classify(image, tta)
        t2 = time.perf_counter()
        preds = clf.top_k(probs, k)
        best = preds[0]["label"]
        thr = clf.unknown_threshold
        if thr is not None and preds[0]["score"] < float(thr):
            best = "unknown"
        out = {"model_id": mid, "label": best, "predictions": preds}
        if name is not None:
            out = {"filename": name, **out}
        out["batch_size"] = batch_size
        out["time_ms"] = {"decode": round((t1 - t0) * 1000, 2), "model": round((t2 - t1) * 1000, 2),
                          "total": round((time.perf_counter() - t0) * 1000, 2)}
        return out

    async def classify_one(data: bytes, name: str | None, tta: bool, k: int) -> dict:
        t0 = time.perf_counter()
        pixels = await pixels_of(data)
        refused = over_budget(name, pixels, max_request_pixels)
        if refused:
            raise refused
        image = await decode(data, name, pixels)
        return await infer(image, name, tta, k, t0, time.perf_counter())

    class Admitted:
        """Counts requests in flight; refuses with 503 past max_pending (bounded memory)."""

        def __enter__(self):
            if pending["n"] >= max_pending:
                raise ApiError(503, "busy", f"the server has {max_pending} requests in flight; retry shortly",
                               {"Retry-After": "1"})
            pending["n"] += 1

        def __exit__(self, *exc):
            pending["n"] -= 1

    binary = {"type": "string", "format": "binary"}
    err_schema = {"$ref": "#/components/schemas/Error"}
    errors_doc = {str(s): {"description": d, "content": {"application/json": {"schema": err_schema}}}
                  for s, d in ((400, "empty or malformed body"), (401, "missing or wrong API key"),
                               (413, "body over the size limit, or too many pixels (per image or per request)"),
                               (415, "a Content-Type that is not an image or multipart"),
                               (408, "the body arrived too slowly"),
                               (422, "not a readable image, or a bad parameter"),
                               (503, "too busy: too many requests or pixels in flight; see Retry-After"))}

    def spec(body: dict, ok_schema: str) -> dict:
        return {"requestBody": {"required": True, "content": body},
                "responses": {"200": {"description": "OK", "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{ok_schema}"}}}}, **errors_doc}}

    single_body = {"multipart/form-data": {"schema": {"type": "object", "properties": {"file": binary},
                                                      "required": ["file"]}},
                   "image/jpeg": {"schema": binary}, "image/png": {"schema": binary},
                   "application/octet-stream": {"schema": binary}}
    batch_body = {"multipart/form-data": {"schema": {
        "type": "object", "required": ["files"],
        "properties": {"files": {"type": "array", "items": binary, "minItems": 1,
                                "maxItems": MAX_BATCH_IMAGES}}}}}
    TopK = Query(default_k, ge=1, le=MAX_TOP_K, description="how many labels (at most the model's)")
    Tta = Query(clf.tta_default, description="average with the mirror image (default: the model's setting)")

    @app.post("/v1/classify", summary="Classify one image", response_class=JSONResponse,
              openapi_extra=spec(single_body, "Classification"))
    async def classify(request: Request, top_k: int = TopK, tta: bool = Tta):
        """The image as the raw body (Content-Type image/* or application/octet-stream) or as
        multipart/form-data field `file`."""
        with Admitted():
            ctype = media_type(request)
            name = None
            if ctype == "multipart/form-data":
                files = await read_files(request, limit + 64 * 1024, 2, body_timeout_s)
                if not files:
                    raise ApiError(400, "no_file", "the form has no file; send the image in a file field "
                                                   "named 'file'")
                if len(files) > 1:
                    raise ApiError(400, "too_many_files", f"the form has {len(files)} files; send one, or use "
                                                          "/v1/classify/batch for several")
                name, data = files[0]
                if len(data) > limit:
                    raise ApiError(413, "too_large", f"{name} is {len(data):,} bytes, over the limit of "
                                                     f"{limit:,} bytes")
            elif ctype.startswith("image/") or ctype in RAW_TYPES or not ctype:
                data = await read_body(request, limit, body_timeout_s)
                if not data:
                    raise ApiError(400, "empty_body", "the request body is empty; send the image bytes "
                                                      "(Content-Type image/jpeg, image/png, ...)")
            else:
                raise ApiError(415, "unsupported_media_type",
                               f"Content-Type '{ctype[:80]}' is not accepted; send the image bytes with "
                               "Content-Type image/* or application/octet-stream, or multipart/form-data "
                               "with a file field 'file'")
            return await classify_one(data, name, tta, min(top_k, len(clf.labels)))

    @app.post("/v1/classify/batch", summary="Classify several images", response_class=JSONResponse,
              openapi_extra=spec(batch_body, "BatchClassification"))
    async def classify_batch(request: Request, top_k: int = TopK, tta: bool = Tta):
        """multipart/form-data with up to 32 file fields (named `files`); the whole body is
        bounded by the upload limit. Each image gets a result or an `error`; the request as a whole
        succeeds unless the body itself is wrong."""
        with Admitted():
            if media_type(request) != "multipart/form-data":
                raise ApiError(415, "unsupported_media_type",
                               f"Content-Type '{media_type(request)[:80]}' is not accepted here; send "
                               "multipart/form-data with the images in file fields named 'files'")
            files = await read_files(request, limit, MAX_BATCH_IMAGES + 1, body_timeout_s)
            if not files:
                raise ApiError(400, "no_file", "the form has no files; send the images in file fields named 'files'")
            if len(files) > MAX_BATCH_IMAGES:
                raise ApiError(413, "too_many_files", f"more than {MAX_BATCH_IMAGES} images in one request; "
                                                      "split them")
            k = min(top_k, len(clf.labels))

            # Decode all, then queue all at once: the batcher then runs them in shared model calls.
            t0 = time.perf_counter()
            pixels = await asyncio.gather(*(pixels_of(d) for _, d in files))
            left, jobs = max_request_pixels, []
            for (n, d), px in zip(files, pixels):  # in order: which images fit does not depend on timing
                refused = over_budget(n, px, left)
                if refused is None:
                    left -= px
                jobs.append(refuse(refused) if refused else decode(d, n, px))
            decoded = await asyncio.gather(*jobs, return_exceptions=True)
            t1 = time.perf_counter()

            async def one(name, image):
                if isinstance(image, ApiError):
                    return {"filename": name, "error": error_body(image.code, image.message)["error"]}
                if isinstance(image, BaseException):
                    raise image
                return await infer(image, name, tta, k, t0, t1)

            results = await asyncio.gather(*(one(n, im) for (n, _), im in zip(files, decoded)))
            return {"model_id": mid, "results": list(results)}

    @app.get("/v1/model", summary="The model's labels, architecture, input size and metrics")
    async def model_info():
        info = clf.describe()
        info.pop("path", None)  # the server's file layout is not the client's business
        return {"model_id": mid, "file": clf.path.name, **info,
                "limits": {"max_upload_bytes": limit, "max_batch_images": MAX_BATCH_IMAGES,
                           "max_pixels": _max_pixels(), "max_request_pixels": max_request_pixels,
                           "max_inflight_pixels": max_inflight_pixels, "default_top_k": default_k}}

    @app.get("/healthz", summary="Liveness: 200 while the server can classify")
    async def healthz():
        return {"status": "ok", "model_id": mid, "batches": batcher.batches, "images": batcher.images}

    def page(url):
        body, ctype = pages[url]

        async def handler():
            headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
            if url == "/":
                headers.update({"Content-Security-Policy": PAGE_CSP, "Referrer-Policy": "no-referrer",
                                "X-Frame-Options": "DENY"})
            return Response(body, media_type=ctype, headers=headers)

        return handler

    for url in pages:
        app.add_api_route(url, page(url), methods=["GET", "HEAD"], include_in_schema=False)

    _add_schemas(app)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, key=api_key)
    # Added last, so outermost: it also holds back the API key's 401 until the body is in.
    app.add_middleware(DrainUnreadBody, limit=min(4 * limit, limit + 64 * 1024 * 1024),
                       timeout_s=body_timeout_s)
    return app


def _cpu_session(path, threads: int | None):
    """A CPU session whose idle threads sleep instead of spinning: the decode threads and the
    event loop share these cores with ONNX Runtime, and spinning starves them."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or (os.cpu_count() or 1)
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _max_pixels() -> int:
    from retrain import images

    return images.MAX_PIXELS


def _add_schemas(app) -> None:
    """Response schemas for the spec (handlers return plain dicts: no per-request validation)."""
    from fastapi.openapi.utils import get_openapi

    pred = {"type": "object", "required": ["label", "score"],
            "properties": {"label": {"type": "string"}, "score": {"type": "number"}}}
    err = {"type": "object", "required": ["code", "message"],
           "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}
    result = {"type": "object", "required": ["model_id", "label", "predictions", "time_ms"],
              "properties": {"filename": {"type": "string"}, "model_id": {"type": "string"},
                             "label": {"type": "string", "description": "top label, or 'unknown' "
                                       "below the model's unknown_threshold"},
                             "predictions": {"type": "array", "items": pred},
                             "batch_size": {"type": "integer", "description": "images in the model call "
                                            "this one shared (micro-batching)"},
                             "time_ms": {"type": "object", "additionalProperties": {"type": "number"}}}}
    schemas = {
        "Prediction": pred,
        "Classification": result,
        "BatchClassification": {"type": "object", "required": ["model_id", "results"], "properties": {
            "model_id": {"type": "string"},
            "results": {"type": "array", "items": {"anyOf": [
                {"$ref": "#/components/schemas/Classification"},
                {"type": "object", "required": ["filename", "error"],
                 "properties": {"filename": {"type": "string"}, "error": err}}]}}}},
        "Error": {"type": "object", "required": ["error"], "properties": {"error": err}},
    }

    def openapi():
        if app.openapi_schema is None:
            s = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            s.setdefault("components", {}).setdefault("schemas", {}).update(schemas)
            # FastAPI documents its own 422 shape; ours is the Error schema.
            for path in s.get("paths", {}).values():
                for op in path.values():
                    r = op.get("responses", {})
                    if "422" in r:
                        r["422"] = {"description": "not a readable image, or a bad parameter",
                                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            for k in ("HTTPValidationError", "ValidationError"):
                s["components"]["schemas"].pop(k, None)
            app.openapi_schema = s
        return app.openapi_schema

    app.openapi = openapi


# ---------------------------------------------------------------------------------------- CLI

def add_arguments(p) -> None:
    p.add_argument("run", metavar="RUN", help="run folder or model.onnx written by retrain fit")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for the network)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--workers", type=int, default=1,
                   help="server processes, each with the model loaded (default 1)")
    p.add_argument("--api-key", "--api_key", default=None,
                   help=f"require this key on every endpoint but /healthz (default: ${API_KEY_ENV} if set)")
    p.add_argument("--max-upload-mb", "--max_upload_mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                   help=f"largest request body in MB (default {DEFAULT_MAX_UPLOAD_MB:g})")
    p.add_argument("--max-batch", "--max_batch", type=int, default=None,
                   help="most images in one model call when requests arrive together (default 4 on CPU, 32 on GPU)")
    p.add_argument("--batch-wait-ms", "--batch_wait_ms", type=float, default=None,
                   help="how long a lone request waits for others to share its model call (default 0 on CPU, 2 on GPU)")
    p.add_argument("--max-pending", "--max_pending", type=int, default=64,
                   help="requests in flight before new ones get 503 (default 64; bounds memory)")
    p.add_argument("--body-timeout-s", "--body_timeout_s", type=float, default=30.0,
                   help="seconds a request body may take to arrive (default 30)")
    p.add_argument("--max-request-pixels", "--max_request_pixels", type=_pixels, default=DEFAULT_MAX_REQUEST_PIXELS, metavar="N",
                   help="decoded pixels one request may take, all its images together (default "
                        f"{DEFAULT_MAX_REQUEST_PIXELS:,}; a JPEG counts at the reduced size it is decoded at); "
                        "past it: 413")
    p.add_argument("--max-inflight-pixels", "--max_inflight_pixels", type=_pixels, default=DEFAULT_MAX_INFLIGHT_PIXELS, metavar="N",
                   help=f"pixels being decoded at once over all requests (default {DEFAULT_MAX_INFLIGHT_PIXELS:,}: "
                        "bounds memory, 3-4 bytes each); an image waits for room, smallest first, "
                        f"up to {PIXEL_WAIT_S:g} s, then 503")
    p.add_argument("--top-k", "--top_k", type=int, default=5, help="labels per image unless ?top_k= (default 5)")
    p.add_argument("--provider", default="auto", help="auto, cpu, cuda or tensorrt")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime threads per model call (default on CPU: 1, with one call per core at once)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-request log lines")


def _pixels(v: str) -> int:
    """A pixel count for argparse: 256000000 or 2.56e8."""
    import argparse

    try:
        f = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a number of pixels such as 128000000 or 1.28e8, got '{v}'") from None
    if not math.isfinite(f) or f != int(f):
        raise argparse.ArgumentTypeError(f"expects a whole number of pixels, got '{v}'")
    return int(f)


_ENV_CONFIG = "RETRAIN_SERVE_CONFIG"


def _app_from_env():
    """App factory for uvicorn worker processes (--workers > 1): settings travel as JSON in the env."""
    import json

    cfg = json.loads(os.environ[_ENV_CONFIG])
    key = os.environ.get(API_KEY_ENV) or None
    return create_app(cfg.pop("model"), api_key=key, **cfg)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port(host: str, port: int) -> None:
    import socket

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"--host '{host}' is not an address this machine has ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); is another server using it? "
                          "choose another with --port") from None
    finally:
        s.close()


def main(args) -> int:
    try:
        import uvicorn
    except ImportError:
        raise MissingDependency("retrain serve needs uvicorn; install it with: pip install 'retrain[serve]'") from None

    check_range("--workers", args.workers, 1, 64)
    check_range("--top-k", args.top_k, 1, MAX_TOP_K)
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    key = key or None
    cores = max(1, (os.cpu_count() or 1) // args.workers)  # each worker process gets its share
    settings = dict(max_upload_mb=args.max_upload_mb, max_batch=args.max_batch,
                    batch_wait_ms=args.batch_wait_ms, top_k=args.top_k, provider=args.provider,
                    threads=args.threads, cores=cores, max_pending=args.max_pending,
                    body_timeout_s=args.body_timeout_s, max_request_pixels=args.max_request_pixels,
                    max_inflight_pixels=args.max_inflight_pixels)
    # Load the model here even with several workers: a bad RUN is one error line, not N tracebacks.
    app = create_app(args.run, api_key=key, **settings)
    _check_port(args.host, args.port)
    if not _is_loopback(args.host) and not key:
        print(f"warning: listening on {args.host} without an API key: anyone who can reach this machine "
              f"can use the model (set --api-key or ${API_KEY_ENV})", file=sys.stderr)
    clf = app.state.classifier
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"retrain serve: {app.state.model_id} ({len(clf.labels)} labels) on http://{shown}:{args.port}/ "
          f"- API /v1/classify, spec /openapi.json{', API key required' if key else ''}; Ctrl+C to stop",
          file=sys.stderr, flush=True)
    common = dict(host=args.host, port=args.port, log_level="warning" if args.quiet else "info",
                  access_log=not args.quiet,
                  server_header=False, timeout_graceful_shutdown=5)
    if args.workers == 1:
        uvicorn.run(app, **common)
    else:
        import json

        del app  # each worker process loads its own copy
        os.environ[_ENV_CONFIG] = json.dumps({"model": str(Path(args.run).resolve()), **settings})
        if key:
            os.environ[API_KEY_ENV] = key
        uvicorn.run("retrain.serve:_app_from_env", factory=True, workers=args.workers, **common)
    return 0
