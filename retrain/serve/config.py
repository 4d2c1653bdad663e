"""Every `retrain serve` setting in one place: `ServeConfig`, with its default and allowed range.

main() builds one from the flags and create_app() takes one; `check()` refuses a value out of
its range (NaN and infinities never pass) with one ConfigError naming the flag. A setting of
None means "chosen from the hardware" (see `batching` and `cpu_cores`).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields

from retrain.config import check_number

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


def setting(default, lo=None, hi=None, *, above: bool = False, secret: bool = False):
    """A setting with its default; a number must lie in [lo, hi] (lo < value with `above`)."""
    meta = {"range": (lo, hi, above)} if lo is not None else {}
    return field(default=default, metadata=meta, repr=not secret)


@dataclass
class ServeConfig:
    # Checked in this order (the order of the messages a user sees).
    workers: int = setting(1, 1, 64)                 # server processes, each with the model
    top_k: int = setting(5, 1, MAX_TOP_K)            # labels per image unless ?top_k=
    max_upload_mb: float = setting(DEFAULT_MAX_UPLOAD_MB, 0, MAX_UPLOAD_MB, above=True)
    max_batch: int | None = setting(None, 1, 256)    # images per model call; None: 4 on CPU, 32 on GPU
    batch_wait_ms: float | None = setting(None, 0, 1000)  # None: 0 on CPU, 2 on GPU
    max_pending: int = setting(64, 1, 100_000)       # requests in flight before 503
    body_timeout_s: float = setting(30.0, 0, 3600, above=True)
    max_request_pixels: int = setting(DEFAULT_MAX_REQUEST_PIXELS, *PIXELS_RANGE)
    max_inflight_pixels: int = setting(DEFAULT_MAX_INFLIGHT_PIXELS, *PIXELS_RANGE)
    threads: int | None = setting(None, 1, 1024)     # ONNX Runtime threads per call; None: 1 on CPU
    # Not range-checked here: the port is checked by binding it (serve.main).
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = setting(None, secret=True)  # never travels in the worker processes' JSON
    quiet: bool = False
    provider: str = "auto"
    cores: int | None = None           # CPU cores this process may use; None: its share of the machine
    decode_workers: int | None = None  # image-decoding threads; None: max(2, cores)

    @classmethod
    def from_args(cls, args) -> ServeConfig:
        """The flags of `retrain serve` (the API key from $RETRAIN_API_KEY when not given)."""
        key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
        return cls(workers=args.workers, top_k=args.top_k, max_upload_mb=args.max_upload_mb,
                   max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                   max_pending=args.max_pending, body_timeout_s=args.body_timeout_s,
                   max_request_pixels=args.max_request_pixels,
                   max_inflight_pixels=args.max_inflight_pixels, threads=args.threads,
                   host=args.host, port=args.port, api_key=key or None, quiet=args.quiet,
                   provider=args.provider)

    def check(self, *names: str) -> ServeConfig:
        """ConfigError for the first setting out of its range (only `names`, if given)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if "range" in f.metadata and value is not None and (not names or f.name in names):
                lo, hi, above = f.metadata["range"]
                check_number(f"--{f.name.replace('_', '-')}", value, lo, hi, above=above)
        return self

    def to_env(self) -> dict:
        """The settings as JSON-ready values, without the API key (that travels on its own)."""
        d = asdict(self)
        d.pop("api_key")
        return d

    @property
    def max_upload_bytes(self) -> int:
        return max(1, int(self.max_upload_mb * 1024 * 1024))

    def cpu_cores(self) -> int:
        """Cores for this process: `cores`, else the machine's, shared among the workers."""
        return self.cores or max(1, (os.cpu_count() or 1) // self.workers)

    def batching(self, on_cpu: bool) -> tuple[int, float]:
        """(most images per model call, seconds a lone request waits for company)."""
        # On a CPU a big batch is no faster per image than a single image (its activations fall
        # out of cache), so batches stay small and nobody waits for company; on a GPU, batches
        # amortise the launch costs. benchmarks/bench_serve.py --server-args '--max-batch N'
        # measures it.
        max_batch = self.max_batch or (4 if on_cpu else 32)
        wait_ms = (0.0 if on_cpu else 2.0) if self.batch_wait_ms is None else self.batch_wait_ms
        return max_batch, wait_ms / 1000


def pixels(v: str) -> int:
    """A pixel count for argparse: 256000000 or 2.56e8."""
    import argparse

    try:
        f = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a number of pixels such as 128000000 or 1.28e8, got '{v}'") from None
    if not math.isfinite(f) or f != int(f):
        raise argparse.ArgumentTypeError(f"expects a whole number of pixels, got '{v}'")
    return int(f)
