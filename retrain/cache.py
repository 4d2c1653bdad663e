"""The bottleneck cache: each image's frozen features on disk, keyed by what produced them.

Layout (one folder per backbone fingerprint, so weights, export code or preprocessing changes
start a new one):

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
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrain.errors import ConfigError
from retrain.files import cache_root, write_text_atomic

if TYPE_CHECKING:
    from retrain.architectures import Backbone

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
        write_text_atomic(meta_path, json.dumps(self.meta, indent=1, sort_keys=True))

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

    def compact_if_needed(self) -> None:
        """Compact after damage was found, or once there are more than COMPACT_OVER shards."""
        if self.damaged or self.shard_count() > COMPACT_OVER:
            self.compact()

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
