"""The feature store: bottlenecks of any number of photos as Parquet shards, read back streamed.

Layout (the same identity rule as the bottleneck cache, retrain.cache: one folder per backbone
fingerprint, so other weights, export code, preprocessing or precision start a new one):

    STORE/<backbone>-<fingerprint>[-<precision>]/_meta.json     what produced it
    STORE/<backbone>-<fingerprint>[-<precision>]/*.parquet      rows: key, path, label, features, error

Columns: key fixed_size_binary(16) (BLAKE2b-128 of the file's bytes, as the cache), path and label
strings, features fixed_size_list<float16|float32>[C] (null where the photo could not be read),
error string (null where it could). Every data page carries a CRC (Parquet page checksums),
verified whenever it is read; a shard whose footer or pages cannot be read is damaged: it is
deleted (only shards of this store, never anything else) and its photos are recomputed by the
next `retrain embed`. Shards are written whole: a temporary name, then a rename (on an object
store such as s3:// a PUT is atomic by itself). Readers never hold more than one row group.

STORE may be a local folder or any URI pyarrow's file systems reach (s3://bucket/x where
pyarrow has S3 support and credentials, a shared mount as a plain path). The schema, rows as a
table and the file-system access are in retrain.store_format.
"""

from __future__ import annotations

import json
import os
import time
import uuid

import numpy as np

from retrain.errors import ConfigError, DataError
from retrain.store_format import WRITE_OPTIONS, filesystem, read_json, rows_table, schema, write_bytes

STORE_SCHEMA = 1
ROWS_PER_FILE = 65_536  # rows a writer collects before it writes a shard (~170 MB of float16 at 1280)
FLUSH_SECONDS = 30.0  # and at least this often: what a kill -9 of `retrain embed` can lose
ROW_GROUP_ROWS = 8192  # rows per row group: the unit a streamed reader holds in memory
DTYPES = ("float16", "float32")


def folder_name(backbone, precision: str) -> str:
    suffix = "" if precision == "fp32" else f"-{precision}"
    return f"{backbone.name}-{backbone.fingerprint(precision)}{suffix}"


def store_meta(backbone, precision: str, dtype: str) -> dict:
    return {"schema": STORE_SCHEMA, "format": "parquet", "backbone": backbone.name, "precision": precision,
            "fingerprint": backbone.fingerprint(precision), "preprocessing": backbone.preprocessing(),
            "weights_sha256": backbone.sha256, "dtype": dtype, "dim": backbone.feature_dim}


