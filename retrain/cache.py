"""The bottleneck cache: each image's frozen features on disk, keyed by what produced them.

Layout (one folder per backbone fingerprint, so weights, export code or preprocessing changes
start a new one; the folder name is retrain.store.folder_name, as a feature store's):

    <cache_dir>/<backbone>-<fingerprint>[-<precision>]/meta.json          what produced it
    <cache_dir>/<backbone>-<fingerprint>[-<precision>]/shard-*.parquet    rows of the feature
                                                                          store's format

A shard is a Parquet file of the feature store's schema and write options (retrain.store_format,
the one home of the format): key (16 bytes), path and label (null here: the cache is keyed by a
file's bytes, not by where it lies or what it shows), features fixed_size_list<float32>[C]
(float16 for fine-tuning activations), error. Every data page carries a CRC (for the store's
readers), and the file's key-value metadata a BLAKE2b-256 of each row group's keys and features
(store_format.table_digest): loading checks those, which covers every byte the CRCs would.
Features are stored uncompressed, in row groups of about GROUP_BYTES, read memory-mapped by a
few threads at once.

Shards are written atomically (a temporary file, then a rename), about one a second while
features are computed and once more when extraction stops for any reason (Ctrl-C included), so
kill -9 loses at most about the last second of work (the features added since the last shard,
plus the batches still in the engine). A shard that fails a checksum or cannot be read is
deleted and its images are recomputed. Many small shards are compacted into one on the next run.

Several processes may share one cache folder (two `retrain fit` at once): each writes its own
shards, and compaction deletes only the shards the compacting process itself loaded or wrote,
after their features are safely in the merged shard, never one written meanwhile by another.
A cache folder that is full, read-only or not a folder is a ConfigError saying so.

Older caches (meta.json schema 1) hold shard-*.npz files (keys (n,16) uint8, feats (n,C),
check = BLAKE2b of both): on loading, the ones that pass their check are written as one Parquet
shard and deleted once it is on disk, with one line saying so; damaged ones are deleted and
their images recomputed.

A cache folder is not a feature store for `retrain fit --features`: it has no paths or labels
(those come from the photo folder, and `retrain fit DIR` reads the cache without recomputing).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrain.errors import ConfigError
from retrain.files import cache_root, write_text_atomic
from retrain.store import ROW_GROUP_ROWS, folder_name
from retrain.store_format import (
    DIGEST_KEY,
    WRITE_OPTIONS,
    arrays_digest,
    key_and_feature_arrays,
    rows_table,
    schema,
    table_digest,
)

if TYPE_CHECKING:
    from retrain.architectures import Backbone

CACHE_SCHEMA = 2  # 1: shard-*.npz (migrated when loaded), 2: shard-*.parquet
COMPACT_OVER = 16  # shards
SHARD_SECONDS = 1.0  # write computed features at least this often (what kill -9 can lose)
SHARDS = ("shard-*.parquet", "shard-*.npz")  # this format's, and the one migrated from
GROUP_BYTES = 32 * 1024**2  # features per row group, about: each is read and checked by a thread of its own
READ_THREADS = 8


def default_cache_dir() -> Path:
    return cache_root() / "bottlenecks"


def _npz_checksum(keys: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """The check of a schema-1 .npz shard: BLAKE2b-256 of its keys and features."""
    h = hashlib.blake2b(keys.tobytes(), digest_size=32)
    h.update(feats.tobytes())
    return np.frombuffer(h.digest(), dtype=np.uint8)


def key_of(digest_hex: str, variant: str = "") -> bytes:
    """16-byte cache key: the file digest, or for a distorted view, a hash of digest + view."""
    if not variant:
        return bytes.fromhex(digest_hex)
    return hashlib.blake2b((digest_hex + "|" + variant).encode(), digest_size=16).digest()


class _Vanished(Exception):
    """A shard that was there when the folder was listed is gone: another process merged it."""


def _raise_vanished():
    raise _Vanished


class BottleneckCache:
    """Features keyed by 16-byte keys, held in memory as a few contiguous arrays."""

    def __init__(self, cache_dir, backbone: Backbone, *, precision: str = "fp32", dtype: str = "float32",
                 log=None):
        self.backbone = backbone
        self.precision = precision
        self.dtype = np.dtype(dtype)
        self.dim = backbone.feature_dim
        self.root = Path(cache_dir).expanduser()
        self.folder = self.root / folder_name(backbone, precision)
        self.log = log or (lambda m: None)
        self.meta = {"schema": CACHE_SCHEMA, "format": "parquet", "backbone": backbone.name, "precision": precision,
                     "fingerprint": backbone.fingerprint(precision), "preprocessing": backbone.preprocessing(),
                     "weights_sha256": backbone.sha256, "dtype": self.dtype.name, "dim": self.dim}
        self._schema = schema(self.dim, self.dtype.name)
        # rows per row group: at most the store's, and about GROUP_BYTES of features (read in parallel)
        self.group_rows = max(1, min(ROW_GROUP_ROWS, GROUP_BYTES // (self.dim * self.dtype.itemsize)))
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
        older = {k: v for k, v in self.meta.items() if k != "format"} | {"schema": 1}  # the .npz format's
        if isinstance(old, dict) and old != older:
            self.log(f"bottleneck cache {self.folder} was made differently: starting it afresh")
            for pattern in SHARDS:
                for p in self.folder.glob(pattern):
                    p.unlink(missing_ok=True)
        write_text_atomic(meta_path, json.dumps(self.meta, indent=1, sort_keys=True))

    def _shards(self) -> set[Path]:
        return {p for pattern in SHARDS for p in self.folder.glob(pattern)}

    def _load(self) -> None:
        # A process killed mid-write leaves a .tmp- file, never a shard: clear old ones.
        for p in self.folder.glob(".tmp-*"):
            try:
                if time.time() - p.stat().st_mtime > 3600:
                    p.unlink()
            except OSError:
                pass
        seen: set[Path] = set()
        npz: list[tuple[Path, np.ndarray, np.ndarray]] = []  # older shards to write as Parquet
        pool = ThreadPoolExecutor(max_workers=max(1, min(READ_THREADS, os.cpu_count() or 1)))
        try:
            for _ in range(8):  # again only where a shard vanished: another process compacted it meanwhile
                vanished = False
                todo = sorted(self._shards() - seen)
                seen.update(todo)
                reads = [(p, self._read_npz_later(pool, p) if p.suffix == ".npz" else self._read_later(pool, p))
                         for p in todo]
                for p, result in reads:
                    try:
                        pieces = result()
                    except _Vanished:  # merged into a newer shard by another process: read that
                        vanished = True
                        continue
                    if pieces is None:
                        self.damaged += 1
                        self.log(f"bottleneck cache shard {p.name} is damaged: recomputing its images")
                        try:
                            p.unlink(missing_ok=True)
                        except OSError:
                            pass
                        continue
                    for keys, feats in pieces:
                        self._add_array(keys, feats)
                    if p.suffix == ".npz":
                        npz.append((p, *pieces[0]))
                    else:
                        self._mine.add(p)
                if not vanished:
                    break
        finally:  # (on Ctrl-C too: row groups not started yet are not read)
            pool.shutdown(cancel_futures=True)
        if npz:
            self._migrate(npz)
        if len(self._mine) > COMPACT_OVER:
            self.compact()

    def _read_later(self, pool, p: Path):
        """Start reading a Parquet shard (its row groups in `pool`); returns a callable giving
        [(keys, features)] (views of what was read, no copy), or None where the shard is
        damaged: a footer that cannot be read, another schema, a row group that cannot be
        decoded or does not match its BLAKE2b. Raises _Vanished where it is gone."""
        import pyarrow.parquet as pq

        try:
            with pq.ParquetFile(p, memory_map=True) as pf:
                ok = pf.schema_arrow.remove_metadata().equals(self._schema)
                digests = (pf.metadata.metadata or {}).get(DIGEST_KEY, b"").decode().split(",")
                ok = ok and len(digests) == pf.metadata.num_row_groups
        except FileNotFoundError:
            return _raise_vanished
        except Exception:  # noqa: BLE001 - a cut footer, not Parquet at all: damaged
            return _raise_vanished if not p.exists() else (lambda: None)
        if not ok:
            return lambda: None
        groups = [pool.submit(self._read_group, p, g, d) for g, d in enumerate(digests)]

        def result():
            pieces = []
            for f in groups:
                got = f.result()  # raises _Vanished
                if got is None:
                    for rest in groups:
                        rest.cancel()
                    return None
                pieces.append(got)
            return pieces

        return result

    def _read_group(self, p: Path, g: int, digest: str):
        """(keys, features) of the rows of one row group that have features, or None where it
        cannot be decoded or does not match its digest. (The digest covers every byte that
        matters, so the page CRCs, there for the store's readers, are not checked again.)"""
        import pyarrow.parquet as pq

        try:
            with pq.ParquetFile(p, memory_map=True) as pf:
                table = pf.read_row_group(g, columns=["key", "features"])
            keys, parts = key_and_feature_arrays(table, self.dim)
            if arrays_digest(keys, parts).hex() != digest:
                return None
        except FileNotFoundError:
            raise _Vanished from None
        except Exception:  # noqa: BLE001 - a page that cannot be decoded
            if not p.exists():
                raise _Vanished from None
            return None
        feats = np.concatenate([f for _r, f, _v in parts]) if len(parts) != 1 else parts[0][1]
        valid = np.concatenate([v for _r, _f, v in parts]) if len(parts) != 1 else parts[0][2]
        return (keys, feats) if valid.all() else (keys[valid], feats[valid])  # rows with no features: left out

    def _read_npz_later(self, pool, p: Path):
        f = pool.submit(self._read_npz, p)
        return f.result

    def _read_npz(self, p: Path):
        """[(keys, features)] of a schema-1 shard, or None where it fails its check."""
        try:
            with np.load(p, allow_pickle=False) as z:
                keys, feats, check = z["keys"], z["feats"], z["check"]
            ok = (keys.ndim == 2 and keys.shape[1] == 16 and feats.shape == (len(keys), self.dim)
                  and feats.dtype == self.dtype and np.array_equal(check, _npz_checksum(keys, feats))
                  and np.isfinite(feats).all())
        except FileNotFoundError:
            raise _Vanished from None
        except Exception:  # noqa: BLE001 - truncated zip, bad header, missing array: all mean "damaged"
            ok = False
        return [(keys, feats)] if ok else None

    def _migrate(self, npz: list) -> None:
        """Write the features of the .npz shards that passed their check as one Parquet shard,
        then delete them (only once it is on disk)."""
        keys = np.concatenate([k for _p, k, _f in npz])
        self._write_shard(keys, np.concatenate([f for _p, _k, f in npz]))
        for p, _k, _f in npz:
            try:
                p.unlink(missing_ok=True)
            except OSError as e:
                raise self._error(e) from None
        n = len(npz)
        self.log(f"Bottleneck cache: migrated {n} .npz shard{'s' if n != 1 else ''} ({len(keys):,} features) "
                 f"to Parquet in {self.folder}")

    def _add_array(self, keys: np.ndarray, feats: np.ndarray) -> None:
        a = len(self._arrays)
        self._arrays.append(feats)
        for r, k in enumerate(keys):
            self._index[k.tobytes()] = (a, r)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    def get(self, keys: list[bytes], out: np.ndarray | None = None, rows=None) -> np.ndarray:
        """(n, C) features (the cache's dtype) for keys that are all present; into out[rows]
        (rows: one index of `out` per key, default 0..n-1) where `out` is given, with no copy
        between (fine-tuning's activations are GBs: a fresh array is time on a VM)."""
        if out is None:
            out = np.empty((len(keys), self.dim), self.dtype)
        rows = range(len(keys)) if rows is None else rows
        for i, k in zip(rows, keys):
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
        """Write one shard of these rows atomically (see _write_table)."""
        return self._write_table(rows_table(self.dim, self.dtype.name, keys, None, None, feats))

    def _write_table(self, table) -> Path:
        """Write a table of the store's schema as one shard, atomically (a temporary file, then a
        rename), a digest per row group; on any failure (a full disk) the temporary file is removed
        and nothing already there is touched."""
        import pyarrow.parquet as pq

        rows = self.group_rows
        table = table.replace_schema_metadata({DIGEST_KEY: ",".join(
            table_digest(table.slice(r, rows), self.dim).hex() for r in range(0, len(table), rows))})
        path = self.folder / f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix=".parquet")
            with os.fdopen(fd, "wb") as fh:
                pq.write_table(table, fh, row_group_size=rows, **WRITE_OPTIONS)
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
        return len(self._shards())

    def compact_if_needed(self) -> None:
        """Compact after damage was found, or once there are more than COMPACT_OVER shards."""
        if self.damaged or self.shard_count() > COMPACT_OVER:
            self.compact()

    def compact(self) -> None:
        """Merge the shards this instance loaded or wrote into one, written before they are
        removed. Shards another process wrote since are left alone (they are not in memory here).
        The merged shard is written from the arrays in memory as they are, not from a copy of
        them all (fine-tuning's activations are GBs: fresh memory is time on a VM)."""
        import pyarrow as pa

        self.flush()
        old = sorted(self._mine)
        if len(old) <= 1:
            return
        tables = self._tables()
        merged = (self._write_table(pa.concat_tables(tables)) if tables
                  else self._write_shard(np.zeros((0, 16), np.uint8), np.zeros((0, self.dim), self.dtype)))
        for p in old:
            try:
                p.unlink(missing_ok=True)
            except OSError as e:
                raise self._error(e) from None
        self._mine = {merged}

    def _tables(self) -> list:
        """Every key once, as tables of the store's schema, one per array in memory: its rows that
        the index points at (a key stored twice points at its latest row), the array itself
        where that is all of them."""
        keys_of: list[list[bytes]] = [[] for _ in self._arrays]
        rows_of: list[list[int]] = [[] for _ in self._arrays]
        for k, (a, r) in self._index.items():
            keys_of[a].append(k)
            rows_of[a].append(r)
        tables = []
        for feats, keys, rows in zip(self._arrays, keys_of, rows_of):
            if not rows:
                continue
            rows = np.asarray(rows)
            whole = len(rows) == len(feats) and bool((rows == np.arange(len(feats))).all())
            k = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 16)
            tables.append(rows_table(self.dim, self.dtype.name, k, None, None, feats if whole else feats[rows]))
        return tables


def missing(keys: list[bytes], cache) -> list[int]:
    """Indices to compute: the first occurrence of each key not in the cache (identical files
    and views are computed once)."""
    first: dict[bytes, int] = {}
    for j, k in enumerate(keys):
        if k not in cache:
            first.setdefault(k, j)
    return list(first.values())
