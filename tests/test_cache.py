"""The bottleneck cache's format (retrain.cache): Parquet shards of the feature store's format,
each checked by its page CRCs and a whole-file BLAKE2b; caches of the older .npz format are
migrated once, with one line, and read without recomputing anything.
(Reuse, damage, kill -9, concurrent processes and unwritable folders: tests/test_bottlenecks.py.)"""

import dataclasses
import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conftest import make_dataset, run_cli
from retrain.architectures import get_backbone
from retrain.bottlenecks import choose_precision, extract
from retrain.cache import BottleneckCache
from retrain.config import DEFAULT_ARCHITECTURE
from retrain.scan import scan

BB = get_backbone("efficientnet_lite0")


def _made_up(n: int, seed: int, dim: int = BB.feature_dim, dtype=np.float32):
    keys = [hashlib.blake2b(f"{seed}-{i}".encode(), digest_size=16).digest() for i in range(n)]
    return keys, np.random.default_rng(seed).standard_normal((n, dim)).astype(dtype)


def write_npz_cache(root, keys, feats, *, shards: int, precision: str = "fp32", bb=BB):
    """A cache as the .npz code wrote it (its layout, written here): meta.json of schema 1 and
    shard-*.npz files of keys (n,16) uint8, feats (n,C), check = BLAKE2b-256 of both."""
    suffix = "" if precision == "fp32" else f"-{precision}"
    folder = root / f"{bb.name}-{bb.fingerprint(precision)}{suffix}"
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"schema": 1, "backbone": bb.name, "precision": precision, "fingerprint": bb.fingerprint(precision),
            "preprocessing": bb.preprocessing(), "weights_sha256": bb.sha256, "dtype": feats.dtype.name,
            "dim": bb.feature_dim}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    paths = []
    for i, rows in enumerate(np.array_split(np.arange(len(keys)), shards)):
        k = np.frombuffer(b"".join(keys[j] for j in rows), np.uint8).reshape(len(rows), 16)
        f = feats[rows]
        h = hashlib.blake2b(k.tobytes(), digest_size=32)
        h.update(f.tobytes())
        paths.append(folder / f"shard-{1700000000000000000 + i:020d}-0000000{i}.npz")
        with open(paths[-1], "wb") as fh:
            np.savez(fh, keys=k, feats=f, check=np.frombuffer(h.digest(), np.uint8))
    return folder, paths


def test_an_npz_cache_is_migrated_once_and_read_without_recomputing(tiny_dataset, tmp_path):
    items = scan(tiny_dataset, quiet=True).items
    keys = [bytes.fromhex(it.digest) for it in items]
    feats = _made_up(len(keys), 1)[1]  # not the backbone's: what comes back can only be these
    folder, npz = write_npz_cache(tmp_path / "c", keys, feats, shards=2)
    lines = []
    cache = BottleneckCache(tmp_path / "c", BB, log=lines.append)
    assert lines == [f"Bottleneck cache: migrated 2 .npz shards ({len(keys)} features) to Parquet in {folder}"]
    got, fails, t = extract(items, BB, cache, quiet=True)
    assert not fails and t["computed"] == 0 and np.array_equal(got, feats)
    assert not any(p.exists() for p in npz) and len(list(folder.glob("shard-*.parquet"))) == 1
    assert json.loads((folder / "meta.json").read_text())["format"] == "parquet"
    again = []  # the next run reads the Parquet shard, and says nothing
    got, _, t = extract(items, BB, BottleneckCache(tmp_path / "c", BB, log=again.append), quiet=True)
    assert again == [] and t["computed"] == 0 and np.array_equal(got, feats)