class FeatureStore:
    """One fingerprint folder of a store: its shards, what is in them, writing and streamed reading.

    FeatureStore.create(STORE, backbone, precision=, dtype=) opens (or makes) the folder of that
    backbone for writing; FeatureStore.open(STORE) opens an existing folder for reading (STORE
    itself, or the only fingerprint folder inside it, or the one of `backbone`).
    """

    def __init__(self, fs, path: str, meta: dict, *, log=None):
        self.fs, self.path, self.meta = fs, path.rstrip("/"), meta
        self.dim, self.dtype = int(meta["dim"]), meta["dtype"]
        self.log = log or (lambda m: None)
        self.damaged: list[str] = []
        self._files: list | None = None  # [(path, rows)] of the shards that passed the check

    @property
    def local(self) -> bool:
        import pyarrow.fs as pafs

        return isinstance(self.fs, pafs.LocalFileSystem)

    def where(self) -> str:
        return self.path if self.local else f"{self.fs.type_name}://{self.path}"

    # ---------------------------------------------------------------- opening
    @classmethod
    def create(cls, location, backbone, *, precision: str = "fp32", dtype: str = "float16", log=None):
        if dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
        fs, root = filesystem(location)
        _check_not_a_file(fs, root, location)
        path = f"{root.rstrip('/')}/{folder_name(backbone, precision)}"
        meta = store_meta(backbone, precision, dtype)
        try:
            fs.create_dir(path, recursive=True)
            old = read_json(fs, f"{path}/_meta.json")
            if old is None:
                write_bytes(fs, f"{path}/_meta.json", json.dumps(meta, indent=1, sort_keys=True).encode())
            elif old != meta:
                if old.get("dtype") != dtype and {k: v for k, v in old.items() if k != "dtype"} == \
                        {k: v for k, v in meta.items() if k != "dtype"}:
                    raise ConfigError(f"the feature store {location} holds {old.get('dtype')} features of this "
                                      f"backbone: pass --dtype {old.get('dtype')}, or another --out")
                raise ConfigError(f"the feature store folder {path} was made differently ({_diff(old, meta)}): "
                                  "give another --out (retrain never deletes a store it did not make this way)")
        except OSError as e:
            raise ConfigError(f"the feature store {location} cannot be written ({e}): give a writable --out") from None
        return cls(fs, path, meta, log=log)

    @classmethod
    def open(cls, location, backbone=None, *, precision: str | None = None, log=None):
        fs, root = filesystem(location)
        import pyarrow.fs as pafs

        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"feature store not found: {location} (make one with retrain embed DIR --out {location})")
        if info.type != pafs.FileType.Directory:
            raise DataError(f"{location} is a file, not a feature store folder (made by retrain embed)")
        meta = read_json(fs, f"{root}/_meta.json")
        if meta is not None:
            return cls(fs, root, meta, log=log)
        found = []
        for sub in fs.get_file_info(pafs.FileSelector(root)):
            if sub.type == pafs.FileType.Directory:
                m = read_json(fs, f"{sub.path}/_meta.json")
                if m is not None and m.get("format") == "parquet":
                    found.append((sub.path, m))
        if backbone is not None and len(found) > 1:
            want = [(p, m) for p, m in found if m.get("backbone") == backbone.name
                    and (precision is None or m.get("precision") == precision)]
            found = want or found
        if not found:
            raise DataError(f"{location} holds no feature store (no _meta.json): make one with "
                            f"retrain embed DIR --out {location}")
        if len(found) > 1:
            names = ", ".join(sorted(os.path.basename(p) for p, _ in found))
            raise DataError(f"{location} holds several feature stores ({names}): give the folder of one of them")
        return cls(fs, found[0][0], found[0][1], log=log)

    # ---------------------------------------------------------------- the shards
    def shard_paths(self) -> list[str]:
        import pyarrow.fs as pafs

        out = []
        for f in self.fs.get_file_info(pafs.FileSelector(self.path)):
            name = f.base_name
            if f.type == pafs.FileType.File and name.endswith(".parquet") and not name.startswith("."):
                out.append(f.path)
        return sorted(out)

    def files(self) -> list[tuple[str, int]]:
        """[(shard path, rows)] of every shard whose footer and schema are whole; the others are
        damaged: deleted (they are this store's own files) and their photos recomputed."""
        if self._files is None:
            import pyarrow.parquet as pq

            want = schema(self.dim, self.dtype)
            good = []
            for p in self.shard_paths():
                try:
                    with self.fs.open_input_file(p) as fh:
                        md = pq.ParquetFile(fh).metadata
                        ok = md.schema.to_arrow_schema().remove_metadata().equals(want)
                        rows = md.num_rows
                except FileNotFoundError:
                    continue  # compacted meanwhile by another process
                except Exception:  # noqa: BLE001 - a truncated footer, not Parquet at all: damaged
                    ok = False
                if ok:
                    good.append((p, rows))
                else:
                    self._damaged(p, "cannot be read (truncated or not Parquet)")
            self._files = good
        return self._files

    def _damaged(self, p: str, why: str) -> None:
        self.damaged.append(p)
        self.log(f"feature store shard {os.path.basename(p)} {why}: deleted, its photos will be recomputed")
        try:
            self.fs.delete_file(p)
        except OSError:
            pass

    def refresh(self) -> None:
        self._files = None

    def __len__(self) -> int:
        return sum(r for _, r in self.files())

    def _parquet(self, p: str, fh):
        import pyarrow.parquet as pq

        return pq.ParquetFile(fh, page_checksum_verification=True, memory_map=False)

    def row_groups(self) -> list[tuple[str, int, int]]:
        """(shard path, row group, rows) of every row group of the store."""
        out = []
        for p, _rows in self.files():
            try:
                with self.fs.open_input_file(p) as fh:
                    md = self._parquet(p, fh).metadata
            except FileNotFoundError:
                continue
            out += [(p, g, md.row_group(g).num_rows) for g in range(md.num_row_groups)]
        return out

    def read_group(self, p: str, g: int, columns=None):
        """One row group as a pyarrow table, its page checksums verified. A damaged one is
        deleted with its shard and raised as a DataError that says to run embed again."""
        try:
            with self.fs.open_input_file(p) as fh:
                return self._parquet(p, fh).read_row_group(g, columns=columns)
        except FileNotFoundError:
            raise DataError(f"feature store shard {p} vanished while it was read (another process compacted "
                            "the store?): run the command again") from None
        except OSError as e:  # a page fails its CRC, or the file was cut
            self._damaged(p, f"is damaged ({str(e).splitlines()[0][:120]})")
            raise DataError(f"feature store shard {p} was damaged and has been deleted: run retrain "
                            "embed again to recompute its photos, then this command") from None

    def iter_tables(self, columns=None, *, shuffle_seed: int | None = None, with_errors: bool = False):
        """The store as pyarrow tables of one row group each (memory: one row group), checksums
        verified. Rows with an error (no features) are left out unless with_errors.
        shuffle_seed: row groups in a seeded random order (for mini-batch training)."""
        import pyarrow.compute as pc

        groups = self.row_groups()
        if shuffle_seed is not None:
            order = np.random.default_rng(shuffle_seed).permutation(len(groups))
            groups = [groups[i] for i in order]
        cols = None if columns is None else list(dict.fromkeys(list(columns) + ([] if with_errors else ["error"])))
        for p, g, _n in groups:
            t = self.read_group(p, g, cols)
            if not with_errors:
                t = t.filter(pc.is_null(t.column("error")))
                if columns is not None and "error" not in columns:
                    t = t.drop_columns(["error"])
            yield t

    def features_of(self, table) -> np.ndarray:
        """(n, dim) numpy array (the store's dtype) of a table's features column, without a copy."""
        col = table.column("features").combine_chunks()
        flat = col.values.to_numpy(zero_copy_only=False)
        return flat.reshape(len(col), self.dim)

    def column(self, name: str, *, with_errors: bool = True) -> list:
        """One column (not features) of every row as a Python list: for keys and paths."""
        out = []
        for t in self.iter_tables([name], with_errors=with_errors):
            out += t.column(name).to_pylist()
        return out

    def done(self) -> set:
        """(key, path) of every row already in the store (rows with an error included: a photo
        that could not be read is not tried again)."""
        out = set()
        for t in self.iter_tables(["key", "path"], with_errors=True):
            out.update(zip(t.column("key").to_pylist(), t.column("path").to_pylist()))
        return out

    def done_paths(self) -> set:
        """Paths already in the store (the distributed embed skips by path: its keys are only
        known once a worker has read the file)."""
        out = set()
        for t in self.iter_tables(["path"], with_errors=True):
            out.update(t.column("path").to_pylist())
        return out

    def label_counts(self) -> dict[str, int]:
        from collections import Counter

        c = Counter()
        for t in self.iter_tables(["label"]):
            c.update(t.column("label").to_pylist())
        return dict(sorted(c.items()))

    def read_all(self):
        """(keys, paths, labels, features (n, dim) float32, errors) of every row: only for
        stores that fit in memory (the caller checks with len() first)."""
        keys, paths, labels, errors, feats = [], [], [], [], []
        for t in self.iter_tables(with_errors=True):
            keys += t.column("key").to_pylist()
            paths += t.column("path").to_pylist()
            labels += t.column("label").to_pylist()
            errors += t.column("error").to_pylist()
            f = t.column("features").combine_chunks()
            arr = np.full((len(t), self.dim), np.nan, np.float32)
            ok = np.asarray(f.is_valid())
            if ok.any():
                arr[ok] = f.filter(f.is_valid()).values.to_numpy(zero_copy_only=False).reshape(-1, self.dim)
            feats.append(arr)
        X = np.concatenate(feats) if feats else np.zeros((0, self.dim), np.float32)
        return keys, paths, labels, X, errors

    # ---------------------------------------------------------------- writing
    def write_table(self, table) -> str:
        """Write one shard whole (a temporary name, then a rename where the file system has one)."""
        import pyarrow.parquet as pq

        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        final = f"{self.path}/{name}"
        target = f"{self.path}/.tmp-{name}" if self.local else final
        try:
            with self.fs.open_output_stream(target) as out:
                pq.write_table(table, out, row_group_size=ROW_GROUP_ROWS, **WRITE_OPTIONS)
            if target != final:
                self.fs.move(target, final)
        except OSError as e:
            try:
                self.fs.delete_file(target)
            except OSError:
                pass
            raise ConfigError(f"the feature store {self.where()} cannot be written ({e}): free space or "
                              "give another --out") from None
        if self._files is not None:
            self._files.append((final, len(table)))
        return final

    def writer(self, **kw) -> "StoreWriter":
        return StoreWriter(self, **kw)

    def table(self, keys, paths, labels, feats, errors=None):
        """A pyarrow table of rows in this store's schema; feats (n, dim) with NaN rows -> null."""
        return rows_table(self.dim, self.dtype, keys, paths, labels, feats, errors)

    def compact(self, *, target_rows: int = ROWS_PER_FILE * 4) -> int:
        """Merge shards smaller than target_rows/4 into shards of about target_rows (streamed: one
        row group in memory at a time), each written before the ones it replaces are deleted.
        Returns the number of shards removed."""
        import pyarrow.parquet as pq

        small = [(p, r) for p, r in self.files() if r < target_rows // 4]
        if len(small) < 2:
            return 0
        removed = 0
        batch: list = []
        rows = 0

        def merge(group):
            nonlocal removed
            name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
            final = f"{self.path}/{name}"
            target = f"{self.path}/.tmp-{name}" if self.local else final
            with self.fs.open_output_stream(target) as out, \
                    pq.ParquetWriter(out, schema(self.dim, self.dtype), **WRITE_OPTIONS) as w:
                for p, _ in group:
                    with self.fs.open_input_file(p) as fh:
                        pf = self._parquet(p, fh)
                        for g in range(pf.metadata.num_row_groups):
                            w.write_table(pf.read_row_group(g), row_group_size=ROW_GROUP_ROWS)
            if target != final:
                self.fs.move(target, final)
            for p, _ in group:
                self.fs.delete_file(p)
                removed += 1

        for p, r in small:
            batch.append((p, r))
            rows += r
            if rows >= target_rows:
                merge(batch)
                batch, rows = [], 0
        if len(batch) > 1:
            merge(batch)
        self._files = None
        return removed


class StoreWriter:
    """Rows collected in memory and written as one shard every ROWS_PER_FILE rows or FLUSH_SECONDS
    (and at close(), whatever stopped the work: use it in a with block)."""

    def __init__(self, store: FeatureStore, *, rows_per_file: int = ROWS_PER_FILE,
                 flush_seconds: float = FLUSH_SECONDS):
        self.store, self.rows_per_file, self.flush_seconds = store, rows_per_file, flush_seconds
        self._rows: list = []  # (key, path, label, feats row or None, error)
        self._feats: list = []
        self._t = time.monotonic()
        self.written = 0

    def add(self, keys, paths, labels, feats, errors=None) -> None:
        n = len(keys)
        errors = list(errors) if errors is not None else [None] * n
        self._rows += list(zip(keys, paths, labels, errors))
        self._feats.append(np.asarray(feats, np.float32).reshape(n, self.store.dim))
        if sum(len(f) for f in self._feats) >= self.rows_per_file or \
                time.monotonic() - self._t >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self._rows:
            k, p, lab, e = zip(*self._rows)
            self.store.write_table(self.store.table(k, p, lab, np.concatenate(self._feats), e))
            self.written += len(self._rows)
            self._rows, self._feats = [], []
        self._t = time.monotonic()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.flush()


# -------------------------------------------------------------------------------- helpers

def _check_not_a_file(fs, root: str, location) -> None:
    import pyarrow.fs as pafs

    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise ConfigError(f"--out {location} is a file: give a folder for the feature store")


def _diff(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(f"{k} {old.get(k)!r} here, {new.get(k)!r} now" for k in keys[:3])
