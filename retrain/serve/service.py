"""`Service`: what the HTTP handlers share, and one image's way through the server.

An image's way: its header is read (how many pixels decoding it takes; `pixels_of`), it is
refused past the per-image or per-request pixel limit (`over_budget`), waits for room in the
in-flight pixel budget, is decoded in the decode pool (`decode`), then queued for the
micro-batcher and turned into top-k labels (`infer`). `admitted` bounds requests in flight.
"""

from __future__ import annotations

import asyncio
import copy
import math
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from retrain.errors import ImageError
from retrain.serve.batcher import MicroBatcher
from retrain.serve.config import MAX_BATCH_IMAGES, ServeConfig
from retrain.serve.http_errors import ApiError, decoder_error, error_body, image_error
from retrain.serve.limits import PixelBudget, decoded_pixels


def model_id(path: Path, architecture: str | None) -> str:
    """`<architecture>-<first 12 hex of the model file's sha256>`: changes whenever the file does."""
    from retrain.files import sha256_file

    return f"{architecture or 'onnx'}-{sha256_file(path)[:12]}"


def load_classifiers(model, cfg: ServeConfig) -> tuple[list, bool]:
    """(one Classifier per model slot, whether they run on the CPU). Each slot has its own session.

    On a CPU: --threads (default 1) ONNX Runtime threads per call, and as many calls at once as
    the cores allow; idle threads sleep instead of spinning (the decode threads and the event loop
    share these cores). On a GPU: one slot.
    """
    from retrain.classifier import Classifier
    from retrain.runtime import make_session

    threads = cfg.threads or 1  # on a CPU
    clf = Classifier(model, provider=cfg.provider, threads=cfg.threads, cpu_threads=threads)
    if clf.session.get_providers()[0] != "CPUExecutionProvider":
        return [clf], False
    if clf.session.get_session_options().intra_op_num_threads != threads:
        # A GPU provider was there but could not start: ONNX Runtime fell back to the CPU with
        # the GPU's thread count.
        clf.session = make_session(clf.path, provider="cpu", threads=threads)
    slots = [clf]
    for _ in range(max(1, cfg.cpu_cores() // threads) - 1):
        twin = copy.copy(clf)
        twin.session = make_session(clf.path, provider="cpu", threads=threads)
        slots.append(twin)
    return slots, True


class Service:
    """The model (a Classifier per slot), its batcher, the decode pools, the pixel budget and the
    count of requests in flight. Loads the model when made. Used from the event loop only."""

    def __init__(self, model, cfg: ServeConfig):
        slots, on_cpu = load_classifiers(model, cfg)
        clf = self.clf = slots[0]
        self.cfg = cfg
        self.model_id = model_id(clf.path, clf.meta.get("architecture"))
        max_batch, max_wait_s = cfg.batching(on_cpu)
        self.batcher = MicroBatcher(slots, max_batch=max_batch, max_wait_s=max_wait_s)
        self.limit = cfg.max_upload_bytes
        # The largest JPEG draft images.load asks for (the crop must keep the model's input size).
        self.draft = math.ceil(max(clf.width, clf.height) / clf.crop_fraction)
        self.budget = PixelBudget(cfg.max_inflight_pixels)
        self.image_cap = min(cfg.max_request_pixels, cfg.max_inflight_pixels)  # one image must fit in both
        self.default_k = max(1, min(int(cfg.top_k), len(clf.labels)))
        self.decode_pool = ThreadPoolExecutor(cfg.decode_workers or max(2, cfg.cpu_cores()),
                                              thread_name_prefix="retrain-decode")
        # Headers are read apart from the decodes: a photo's header never queues behind huge images.
        self.header_pool = ThreadPoolExecutor(2, thread_name_prefix="retrain-header")
        self.pending = 0

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        self.decode_pool.shutdown(wait=False)
        self.header_pool.shutdown(wait=False)

    @contextmanager
    def admitted(self):
        """Counts requests in flight; refuses with 503 past max_pending (bounded memory)."""
        if self.pending >= self.cfg.max_pending:
            raise ApiError(503, "busy", f"the server has {self.cfg.max_pending} requests in flight; retry shortly",
                           {"Retry-After": "1"})
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1

    async def pixels_of(self, data: bytes) -> int:
        return await asyncio.get_running_loop().run_in_executor(self.header_pool, decoded_pixels, data, self.draft)

    def over_budget(self, name: str | None, n: int, left: int) -> ApiError | None:
        """413 for an image that needs more pixels than one image may, or than its request has left."""
        who = f"{name}: " if name else ""
        if n > self.image_cap:
            flag = "--max-request-pixels" if self.image_cap == self.cfg.max_request_pixels else "--max-inflight-pixels"
            return ApiError(413, "image_too_large", f"{who}decoding it takes {n:,} pixels, over this "
                                                    f"server's limit of {self.image_cap:,} pixels per image ({flag})")
        if n > left:
            return ApiError(413, "too_many_pixels",
                            f"{who}the images of this request take more than the {self.cfg.max_request_pixels:,} "
                            "pixels one request may decode (the server's --max-request-pixels); send "
                            "this one in another request")
        return None

    async def decode(self, data: bytes, name: str | None, pixels: int):
        """Bytes -> uint8 (H, W, 3) in the decode pool (off the event loop), or a 4xx/503 ApiError.
        `pixels` (from the header) are held from the in-flight budget until the decoder is done."""
        if not data:
            raise ApiError(400, "empty_image", f"{name + ': ' if name else ''}the image is empty (0 bytes)")
        budget = self.budget
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

        job = self.decode_pool.submit(self.clf.load_image, data)
        job.add_done_callback(done)  # when the decoder really finishes, even if this request is cancelled
        try:
            return await asyncio.wrap_future(job)
        except ImageError as e:
            raise image_error(e, name) from None
        except Exception as e:  # noqa: BLE001 - whatever a decoder raises is this image's fault
            raise decoder_error(e, name) from None

    async def infer(self, image, name: str | None, tta: bool, k: int, t0: float, t1: float) -> dict:
        """A decoded image -> its result: top-k labels (or "unknown", Classifier.answer), the novelty,
        the model's id, the batch size, timings."""
        clf = self.clf
        probs, novelty, batch_size = await self.batcher.classify(image, tta)
        t2 = time.perf_counter()
        out = {"model_id": self.model_id, **clf.answer(probs, novelty, k)}
        if name is not None:
            out = {"filename": name, **out}
        out["batch_size"] = batch_size
        out["time_ms"] = {"decode": round((t1 - t0) * 1000, 2), "model": round((t2 - t1) * 1000, 2),
                          "total": round((time.perf_counter() - t0) * 1000, 2)}
        return out

    async def classify_one(self, data: bytes, name: str | None, tta: bool, k: int) -> dict:
        t0 = time.perf_counter()
        pixels = await self.pixels_of(data)
        refused = self.over_budget(name, pixels, self.cfg.max_request_pixels)
        if refused:
            raise refused
        image = await self.decode(data, name, pixels)
        return await self.infer(image, name, tta, k, t0, time.perf_counter())

    async def classify_many(self, files: list[tuple[str, bytes]], tta: bool, k: int) -> list[dict]:
        """A result, or {"filename", "error"}, for each (filename, bytes), in order."""
        # Decode all, then queue all at once: the batcher then runs them in shared model calls.
        t0 = time.perf_counter()
        pixels = await asyncio.gather(*(self.pixels_of(d) for _, d in files))
        left, jobs = self.cfg.max_request_pixels, []
        for (n, d), px in zip(files, pixels):  # in order: which images fit does not depend on timing
            refused = self.over_budget(n, px, left)
            if refused is None:
                left -= px
            jobs.append(_refuse(refused) if refused else self.decode(d, n, px))
        decoded = await asyncio.gather(*jobs, return_exceptions=True)
        t1 = time.perf_counter()

        async def one(name, image):
            if isinstance(image, ApiError):
                return {"filename": name, "error": error_body(image.code, image.message)["error"]}
            if isinstance(image, BaseException):
                raise image
            return await self.infer(image, name, tta, k, t0, t1)

        return list(await asyncio.gather(*(one(n, im) for (n, _), im in zip(files, decoded))))

    def model_info(self) -> dict:
        """GET /v1/model: labels, architecture, input size, metrics, limits."""
        from retrain import images

        info = self.clf.describe()
        info.pop("path", None)  # the server's file layout is not the client's business
        cfg = self.cfg
        return {"model_id": self.model_id, "file": self.clf.path.name, **info,
                "limits": {"max_upload_bytes": self.limit, "max_batch_images": MAX_BATCH_IMAGES,
                           "max_pixels": images.MAX_PIXELS, "max_request_pixels": cfg.max_request_pixels,
                           "max_inflight_pixels": cfg.max_inflight_pixels, "default_top_k": self.default_k}}


async def _refuse(e: ApiError):
    """Stands in gather() for an image refused before decoding, so results keep their order."""
    raise e
