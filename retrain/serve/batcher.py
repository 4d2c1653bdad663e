"""`MicroBatcher`: concurrent requests' images share model calls.

Requests are decoded in a thread pool (off the event loop) and queued here; one asyncio task
hands whatever has arrived, up to max_batch images, to ONNX Runtime in a worker thread. On a
CPU that is one single-threaded call per core at once.
"""

from __future__ import annotations

import asyncio
import queue
from concurrent.futures import ThreadPoolExecutor


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
        """uint8 (H, W, 3) -> (probabilities (K,), novelty (a float, or None for a model without a
        novelty output), size of the batch it ran in)."""
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
            return clf.predict_with_novelty(x, tta=tta)
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
                    probs, novelty = await loop.run_in_executor(self._pool, self._predict, x, tta)
                except Exception as e:  # noqa: BLE001 - handed to every waiting request
                    for _, _, fut in group:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                self.batches += 1
                self.images += len(group)
                for j, ((_, _, fut), p) in enumerate(zip(group, probs)):
                    if not fut.done():
                        fut.set_result((p, None if novelty is None else float(novelty[j]), len(group)))
        finally:
            self._slots.release()
