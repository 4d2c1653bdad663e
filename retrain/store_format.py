"""The feature store's format (retrain.store), also the bottleneck cache's (retrain.cache): the
Parquet schema and write options, rows as an Arrow table, the digests a cache shard carries in
its key-value metadata, the key of a file, and the file systems it lives on (a local
folder or a URI pyarrow reaches) with small JSON files on them.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from retrain.errors import ConfigError


def _pa():
    try:
        import pyarrow as pa
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        from retrain.errors import MissingDependency

        raise MissingDependency("the feature store needs pyarrow: pip install pyarrow") from None
    return pa


# Features: uncompressed and without min/max statistics (nothing reads them; for float16 they
# took about 40% of the write time).
WRITE_OPTIONS = {"write_page_checksum": True, "use_dictionary": ["label", "error"],
                 "write_statistics": ["key", "path", "label", "error"],
                 "compression": {"key": "zstd", "path": "zstd", "label": "zstd", "error": "zstd", "features": "none"}}
# Key-value metadata of a cache shard: table_digest of each of its row groups, hex, comma-separated.
DIGEST_KEY = b"retrain.blake2b"


def schema(dim: int, dtype: str = "float16"):
    pa = _pa()
    return pa.schema([("key", pa.binary(16)), ("path", pa.string()), ("label", pa.string()),
                      ("features", pa.list_(pa.float16() if dtype == "float16" else pa.float32(), dim)),
                      ("error", pa.string())])


def filesystem(location: str):
    """(pyarrow FileSystem, path in it) for a local path or a URI (s3://, gs://, hdfs://, file://)."""
    import pyarrow.fs as pafs

    loc = str(location)
    if "://" in loc:
        try:
            return pafs.FileSystem.from_uri(loc)
        except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError / ImportError
            raise ConfigError(f"cannot open the feature store {loc} ({str(e).splitlines()[0][:160]}): give a "
                              "local folder or a URI pyarrow supports (s3://... with pyarrow's S3 support)") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(loc))


def rows_table(dim: int, dtype: str, keys, paths, labels, feats, errors=None):
    """Rows as a pyarrow table of the store's schema; feats (n, dim) with rows that are not
    finite (in `dtype`) -> null features (and the error "no features" where none is given).
    keys: 16-byte strings, or an (n, 16) uint8 array. paths, labels: None for all null.
    Features already in `dtype` are not copied."""
    pa = _pa()
    n = len(keys)
    feats = np.asarray(feats).reshape(n, dim)
    if feats.dtype not in (np.float16, np.float32):
        feats = feats.astype(np.float32)
    feats = feats.astype(dtype, copy=False)
    errors = list(errors) if errors is not None else [None] * n
    valid = np.array([e is None for e in errors], bool) & np.isfinite(feats).all(axis=1)
    errors = [e if e is not None or valid[i] else "no features" for i, e in enumerate(errors)]
    flat = pa.array(np.ascontiguousarray(feats if valid.all() else np.where(valid[:, None], feats, 0)).ravel())
    fl = pa.FixedSizeListArray.from_arrays(flat, dim, mask=None if valid.all() else pa.array(~valid))
    if isinstance(keys, np.ndarray):
        k = pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), n, [None, pa.py_buffer(
            np.ascontiguousarray(keys, np.uint8).reshape(n, 16))])
    else:
        k = pa.array(list(keys), pa.binary(16))
    paths = [None] * n if paths is None else list(paths)
    labels = [None] * n if labels is None else list(labels)
    return pa.Table.from_arrays([k, pa.array(paths, pa.string()), pa.array(labels, pa.string()), fl,
                                 pa.array(errors, pa.string())], schema=schema(dim, dtype))


def key_and_feature_arrays(table, dim: int):
    """(keys (n, 16) uint8, [(first row, features (rows, dim), valid (rows,) bool) per chunk]) of
    a table of the store's schema, the features without a copy (views of Arrow's buffers)."""
    keys = table.column("key").combine_chunks()
    kbuf = np.frombuffer(keys.buffers()[1], np.uint8)[keys.offset * 16:(keys.offset + len(keys)) * 16] \
        if len(keys) else np.zeros(0, np.uint8)
    parts, row = [], 0
    for ch in table.column("features").chunks:
        m = len(ch)
        flat = ch.values.to_numpy(zero_copy_only=False)[ch.offset * dim:(ch.offset + m) * dim]
        parts.append((row, flat.reshape(m, dim), np.asarray(ch.is_valid(), bool)))
        row += m
    return kbuf.reshape(len(keys), 16), parts


def table_digest(table, dim: int) -> bytes:
    """BLAKE2b-256 of a table's keys, the features of its rows that have them, and which rows
    do not: the check of each row group of a cache shard (retrain.cache), on top of the page CRCs."""
    return arrays_digest(*key_and_feature_arrays(table, dim))


def arrays_digest(keys, parts) -> bytes:
    """table_digest of what key_and_feature_arrays returned."""
    h = hashlib.blake2b(np.ascontiguousarray(keys).tobytes(), digest_size=32)
    for _row, f, valid in parts:
        h.update(np.ascontiguousarray(f if valid.all() else f[valid]))
    for _row, _f, valid in parts:
        h.update(valid.tobytes())
    return h.digest()


def key_hex(key: bytes) -> str:
    return bytes(key).hex()


def digest_bytes(data: bytes) -> bytes:
    """The store's (and the cache's) key of a file: BLAKE2b-128 of its bytes."""
    return hashlib.blake2b(data, digest_size=16).digest()


def read_json(fs, path):
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except (OSError, ValueError):
        return None


def write_bytes(fs, path: str, data: bytes) -> None:
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        from retrain.files import write_bytes_atomic

        write_bytes_atomic(path, data)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)
