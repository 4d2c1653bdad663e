"""retrain.pipeline.run_pipeline: photos decoded in threads while an engine runs the batches before.

Real files decoded by retrain.images; the engines are small real classes (a callable, one that
takes uint8, one with submit/finished that keeps several batches in flight on its own threads).
Each photo is a flat grey of value i, so an output tells which photo it came from.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from retrain import images
from retrain.pipeline import run_pipeline


def greys(folder, n):
    """n real PNG files, photo i a flat grey of value 3 * i (0..255)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"g{i:03d}.png"
        Image.new("RGB", (10, 7), (3 * i,) * 3).save(p)
        paths.append(p)
    return paths


def load(path):
    return images.load(str(path), (4, 4), 0.875)


def first_pixel(x):
    """An engine: the first pixel of each (normalised) image."""
    return x[:, 0, 0, 0].astype(np.float64)


class Collect:
    def __init__(self):
        self.batches = []

    def __call__(self, idx, out):
        self.batches.append((list(idx), np.asarray(out).copy()))

    @property
    def order(self):
        return [i for idx, _ in self.batches for i in idx]

    def by_index(self):
        return {i: float(v) for idx, out in self.batches for i, v in zip(idx, out)}


def test_batches_come_back_in_order_normalised(tmp_path):
    paths = greys(tmp_path, 21)

    def slow_first(path):  # the first photos take longest: decoding finishes out of order
        time.sleep(0.02 if path.name < "g004" else 0.0)
        return load(path)

    got = Collect()
    failures, timing = run_pipeline(paths, slow_first, first_pixel, batch_size=4, workers=3, mean=127.0,
                                    std=128.0, on_batch=got, quiet=True)
    assert failures == {}
    assert [len(idx) for idx, _ in got.batches] == [4, 4, 4, 4, 4, 1]
    assert got.order == list(range(21))
    # Photo i is grey 3i, normalised (3i - 127) / 128: photo 0 -> -0.9921875, photo 20 -> -0.5234375.
    v = got.by_index()
    assert v[0] == pytest.approx(-0.9921875) and v[20] == pytest.approx(-0.5234375)
    assert all(v[i] == pytest.approx((3 * i - 127) / 128) for i in range(21))
    assert set(timing) == {"decode_wait_s", "compute_s"}


def test_unreadable_files_are_reported_by_index_and_the_rest_run(tmp_path):
    paths = greys(tmp_path, 9)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not a picture")
    sources = paths[:2] + [tmp_path / "empty.jpg"] + paths[2:7] + [tmp_path / "text.png"] + paths[7:]
    got = Collect()
    failures, _ = run_pipeline(sources, load, first_pixel, batch_size=4, workers=2, on_batch=got, quiet=True)
    assert sorted(failures) == [2, 8]
    assert all(isinstance(r, str) and r and "empty.jpg" not in r and "text.png" not in r
               for r in failures.values())  # the reason, without the path (the caller has it)
    assert got.order == [0, 1, 3, 4, 5, 6, 7, 9, 10]
    v = got.by_index()
    assert v[3] == pytest.approx((3 * 2 - 127) / 128)  # source 3 is the third grey (grey 6)
    assert v[10] == pytest.approx((3 * 8 - 127) / 128)


def test_everything_unreadable_runs_nothing(tmp_path):
    bad = [tmp_path / f"b{i}.jpg" for i in range(5)]
    for p in bad:
        p.write_bytes(b"\xff\xd8\xff garbage")
    calls = []
    failures, _ = run_pipeline(bad, load, lambda x: calls.append(len(x)) or x[:, 0, 0, 0], batch_size=2,
                               workers=2, quiet=True)
    assert sorted(failures) == [0, 1, 2, 3, 4] and calls == []


def test_decoding_stays_bounded_and_parallel(tmp_path):
    """With a slow engine, decoding runs ahead by a few batches only (memory stays flat), and
    never more photos are decoded at once than there are workers."""
    paths = greys(tmp_path, 80)
    lock = threading.Lock()
    state = {"now": 0, "most": 0, "decoded": 0, "consumed": 0, "ahead": 0}

    def counting(path):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.005)
        try:
            return load(path)
        finally:
            with lock:
                state["now"] -= 1
                state["decoded"] += 1

    def slow_engine(x):
        with lock:
            state["consumed"] += len(x)
            state["ahead"] = max(state["ahead"], state["decoded"] - state["consumed"])
        time.sleep(0.02)
        return first_pixel(x)

    got = Collect()
    failures, _ = run_pipeline(paths, counting, slow_engine, batch_size=4, workers=3, on_batch=got, quiet=True)
    assert failures == {} and got.order == list(range(80))
    assert 2 <= state["most"] <= 3
    assert state["ahead"] <= 3 * 4  # three batches decoded ahead at most, not all 80


