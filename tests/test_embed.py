"""`retrain embed DIR --out STORE` in-process: every photo's bottleneck in the feature store, the
same features as fit's bottlenecks, unreadable photos as rows with their error, reruns that
compute only what is missing."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from conftest import make_image, one_error_line, run_cli
from retrain.store import FeatureStore


def test_embed_writes_every_photo_once_and_a_rerun_computes_only_new_ones(tmp_path, tiny_dataset):
    (tiny_dataset / "circle" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    store = tmp_path / "store"
    r = run_cli("embed", str(tiny_dataset), "--out", str(store), "--json")
    doc = json.loads(r.stdout)
    assert doc["photos"] == 19 and doc["computed"] == 19 and doc["already"] == 0
    assert list(doc["errors"]) == [str(tiny_dataset / "circle" / "broken.jpg")]
    st = FeatureStore.open(store)
    keys, paths, labels, X, errors = st.read_all()
    assert len(paths) == len(set(paths)) == 19
    assert sorted(set(labels)) == ["circle", "squares", "stripes"]
    assert sum(e is not None for e in errors) == 1 and np.isfinite(X[[e is None for e in errors]]).all()

    r = run_cli("embed", str(tiny_dataset), "--out", str(store))
    assert "0 computed" in r.stdout and "19 already in the store" in r.stdout
    make_image(tiny_dataset / "stripes" / "new.jpg", 1, 777)
    doc = json.loads(run_cli("embed", str(tiny_dataset), "--out", str(store), "--json").stdout)
    assert doc["computed"] == 1 and doc["already"] == 19 and doc["rows"] == 20


def test_embed_features_equal_the_bottlenecks_of_fit(tmp_path, tiny_dataset):
    from retrain.architectures import get_backbone
    from retrain.bottlenecks import extract
    from retrain.cache import BottleneckCache
    from retrain.config import DEFAULT_ARCHITECTURE
    from retrain.embed import embed
    from retrain.scan import scan

    r = embed(tiny_dataset, tmp_path / "store", precision="fp32", dtype="float32")
    assert r["computed"] == 18
    st = FeatureStore.open(tmp_path / "store")
    _, paths, _, X, _ = st.read_all()
    s = scan(tiny_dataset, quiet=True)
    bb = get_backbone(DEFAULT_ARCHITECTURE)  # embed's default is fit's
    feats, _, _ = extract(s.items, bb, BottleneckCache(tmp_path / "cache", bb), quiet=True)
    by_path = {it.path: feats[i] for i, it in enumerate(s.items)}
    ref = np.stack([by_path[p] for p in paths])
    np.testing.assert_allclose(X, ref, rtol=1e-4, atol=1e-4)  # same engine; not bitwise across machines


def test_embed_needs_a_folder_and_a_store(tmp_path, tiny_dataset):
    r = run_cli("embed", str(tiny_dataset), check=False)
    assert r.returncode == 2 and "--out STORE" in one_error_line(r.stderr)
    r = run_cli("embed", str(tmp_path / "missing"), "--out", str(tmp_path / "s"), check=False)
    assert r.returncode == 2 and one_error_line(r.stderr)
    (tmp_path / "afile").write_text("x")
    r = run_cli("embed", str(tiny_dataset), "--out", str(tmp_path / "afile"), check=False)
    assert r.returncode == 2 and "is a file" in one_error_line(r.stderr)


def test_embed_then_fit_features_makes_a_working_model(tmp_path, tiny_dataset):
    store, run = tmp_path / "store", tmp_path / "run"
    run_cli("embed", str(tiny_dataset), "--out", str(store), "-q")
    r = run_cli("fit", "--features", str(store), "-o", str(run), "-q")
    assert "retrain fit: 18 images, 3 classes" in r.stdout
    out = json.loads(run_cli("label", str(run), str(tiny_dataset / "circle" / "circle_0.jpg"), "--json").stdout)
    assert out[0]["label"] == "circle"


def test_ray_missing_is_one_line(tmp_path, tiny_dataset):
    """--ray without Ray installed (a subprocess where `import ray` fails, whether or not it is here)."""
    code = ("import sys; sys.modules['ray'] = None; from retrain.cli import main; "
            f"sys.exit(main(['embed', {str(tiny_dataset)!r}, '--out', {str(tmp_path / 's')!r}, '--ray', 'auto']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --ray needs Ray")
    assert "pip install 'retrain[ray]'" in r.stderr


def test_label_out_writes_parquet_and_resumes(tmp_path, tiny_run, tiny_dataset):
    import pyarrow.parquet as pq

    manifest = tmp_path / "photos.txt"
    photos = sorted(str(p) for p in tiny_dataset.rglob("*.jpg"))
    manifest.write_text("\n".join(photos[:10]) + "\n")
    doc = json.loads(run_cli("label", str(tiny_run), str(manifest), "--out", str(tmp_path / "p"), "--json").stdout)
    assert doc["labelled"] == 10 and doc["rows"] == 10
    doc = json.loads(run_cli("label", str(tiny_run), str(tiny_dataset), "--out", str(tmp_path / "p"), "--json").stdout)
    assert doc["labelled"] == 8 and doc["already"] == 10 and doc["rows"] == 18
    rows = pq.read_table(tmp_path / "p").to_pylist()
    assert sorted(r["path"] for r in rows) == photos and all(r["label"] and r["top_k"] for r in rows)
    r = run_cli("label", str(tiny_run), str(tiny_dataset), "--ray", "auto", check=False)
    assert r.returncode == 2 and "add --out PREDS" in one_error_line(r.stderr)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    r = run_cli("label", str(tiny_run), str(tiny_dataset), "--out", str(tmp_path / "mine"), check=False)
    assert r.returncode == 2 and "did not write" in one_error_line(r.stderr)
