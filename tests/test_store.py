"""The feature store (retrain.store) and `retrain fit --features STORE` (retrain.streamfit):
rows written and read back, damaged shards found, the head trained from a store with no photos,
in memory (L-BFGS) and streamed (mini-batch Adam over row groups)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import one_error_line, run_cli
from retrain.architectures import get_backbone
from retrain.store import FeatureStore


def synthetic_store(root, rows=3000, classes=3, seed=0, dtype="float16", rows_per_file=1000):
    """A store of the real backbone's identity with made-up, well separated features."""
    bb = get_backbone("efficientnet_lite0")
    st = FeatureStore.create(root, bb, precision="fp32", dtype=dtype)
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, bb.feature_dim)).astype(np.float32)
    with st.writer(rows_per_file=rows_per_file) as w:
        for s in range(0, rows, 500):
            n = min(500, rows - s)
            y = rng.integers(0, classes, n)
            X = np.abs(centres[y] + rng.normal(0, 1.5, (n, bb.feature_dim)))
            w.add([rng.bytes(16) for _ in range(n)], [f"/nowhere/c{c}/img_{s + i}.jpg" for i, c in enumerate(y)],
                  [f"c{c}" for c in y], X)
    return st


def test_rows_come_back_as_written(tmp_path):
    st = synthetic_store(tmp_path / "s", rows=1200, rows_per_file=500)
    assert len(st) == 1200 and len(st.shard_paths()) == 3
    again = FeatureStore.open(tmp_path / "s")  # the root: its only fingerprint folder
    keys, paths, labels, X, errors = again.read_all()
    assert len(set(keys)) == 1200 and len(set(paths)) == 1200 and errors == [None] * 1200
    assert X.dtype == np.float32 and X.shape == (1200, 1280) and np.isfinite(X).all()
    assert again.label_counts() == {c: labels.count(c) for c in ("c0", "c1", "c2")}
    tables = list(again.iter_tables(["features"]))
    assert max(len(t) for t in tables) <= 8192  # one row group at a time


def test_error_rows_are_kept_but_not_trained_on(tmp_path):
    st = FeatureStore.create(tmp_path / "s", get_backbone("efficientnet_lite0"), dtype="float32")
    with st.writer() as w:
        w.add([b"a" * 16, b"b" * 16], ["/x/a.jpg", "/x/b.jpg"], ["a", "b"],
              np.stack([np.ones(1280), np.full(1280, np.nan)]), [None, "truncated JPEG"])
    assert st.done() == {(b"a" * 16, "/x/a.jpg"), (b"b" * 16, "/x/b.jpg")}
    assert sum(len(t) for t in st.iter_tables(["features"])) == 1
    _, _, _, X, errors = st.read_all()
    assert errors == [None, "truncated JPEG"] and np.isnan(X[1]).all() and (X[0] == 1).all()


def test_a_truncated_shard_is_found_deleted_and_reported(tmp_path):
    st = synthetic_store(tmp_path / "s", rows=1000, rows_per_file=500)
    a, b = st.shard_paths()
    data = open(a, "rb").read()
    open(a, "wb").write(data[: len(data) // 2])
    msgs = []
    again = FeatureStore.open(tmp_path / "s", log=msgs.append)
    assert len(again) == 500 and again.shard_paths() == [b]
    assert any("damaged" in m or "cannot be read" in m for m in msgs)


def test_a_flipped_byte_in_the_features_is_caught_by_the_page_checksum(tmp_path):
    st = synthetic_store(tmp_path / "s", rows=600, rows_per_file=600)
    (p,) = st.shard_paths()
    raw = bytearray(open(p, "rb").read())
    raw[len(raw) // 2] ^= 0xFF  # in the middle: the uncompressed features pages
    open(p, "wb").write(bytes(raw))
    from retrain.errors import DataError

    with pytest.raises(DataError, match="damaged"):
        FeatureStore.open(tmp_path / "s").read_all()
    assert FeatureStore.open(tmp_path / "s").shard_paths() == []  # deleted: the next embed recomputes it


def test_a_store_of_other_features_is_refused_in_one_line(tmp_path):
    synthetic_store(tmp_path / "s", rows=10)
    from retrain.errors import ConfigError

    with pytest.raises(ConfigError, match="--dtype float16"):
        FeatureStore.create(tmp_path / "s", get_backbone("efficientnet_lite0"), dtype="float32")
    meta = next((tmp_path / "s").glob("*/_meta.json"))
    doc = json.loads(meta.read_text())
    doc["fingerprint"] = "0000000000000000"
    meta.write_text(json.dumps(doc))
    r = run_cli("fit", "--features", str(tmp_path / "s"), "-o", str(tmp_path / "run"), check=False)
    assert r.returncode == 2 and "another build" in one_error_line(r.stderr)


@pytest.mark.parametrize("optimizer", ["lbfgs", "stream"])
def test_fit_from_a_store_with_no_photos(tmp_path, optimizer):
    synthetic_store(tmp_path / "s", rows=3000)
    out = tmp_path / "run"
    r = run_cli("fit", "--features", str(tmp_path / "s"), "-o", str(out), "--optimizer", optimizer, "-q")
    assert "test accuracy" in r.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["train"]["optimizer"] == optimizer
    assert report["metrics"]["test"]["accuracy"] >= 0.95
    assert sum(report["class_counts"].values()) == 3000
    assert (out / "model.onnx").stat().st_size > 1e6  # the whole model: backbone + the head


def test_fit_features_refuses_bad_combinations(tmp_path, tiny_dataset):
    r = run_cli("fit", "--features", str(tmp_path / "nothing"), "-o", str(tmp_path / "r"), check=False)
    assert r.returncode == 2 and "feature store not found" in one_error_line(r.stderr)
    r = run_cli("fit", str(tiny_dataset), "--features", str(tmp_path / "x"), check=False)
    assert r.returncode == 2 and "not both" in one_error_line(r.stderr)
    r = run_cli("fit", "--features", str(tmp_path / "x"), "--fine-tune", check=False)
    assert r.returncode == 2 and "--fine-tune" in one_error_line(r.stderr)
    r = run_cli("fit", str(tiny_dataset), "--optimizer", "stream", check=False)
    assert r.returncode == 2 and "--features" in one_error_line(r.stderr)
