"""Bounds on what one request may make the server do: bytes read, pixels decoded, time waited.

- `read_body` / `read_files` / `read_image` / `read_batch_files`: the request body, refused with
  413 past the upload limit (never buffered past it) and 408 when it trickles in too slowly.
- `decoded_pixels` (from an image's header alone) and `PixelBudget` (pixels being decoded over
  all requests, bounded: memory).
- `DrainUnreadBody`: an early answer (413, 401, 503) waits until the client's body has arrived
  (up to a bound), so clients that write the whole body before reading (urllib, requests) get it.
"""

from __future__ import annotations

import asyncio
import heapq
import io
import itertools
import warnings

from retrain.serve.config import MAX_BATCH_IMAGES, PIXEL_WAIT_S
from retrain.serve.http_errors import ApiError

RAW_TYPES = ("application/octet-stream",)  # plus any image/*


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



async def read_image(request, limit: int, timeout_s: float) -> tuple[str | None, bytes]:
    """(filename or None, bytes) of the one image of /v1/classify: the raw body (Content-Type
    image/* or application/octet-stream, or none) or multipart/form-data field `file`."""
    ctype = media_type(request)
    name = None
    if ctype == "multipart/form-data":
        files = await read_files(request, limit + 64 * 1024, 2, timeout_s)
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
        data = await read_body(request, limit, timeout_s)
        if not data:
            raise ApiError(400, "empty_body", "the request body is empty; send the image bytes "
                                              "(Content-Type image/jpeg, image/png, ...)")
    else:
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Type '{ctype[:80]}' is not accepted; send the image bytes with "
                       "Content-Type image/* or application/octet-stream, or multipart/form-data "
                       "with a file field 'file'")
    return name, data


async def read_batch_files(request, limit: int, timeout_s: float) -> list[tuple[str, bytes]]:
    """(filename, bytes) of the 1 to MAX_BATCH_IMAGES images of /v1/classify/batch (multipart
    file fields named `files`; the whole body within `limit`)."""
    if media_type(request) != "multipart/form-data":
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Type '{media_type(request)[:80]}' is not accepted here; send "
                       "multipart/form-data with the images in file fields named 'files'")
    files = await read_files(request, limit, MAX_BATCH_IMAGES + 1, timeout_s)
    if not files:
        raise ApiError(400, "no_file", "the form has no files; send the images in file fields named 'files'")
    if len(files) > MAX_BATCH_IMAGES:
        raise ApiError(413, "too_many_files", f"more than {MAX_BATCH_IMAGES} images in one request; "
                                              "split them")
    return files
