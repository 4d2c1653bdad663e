"""The feature store's format (retrain.store): the Parquet schema and write options, rows as an
Arrow table, the key of a file, and the file systems it lives on (a local folder or a URI
pyarrow reaches) with small JSON files on them.
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


WRITE_OPTIONS = {"write_page_checksum": True, "use_dictionary": ["label", "error"],
                 "compression": {"key": "zstd", "path": "zstd", "label": "zstd", "error": "zstd", "features": "none"}}


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
    """Rows as a pyarrow table of the store's schema; feats (n, dim) with NaN rows -> null
    features (and the error "no features" where none is given)."""
    pa = _pa()
    n = len(keys)
    feats = np.asarray(feats, np.float32).reshape(n, dim)
    errors = list(errors) if errors is not None else [None] * n
    valid = np.array([e is None for e in errors], bool) & np.isfinite(feats).all(axis=1)
    errors = [e if e is not None or valid[i] else "no features" for i, e in enumerate(errors)]
    flat = pa.array(np.where(valid[:, None], feats, 0).astype(dtype).ravel())
    fl = pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(~valid))
    return pa.Table.from_arrays([pa.array(list(keys), pa.binary(16)), pa.array(list(paths), pa.string()),
                                 pa.array(list(labels), pa.string()), fl, pa.array(errors, pa.string())],
                                schema=schema(dim, dtype))


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