def test_a_damaged_npz_shard_is_dropped_and_its_images_recomputed(tiny_dataset, tmp_path):
    items = scan(tiny_dataset, quiet=True).items
    keys = [bytes.fromhex(it.digest) for it in items]
    feats = _made_up(len(keys), 2)[1]
    folder, npz = write_npz_cache(tmp_path / "c", keys, feats, shards=3)
    data = bytearray(npz[1].read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit in its features: the BLAKE2b check fails
    npz[1].write_bytes(bytes(data))
    lines = []
    cache = BottleneckCache(tmp_path / "c", BB, log=lines.append)
    assert cache.damaged == 1 and not any(p.exists() for p in npz)
    assert lines[-1] == f"Bottleneck cache: migrated 2 .npz shards (12 features) to Parquet in {folder}"
    got, _, t = extract(items, BB, cache, quiet=True)
    bad = np.array_split(np.arange(len(keys)), 3)[1]
    assert t["computed"] == len(bad) == 6
    good = np.setdiff1d(np.arange(len(keys)), bad)
    assert np.array_equal(got[good], feats[good]) and np.isfinite(got[bad]).all()


def test_fit_reads_an_npz_cache_with_one_line(tmp_path):
    data = make_dataset(tmp_path / "photos")
    items = scan(data, quiet=True).items
    precision = choose_precision("auto")  # the CLI's default, and so the folder it reads
    bb = get_backbone(DEFAULT_ARCHITECTURE)  # the CLI's default backbone
    real, _, _ = extract(items, bb, BottleneckCache(tmp_path / "elsewhere", bb, precision=precision), quiet=True)
    folder, _ = write_npz_cache(tmp_path / "c", [bytes.fromhex(it.digest) for it in items], real, shards=1,
                                precision=precision, bb=bb)
    r = run_cli("fit", data, "-o", tmp_path / "run", "--cache-dir", tmp_path / "c")
    assert f"Bottleneck cache: migrated 1 .npz shard (18 features) to Parquet in {folder}" in r.stderr
    assert "Bottlenecks:" not in r.stderr  # (the line that says how many were computed)
    assert (tmp_path / "run" / "model.onnx").is_file() and not list(folder.glob("*.npz"))


def test_a_cache_shard_is_a_feature_store_shard(tmp_path):
    """One format: the feature store's reader (retrain.store) reads a cache shard."""
    import pyarrow.fs as pafs

    from retrain.store import FeatureStore

    keys, feats = _made_up(5, 3)
    c = BottleneckCache(tmp_path / "c", BB)
    c.add(keys, feats)
    c.flush()
    st = FeatureStore(pafs.LocalFileSystem(), str(c.folder), c.meta)
    k, paths, labels, X, errors = st.read_all()
    assert k == keys and np.array_equal(X, feats) and paths == labels == errors == [None] * 5
    assert st.damaged == []


def test_a_shard_whose_digest_does_not_match_is_damaged(tmp_path):
    """Pages that pass their CRCs are not enough: the whole-file BLAKE2b must match too."""
    keys, feats = _made_up(6, 4)
    c = BottleneckCache(tmp_path / "c", BB)
    c.add(keys, feats)
    c.flush()
    (shard,) = c.folder.glob("shard-*.parquet")
    t = pq.read_table(shard)
    f = t.column("features").combine_chunks()
    vals = f.values.to_numpy().copy()
    vals[7] += 1.0  # another value, rewritten as a whole Parquet file with the old digest
    t = t.set_column(3, "features", pa.FixedSizeListArray.from_arrays(pa.array(vals), BB.feature_dim))
    pq.write_table(t, shard, write_page_checksum=True)
    again = BottleneckCache(tmp_path / "c", BB)
    assert again.damaged == 1 and len(again) == 0 and not shard.exists()


def test_a_row_that_is_not_finite_costs_only_itself(tmp_path):
    keys, feats = _made_up(4, 5)
    feats[2, 10] = np.nan
    c = BottleneckCache(tmp_path / "c", BB)
    c.add(keys, feats)
    c.flush()
    again = BottleneckCache(tmp_path / "c", BB)
    assert again.damaged == 0 and len(again) == 3 and keys[2] not in again  # computed again next time
    assert np.array_equal(again.get([keys[0], keys[1], keys[3]]), feats[[0, 1, 3]])


def test_float16_activations_come_back_bit_for_bit(tmp_path):
    pseudo = dataclasses.replace(BB, name=f"{BB.name}-prefix3", feature_dim=2 * 7 * 7)  # as backbone_split
    keys, feats = _made_up(9, 6, dim=pseudo.feature_dim, dtype=np.float16)
    c = BottleneckCache(tmp_path / "c", pseudo, dtype="float16")
    c.add(keys[:4], feats[:4])
    c.flush()
    c.add(keys[4:], feats[4:])
    c.compact()  # the two shards merged into one
    (shard,) = c.folder.glob("shard-*.parquet")
    t = pq.read_schema(shard).field("features").type
    assert str(t.value_type) == "halffloat" and t.list_size == 98
    again = BottleneckCache(tmp_path / "c", pseudo, dtype="float16")
    got = again.get(keys)
    assert got.dtype == np.float16 and got.tobytes() == feats.tobytes()


def test_compaction_writes_each_key_once_with_its_latest_features(tmp_path, monkeypatch):
    """Shards loaded and shards just written, one key stored twice (the second time with other
    features, as a rerun after a change would), row groups that span them: the merged shard holds
    every key once with the features the cache gives, and reads back whole."""
    import retrain.cache as cache_mod

    monkeypatch.setattr(cache_mod, "GROUP_BYTES", 4 * BB.feature_dim * 4)  # 4 rows a row group
    keys, feats = _made_up(11, 8)
    c = BottleneckCache(tmp_path / "c", BB)
    c.add(keys[:5], feats[:5])
    c.flush()
    loaded = BottleneckCache(tmp_path / "c", BB)  # the first shard, read from disk
    newer = feats[3] + 1
    loaded.add(keys[5:], feats[5:])
    loaded.flush()
    loaded.add([keys[3]], newer[None])
    loaded.compact()
    assert len(list(loaded.folder.glob("shard-*.parquet"))) == 1
    expect = feats.copy()
    expect[3] = newer
    assert np.array_equal(loaded.get(keys), expect)
    again = BottleneckCache(tmp_path / "c", BB)
    assert again.damaged == 0 and len(again) == 11 and np.array_equal(again.get(keys), expect)
    (shard,) = again.folder.glob("shard-*.parquet")
    assert pq.ParquetFile(shard).metadata.num_rows == 11  # the key stored twice is written once


def test_a_shard_of_several_row_groups_is_read_whole_and_checked_group_by_group(tmp_path, monkeypatch):
    import retrain.cache as cache_mod

    monkeypatch.setattr(cache_mod, "GROUP_BYTES", 3 * BB.feature_dim * 4)  # 3 rows a row group
    keys, feats = _made_up(10, 7)
    c = BottleneckCache(tmp_path / "c", BB)
    c.add(keys, feats)
    c.flush()
    (shard,) = c.folder.glob("shard-*.parquet")
    md = pq.ParquetFile(shard).metadata
    assert [md.row_group(g).num_rows for g in range(md.num_row_groups)] == [3, 3, 3, 1]
    again = BottleneckCache(tmp_path / "c", BB)
    assert again.damaged == 0 and np.array_equal(again.get(keys), feats)
    t = pq.read_table(shard)  # one value of the third row group changed, the file otherwise whole
    vals = t.column("features").combine_chunks().values.to_numpy().copy()
    vals[7 * BB.feature_dim] = 42.0
    t = t.set_column(3, "features", pa.FixedSizeListArray.from_arrays(pa.array(vals), BB.feature_dim))
    pq.write_table(t, shard, row_group_size=3)
    hurt = BottleneckCache(tmp_path / "c", BB)
    assert hurt.damaged == 1 and len(hurt) == 0 and not shard.exists()