class AsyncEngine:
    """An engine with its own request queue, as OpenVINO's: `jobs` batches in flight on its own
    threads, submit() waits while all are busy, finished() gives (tag, output) as they finish (the
    later batches of this one finish first), finished(wait=True) all that are left."""

    takes_uint8 = False

    def __init__(self, batch=4, jobs=2):
        self.batch, self.jobs = batch, jobs
        self.pool = ThreadPoolExecutor(jobs)
        self.slots = threading.Semaphore(jobs)
        self.lock = threading.Lock()
        self.done, self.submitted = [], []
        self.in_flight = self.most_in_flight = 0
        self.sizes = []

    def _run(self, x, tag, delay):
        time.sleep(delay)
        with self.lock:
            self.done.append((tag, first_pixel(x)))
            self.in_flight -= 1
        self.slots.release()

    def submit(self, x, tag):
        assert len(x) <= self.batch
        self.slots.acquire()
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.submitted.append(list(tag))
            self.sizes.append(len(x))
        delay = 0.03 if len(self.submitted) % 2 else 0.0  # odd batches are slow: out-of-order finishes
        self.pool.submit(self._run, x.copy(), list(tag), delay)

    def finished(self, wait=False):
        if wait:
            for _ in range(self.jobs):
                self.slots.acquire()
            for _ in range(self.jobs):
                self.slots.release()
        with self.lock:
            out, self.done = self.done, []
        return out

    def __call__(self, x):  # never used when submit exists
        raise AssertionError("run_pipeline called the engine instead of submitting")


def test_an_async_engine_gets_its_batch_size_and_every_photo_once(tmp_path):
    paths = greys(tmp_path, 23)
    eng = AsyncEngine(batch=4, jobs=2)
    got = Collect()
    failures, _ = run_pipeline(paths, load, eng, batch_size=16, workers=2, on_batch=got, quiet=True)
    assert failures == {}
    assert eng.sizes == [4, 4, 4, 4, 4, 3]  # the engine's batch, not batch_size
    assert eng.most_in_flight <= 2
    assert sorted(got.order) == list(range(23))  # each photo exactly once, in whatever order
    v = got.by_index()
    assert all(v[i] == pytest.approx((3 * i - 127) / 128) for i in range(23))


def test_an_async_engine_keeps_the_batches_in_flight_on_ctrl_c(tmp_path):
    """Ctrl-C while photo 21 is decoded: the batches already in the engine are still delivered."""
    paths = greys(tmp_path, 40)
    eng = AsyncEngine(batch=4, jobs=3)
    got = Collect()

    def interrupted_at_21(path):
        if path.name == "g021.png":
            raise KeyboardInterrupt
        return load(path)

    with pytest.raises(KeyboardInterrupt):
        run_pipeline(paths, interrupted_at_21, eng, workers=2, on_batch=got, quiet=True)
    assert eng.submitted == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15], [16, 17, 18, 19]]
    assert sorted(got.order) == list(range(20))  # every batch started is kept, none after the press
    v = got.by_index()
    assert all(v[i] == pytest.approx((3 * i - 127) / 128) for i in range(20))


def test_a_uint8_engine_gets_the_decoded_pixels(tmp_path):
    paths = greys(tmp_path, 6)

    class Raw:
        takes_uint8 = True

        def __init__(self):
            self.shapes = []

        def __call__(self, x):
            self.shapes.append((x.shape, x.dtype))
            return x[:, 0, 0, 0].astype(np.float64)

    eng = Raw()
    got = Collect()
    run_pipeline(paths, load, eng, batch_size=4, workers=2, on_batch=got, quiet=True)
    assert eng.shapes == [((4, 4, 4, 3), np.uint8), ((2, 4, 4, 3), np.uint8)]  # (N, H, W, 3) as decoded
    assert got.by_index() == {i: 3.0 * i for i in range(6)}
