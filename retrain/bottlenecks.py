"""Bottleneck cache and extraction: each image's frozen features, computed once.

Cache layout (one folder per backbone fingerprint, so weights, export code or preprocessing
changes start a new one):

    <cache_dir>/<backbone>-<fingerprint>/meta.json        what produced it
    <cache_dir>/<backbone>-<fingerprint>/shard-*.npz      keys (n,16) uint8, feats (n,C) float32
                                                          (float16 for fine-tuning activations),
                                                          check = BLAKE2b of both
Shards are written atomically, about one a second while features are computed and once more
when extraction stops for any reason (Ctrl-C included), so kill -9 loses at most about the
last second of work (the features added since the last shard, plus the batches still in the
engine). A shard that fails its checksum or cannot be read is deleted and its images are
recomputed. Many small shards are compacted into one on the next run.

Several processes may share one cache folder (two `retrain fit` at once): each writes its own
shards, and compaction deletes only the shards the compacting process itself loaded or wrote,
after their features are safely in the merged shard, never one written meanwhile by another.
A cache folder that is full, read-only or not a folder is a ConfigError saying so.

Extraction is a pipeline: worker threads decode and resize JPEGs (Pillow releases the GIL)
while the inference engine runs earlier batches (OpenVINO: several at once).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from retrain import images
from retrain.backbones import Backbone, cache_root
from retrain.errors import ConfigError, ImageError, MissingDependency
from retrain.progress import bar

CACHE_SCHEMA = 1
COMPACT_OVER = 16  # shards
SHARD_SECONDS = 1.0  # write computed features at least this often (what kill -9 can lose)


def default_cache_dir() -> Path:
    return cache_root() / "bottlenecks"


def _checksum(keys: np.ndarray, feats: np.ndarray) -> np.ndarray:
    h = hashlib.blake2b(keys.tobytes(), digest_size=32)
    h.update(feats.tobytes())
    return np.frombuffer(h.digest(), dtype=np.uint8)


def key_of(digest_hex: str, variant: str = "") -> bytes:
    """16-byte cache key: the file digest, or for a distorted view, a hash of digest + view."""
    if not variant:
        return bytes.fromhex(digest_hex)
    return hashlib.blake2b((digest_hex + "|" + variant).encode(), digest_size=16).digest()


class BottleneckCache:
    """Features keyed by 16-byte keys, held in memory as a few contiguous arrays."""

    def __init__(self, cache_dir, backbone: Backbone, *, precision: str = "fp32", dtype: str = "float32",
                 log=None):
        self.backbone = backbone
        self.precision = precision
        self.dtype = np.dtype(dtype)
        self.dim = backbone.feature_dim
        suffix = "" if precision == "fp32" else f"-{precision}"
        self.root = Path(cache_dir).expanduser()
        self.folder = self.root / f"{backbone.name}-{backbone.fingerprint(precision)}{suffix}"
        self.log = log or (lambda m: None)
        self.meta = {"schema": CACHE_SCHEMA, "backbone": backbone.name, "precision": precision,
                     "fingerprint": backbone.fingerprint(precision), "preprocessing": backbone.preprocessing(),
                     "weights_sha256": backbone.sha256, "dtype": self.dtype.name, "dim": self.dim}
        self._arrays: list[np.ndarray] = []
        self._index: dict[bytes, tuple[int, int]] = {}
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # added, not yet on disk
        self._mine: set[Path] = set()  # shards this instance loaded or wrote: all compact() may delete
        self._written_at = time.monotonic()
        self.damaged = 0
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._check_writable()
            self._check_meta()
        except OSError as e:
            raise self._error(e) from None
        self._load()

    def _error(self, e: OSError) -> ConfigError:
        """A system error on the cache folder as one line: what was found and what to do."""
        what = e.strerror or str(e)
        where = f"the bottleneck cache folder {self.root}"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return ConfigError(f"{where} is full ({what}): free space or pass --cache-dir elsewhere")
        if e.errno == errno.EROFS:
            return ConfigError(f"{where} is read-only ({what}): make it writable or pass --cache-dir elsewhere")
        if e.errno in (errno.EACCES, errno.EPERM):
            return ConfigError(f"{where} is not writable ({what}): make it writable or pass --cache-dir elsewhere")
        if e.errno in (errno.ENOTDIR, errno.EEXIST):
            p = self.folder
            while not p.exists() and p != p.parent:
                p = p.parent
            if p.exists() and not p.is_dir():
                return ConfigError(f"{where} cannot be made: {p} is a file, not a folder; pass --cache-dir a "
                                   "folder (or a path where one can be made)")
        return ConfigError(f"{where} cannot be written ({what}): pass --cache-dir elsewhere")

    def _check_writable(self) -> None:
        """Fail now, before any work, where the folder exists but nothing can be written to it."""
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-probe-")
        os.close(fd)
        os.unlink(tmp)

    def _check_meta(self) -> None:
        meta_path = self.folder / "meta.json"
        try:
            # meta.json is only ever replaced atomically, so a concurrent writer's is whole or absent;
            # one that cannot be read or parsed is rewritten, and never a reason to delete shards.
            old = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            old = None
        if old == self.meta:
            return
        if isinstance(old, dict):
            self.log(f"bottleneck cache {self.folder} was made differently: starting it afresh")
            for p in self.folder.glob("shard-*.npz"):
                p.unlink(missing_ok=True)
        self._atomic_write_text(meta_path, json.dumps(self.meta, indent=1, sort_keys=True))

    @staticmethod
    def _atomic_write_text(path: Path, text: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _load(self) -> None:
        # A process killed mid-write leaves a .tmp- file, never a shard: clear old ones.
        for p in self.folder.glob(".tmp-*"):
            try:
                if time.time() - p.stat().st_mtime > 3600:
                    p.unlink()
            except OSError:
                pass
        seen: set[Path] = set()
        for _ in range(8):  # again only where a shard vanished: another process compacted it meanwhile
            vanished = False
            for p in sorted(set(self.folder.glob("shard-*.npz")) - seen):
                seen.add(p)
                try:
                    with np.load(p, allow_pickle=False) as z:
                        keys, feats, check = z["keys"], z["feats"], z["check"]
                    ok = (keys.ndim == 2 and keys.shape[1] == 16 and feats.shape == (len(keys), self.dim)
                          and feats.dtype == self.dtype and np.array_equal(check, _checksum(keys, feats))
                          and np.isfinite(feats).all())
                except FileNotFoundError:  # merged into a newer shard by another process: read that
                    vanished = True
                    continue
                except Exception:  # truncated zip, bad header, missing array: all mean "damaged"
                    ok = False
                if not ok:
                    self.damaged += 1
                    self.log(f"bottleneck cache shard {p.name} is damaged: recomputing its images")
                    try:
                        p.unlink(missing_ok=True)
                    except OSError:
                        pass
                    continue
                self._add_array(keys, feats)
                self._mine.add(p)
            if not vanished:
                break
        if len(self._mine) > COMPACT_OVER:
            self.compact()

    def _add_array(self, keys: np.ndarray, feats: np.ndarray) -> None:
        a = len(self._arrays)
        self._arrays.append(feats)
        for r, k in enumerate(keys):
            self._index[k.tobytes()] = (a, r)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    def get(self, keys: list[bytes]) -> np.ndarray:
        """(n, C) features (the cache's dtype) for keys that are all present."""
        out = np.empty((len(keys), self.dim), self.dtype)
        for i, k in enumerate(keys):
            a, r = self._index[k]
            out[i] = self._arrays[a][r]
        return out

    def add(self, keys: list[bytes], feats: np.ndarray) -> None:
        """Store a batch: in memory now, on disk with the next shard (at most SHARD_SECONDS
        later, or at flush()). Fewer, larger files than one per batch, and less main-thread time."""
        if not keys:
            return
        k = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 16)
        f = np.array(feats, dtype=self.dtype)  # a copy: the caller may reuse its buffer
        self._add_array(k, f)
        self._pending.append((k, f))
        if time.monotonic() - self._written_at >= SHARD_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write what add() has collected as one shard (atomically)."""
        if self._pending:
            k = np.concatenate([p[0] for p in self._pending])
            f = np.concatenate([p[1] for p in self._pending])
            self._write_shard(k, f)
            self._pending = []
        self._written_at = time.monotonic()

    def _write_shard(self, keys: np.ndarray, feats: np.ndarray) -> Path:
        """Write one shard atomically (a temporary file, then a rename); on any failure (a full
        disk) the temporary file is removed and nothing already there is touched."""
        path = self.folder / f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.npz"
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix=".npz")
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, keys=keys, feats=feats, check=_checksum(keys, feats))
            os.replace(tmp, path)
        except OSError as e:
            raise self._error(e) from None
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
        self._mine.add(path)
        return path

    def shard_count(self) -> int:
        """Shards in the folder now (this process's and any other's)."""
        return len(list(self.folder.glob("shard-*.npz")))

    def compact(self) -> None:
        """Merge the shards this instance loaded or wrote into one, written before they are
        removed. Shards another process wrote since are left alone (they are not in memory here)."""
        self.flush()
        old = sorted(self._mine)
        if len(old) <= 1:
            return
        keys = list(self._index)
        k = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 16)
        f = self.get(keys)
        merged = self._write_shard(k, f)
        for p in old:
            try:
                p.unlink(missing_ok=True)
            except OSError as e:
                raise self._error(e) from None
        self._mine = {merged}
        self._arrays, self._index = [], {}
        self._add_array(k, f)


def missing(keys: list[bytes], cache) -> list[int]:
    """Indices to compute: the first occurrence of each key not in the cache (identical files
    and views are computed once)."""
    first: dict[bytes, int] = {}
    for j, k in enumerate(keys):
        if k not in cache:
            first.setdefault(k, j)
    return list(first.values())


_SESSIONS: dict = {}
_SESSIONS_LOCK = threading.Lock()


def choose_precision(asked: str, *, provider: str = "auto", fine_tune: bool = False) -> str:
    """The bottleneck precision to use: `asked`, or for "auto" the fastest that keeps accuracy.

    auto: bf16 on a CPU with native bf16 units (AMX / AVX-512 BF16) when OpenVINO is installed
    and no GPU provider is in use; fp32 otherwise, and always fp32 for --fine-tune (it trains
    in floating point from fp32 activations). int8 is never chosen automatically: its
    calibration photos are flowers, and photos of another kind should not pay for that.
    bf16 asked for where it cannot run is an error that says why.
    """
    from retrain.runtime import PROVIDERS, available_providers, cpu_has_bf16, gpu_visible, openvino_available

    gpu = provider in ("cuda", "tensorrt") or (
        provider == "auto" and gpu_visible() and PROVIDERS["cuda"] in available_providers())
    if asked == "auto":
        if fine_tune or gpu or not cpu_has_bf16() or not openvino_available():
            return "fp32"
        return "bf16"
    if asked == "bf16":
        if provider in ("cuda", "tensorrt"):
            raise ConfigError(f"--bottleneck-precision bf16 runs on the CPU (OpenVINO), not with --provider "
                              f"{provider}; use fp32 there")
        if not cpu_has_bf16():
            raise ConfigError("--bottleneck-precision bf16 needs a CPU with bf16 units (AMX or AVX-512 BF16), "
                              "which this one lacks; use fp32 or int8")
        if not openvino_available():
            raise MissingDependency("--bottleneck-precision bf16 runs on OpenVINO, which is not installed: "
                                    "pip install openvino, or use fp32")
    return asked


def feature_session(backbone: Backbone, *, provider: str = "auto", precision: str = "fp32", batch: int = 8,
                    log=print):
    """The (process-wide) session of a backbone's feature extractor: ONNX Runtime for fp32 and
    int8, OpenVINO for bf16 (it takes uint8 pixels and is compiled for batches of `batch`;
    see retrain.runtime.OpenVINOSession)."""
    from retrain.backbones import features_onnx
    from retrain.runtime import make_session, openvino_session

    key = (backbone.name, provider, precision, batch if precision == "bf16" else None)
    with _SESSIONS_LOCK:  # one build per key, also while a background thread is at it (train.fit)
        if key not in _SESSIONS:
            path = features_onnx(backbone, precision=precision, log=log)
            if precision == "bf16":
                _SESSIONS[key] = openvino_session(path, precision="bf16", size=backbone.image_size,
                                                  mean=backbone.mean, std=backbone.std, batch=batch)
            else:
                _SESSIONS[key] = make_session(path, provider=provider)
        return _SESSIONS[key]


def run_pipeline(sources: list, loader, session, *, batch_size: int = 8, workers: int | None = None,
                 mean=127.0, std=128.0, on_batch=None, desc="Bottlenecks", quiet=False):
    """Decode `sources` with `loader` in threads, run `session` on batches.

    Calls on_batch(indices, outputs) for each batch (in order, except with a session that has
    `submit`: then as batches finish) and returns ({index: reason} for images that could not be
    read, timing). Memory stays flat: at most a few batches are decoded ahead. Timing: seconds
    the main thread waited for decoding, and for the engine (to run a batch or to take one).
    """
    workers = workers or min(4, os.cpu_count() or 1)
    failures: dict[int, str] = {}
    input_name = session.get_inputs()[0].name
    t_wait = t_compute = 0.0
    raw = getattr(session, "takes_uint8", False)  # OpenVINO: normalised inside the model
    overlap = hasattr(session, "submit")  # several batches in flight (OpenVINO's request queue)
    if overlap:
        batch_size = session.batch  # the batch it was compiled for

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
        window = batch_size * (session.jobs + 2 if overlap else 3)  # decoded ahead: every request kept busy

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
                        session.submit(x, idx)  # waits only while every request is busy
                        for tag, out in session.finished():
                            done(tag, out)
                    else:
                        done(idx, session.run(None, {input_name: x})[0])
                    t_compute += time.perf_counter() - t0
                    idx, arrs = [], []
        finally:
            if overlap:  # the batches still in flight: wait, and keep them even on Ctrl-C
                t0 = time.perf_counter()
                for tag, out in session.finished(wait=True):
                    done(tag, out)
                t_compute += time.perf_counter() - t0
    return failures, {"decode_wait_s": round(t_wait, 3), "compute_s": round(t_compute, 3)}


def extract(items, backbone: Backbone, cache: BottleneckCache, *, provider: str = "auto",
            batch_size: int = 8, workers: int | None = None, quiet: bool = False, log=print):
    """Features for every item (cached or computed now).

    Returns (features (n, C) float32 with NaN rows for failures, {path: reason}, timing dict).
    """
    keys = [key_of(it.digest) for it in items]
    todo = missing(keys, cache)
    timing = {"cached": len(items) - len(todo), "computed": len(todo)}
    failures: dict[str, str] = {}
    if todo:
        session = feature_session(backbone, provider=provider, precision=cache.precision, batch=batch_size,
                                  log=log)
        size, crop = backbone.image_size, backbone.crop_fraction

        def loader(path):
            return images.load(path, size, crop)

        def on_batch(batch_idx, out):
            cache.add([keys[todo[j]] for j in batch_idx], out)

        t0 = time.perf_counter()
        try:
            fails, t = run_pipeline([items[i].path for i in todo], loader, session, batch_size=batch_size,
                                    workers=workers, mean=backbone.mean, std=backbone.std,
                                    on_batch=on_batch, quiet=quiet)
        finally:
            cache.flush()  # what was computed is kept, whatever stopped the run
        timing.update(t, seconds=round(time.perf_counter() - t0, 3))
        bad = {keys[todo[j]]: r for j, r in fails.items()}
        failures = {it.path: bad[k] for it, k in zip(items, keys) if k in bad}
        if cache.damaged or cache.shard_count() > COMPACT_OVER:
            cache.compact()
    feats = np.full((len(items), backbone.feature_dim), np.nan, np.float32)
    ok = [i for i, k in enumerate(keys) if k in cache]
    if ok:
        feats[ok] = cache.get([keys[i] for i in ok])
    return feats, failures, timing


def extract_views(items, views: int, distortions, backbone: Backbone, cache: BottleneckCache, *,
                  provider: str = "auto", batch_size: int = 32, workers: int | None = None,
                  quiet: bool = False, log=print):
    """Bottlenecks of `views` distorted views of each item (retrain.augment), cached like any other.

    Each view is keyed by key_of(digest, augment.variant(distortions, v)), so a view is computed
    once and reused by every later run with the same settings.
    Returns (features (n, views, C) float32 with NaN rows for failures, timing dict).
    """
    from retrain import augment

    pairs = [(i, v) for i in range(len(items)) for v in range(views)]
    keys = [key_of(items[i].digest, augment.variant(distortions, v)) for i, v in pairs]
    todo = missing(keys, cache)
    timing = {"cached": len(pairs) - len(todo), "computed": len(todo)}
    if todo:
        session = feature_session(backbone, provider=provider, precision=cache.precision, batch=batch_size,
                                  log=log)
        size, crop = backbone.image_size, backbone.crop_fraction

        def loader(j):
            i, v = pairs[j]
            return augment.load_view(items[i].path, items[i].digest, v, distortions, size, crop)

        def on_batch(batch_idx, out):
            cache.add([keys[todo[b]] for b in batch_idx], out)

        t0 = time.perf_counter()
        try:
            _fails, t = run_pipeline(todo, loader, session, batch_size=batch_size, workers=workers,
                                     mean=backbone.mean, std=backbone.std, on_batch=on_batch,
                                     desc="Distorted views", quiet=quiet)
        finally:
            cache.flush()
        timing.update(t, seconds=round(time.perf_counter() - t0, 3))
        if cache.shard_count() > COMPACT_OVER:
            cache.compact()
    feats = np.full((len(pairs), backbone.feature_dim), np.nan, np.float32)
    ok = [j for j, k in enumerate(keys) if k in cache]
    if ok:
        feats[ok] = cache.get([keys[j] for j in ok])
    return feats.reshape(len(items), views, backbone.feature_dim), timing
