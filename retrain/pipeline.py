"""The decode/infer pipeline shared by bottlenecks, fine-tuning activations and labelling.

Worker threads decode and resize photos (Pillow releases the GIL) while the engine runs the
batches decoded before them. The engine is any callable `run_batch(x) -> outputs` on a batch
(N, 3, H, W) float32, normalised here; one with `takes_uint8` gets the decoded pixels
(N, H, W, 3) uint8 as they are (OpenVINO normalises inside the model), and one with
`submit(x, tag)` / `finished(wait)` and `batch` / `jobs` keeps several batches in flight.
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from retrain import images
from retrain.errors import ImageError
from retrain.progress import bar


def run_pipeline(sources: list, loader, run_batch, *, batch_size: int = 8, workers: int | None = None,
                 mean=127.0, std=128.0, on_batch=None, desc="Bottlenecks", quiet=False):
    """Decode `sources` with `loader` (source -> uint8 (H, W, 3)) in threads, run `run_batch` on
    batches.

    Calls on_batch(indices, outputs) for each batch (in order, except with an engine that has
    `submit`: then as batches finish) and returns ({index: reason} for images that could not be
    read, timing). Memory stays flat: at most a few batches are decoded ahead. Timing: seconds
    the main thread waited for decoding, and for the engine (to run a batch or to take one).
    """
    workers = workers or min(4, os.cpu_count() or 1)
    failures: dict[int, str] = {}
    t_wait = t_compute = 0.0
    raw = getattr(run_batch, "takes_uint8", False)  # OpenVINO: normalised inside the model
    overlap = hasattr(run_batch, "submit")  # several batches in flight (OpenVINO's request queue)
    if overlap:
        batch_size = run_batch.batch  # the batch it was compiled for

    def prepare(src):  # in a worker: decode, resize and normalise (all in parallel)
        return loader(src) if raw else images.normalize(loader(src)[None], mean, std)[0]

    with ThreadPoolExecutor(workers) as pool, bar(total=len(sources), desc=desc, unit="img",
                                                  quiet=quiet) as pbar:
        def done(idx, out):
            if on_batch:
                on_batch(idx, out)
            pbar.update(len(idx))

        pending: deque = deque()
        it = iter(enumerate(sources))
        window = batch_size * (run_batch.jobs + 2 if overlap else 3)  # decoded ahead: every request kept busy

        def fill():
            while len(pending) < window:
                try:
                    i, s = next(it)
                except StopIteration:
                    return
                pending.append((i, pool.submit(prepare, s)))

        try:
            fill()
            idx, arrs = [], []
            while pending or arrs:
                while pending and len(arrs) < batch_size:
                    i, fut = pending.popleft()
                    t0 = time.perf_counter()
                    try:
                        arr = fut.result()
                        idx.append(i)
                        arrs.append(arr)
                    except ImageError as e:
                        failures[i] = str(e).split(": ", 1)[-1]
                        pbar.update(1)
                    t_wait += time.perf_counter() - t0
                    fill()
                if arrs:
                    t0 = time.perf_counter()
                    x = np.stack(arrs)  # (B, 3, H, W) float32, or (B, H, W, 3) uint8
                    if overlap:
                        run_batch.submit(x, idx)  # waits only while every request is busy
                        for tag, out in run_batch.finished():
                            done(tag, out)
                    else:
                        done(idx, run_batch(x))
                    t_compute += time.perf_counter() - t0
                    idx, arrs = [], []
        finally:
            if overlap:  # the batches still in flight: wait, and keep them even on Ctrl-C
                t0 = time.perf_counter()
                for tag, out in run_batch.finished(wait=True):
                    done(tag, out)
                t_compute += time.perf_counter() - t0
    return failures, {"decode_wait_s": round(t_wait, 3), "compute_s": round(t_compute, 3)}
