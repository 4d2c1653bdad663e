"""Distorted views: deterministic, cached like bottlenecks, only for training images."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import make_image, run_cli
from retrain import augment
from retrain.config import FitConfig
from retrain.errors import ConfigError


def _img(tmp_path):
    from PIL import Image

    p = make_image(tmp_path / "a.jpg", 0, 1, size=(160, 120))
    return p, Image.open(p).convert("RGB")


def test_views_are_deterministic_and_differ_by_index(tmp_path):
    p, _ = _img(tmp_path)
    d = augment.Distortions(True, 20.0, 20.0, 20.0)
    a = augment.load_view(p, "ab" * 16, 0, d, 64, 0.875)
    b = augment.load_view(p, "ab" * 16, 0, d, 64, 0.875)
    c = augment.load_view(p, "ab" * 16, 1, d, 64, 0.875)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # Other settings -> other views and other cache keys.
    d2 = augment.Distortions(True, 10.0, 20.0, 20.0)
    assert augment.variant(d, 0) != augment.variant(d2, 0)
    assert augment.view_params("ab" * 16, 0, d) != augment.view_params("ab" * 16, 0, d2)


def test_each_distortion_does_what_the_codelab_flag_says(tmp_path):
    from retrain.images import center_crop_resize

    _, im = _img(tmp_path)
    base = center_crop_resize(im, 64, 0.875).astype(int)
    ident = {"keep": 1.0, "x": 0.5, "y": 0.5, "flip": False, "brightness": 1.0}
    assert np.abs(augment.distort(im, 64, 0.875, ident).astype(int) - base).max() <= 1
    flipped = augment.distort(im, 64, 0.875, ident | {"flip": True}).astype(int)
    assert np.abs(flipped - base[:, ::-1]).max() <= 1
    bright = augment.distort(im, 64, 0.875, ident | {"brightness": 1.3}).astype(int)
    assert bright.mean() > base.mean() * 1.2
    zoom = augment.distort(im, 64, 0.875, ident | {"keep": 0.5}).astype(int)
    assert np.abs(zoom - base).mean() > 5  # a different (magnified) picture
    # Parameters stay in the ranges the flags give.
    d = augment.Distortions(False, 10.0, 20.0, 30.0)
    ps = [augment.view_params("cd" * 16, v, d) for v in range(200)]
    keeps = [q["keep"] for q in ps]
    assert min(keeps) >= 1 / (1.1 * 1.2) - 1e-9 and max(keeps) <= 1 / 1.1 + 1e-9
    assert all(0.7 - 1e-9 <= q["brightness"] <= 1.3 + 1e-9 for q in ps)
    assert not any(q["flip"] for q in ps)


def test_resolve_defaults_and_errors():
    assert augment.resolve(FitConfig())[1] == 0
    d, n = augment.resolve(FitConfig(augment=3))
    assert n == 3 and d.flip_left_right and d.random_crop == 10
    d, n = augment.resolve(FitConfig(flip_left_right=True))
    assert n == augment.DEFAULT_VIEWS and d == augment.Distortions(flip_left_right=True)
    with pytest.raises(ConfigError, match="percentage between 0 and 100"):
        augment.resolve(FitConfig(random_crop=150))
    with pytest.raises(ConfigError, match="0 to 32"):
        augment.resolve(FitConfig(augment=-1))


def test_fit_with_distortions_caches_views_of_training_images_only(tiny_dataset, tmp_path):
    """Real CLI, twice: the second run computes no view; views exist only for training images."""
    cache = tmp_path / "cache"
    args = ("fit", tiny_dataset, "--cache-dir", cache, "--flip_left_right", "--random_crop", "10",
            "--random_brightness", "10", "--augment", "2", "--validation_percentage", "20",
            "--testing_percentage", "20", "--cross-validate-below", "0")  # the fixed split (issue 15)
    run_cli(*args, "-o", tmp_path / "r1")
    rep = json.loads((tmp_path / "r1" / "report.json").read_text())
    views = rep["train"]["views"]
    n_train = rep["split_counts"]["train"]
    assert views["views_per_image"] == 2
    assert views["timing"]["computed"] == 2 * n_train  # train images only while choosing
    # the final layer is refitted on train + validation: their views, never the test photos'
    assert rep["train"]["refit"]["views"]["computed"] == 2 * rep["split_counts"]["validation"]
    assert rep["config"]["flip_left_right"] is True
    run_cli(*args, "-o", tmp_path / "r2")
    rep2 = json.loads((tmp_path / "r2" / "report.json").read_text())
    assert rep2["train"]["views"]["timing"] == {"cached": 2 * n_train, "computed": 0}
    # Same views, same model.
    assert rep2["metrics"]["test"]["accuracy"] == rep["metrics"]["test"]["accuracy"]
    p = run_cli("label", tmp_path / "r2", tiny_dataset / "circle" / "circle_0.jpg")
    assert "circle" in p.stdout.splitlines()[0]


def test_bad_distortion_value_is_one_line(tiny_dataset, tmp_path):
    p = run_cli("fit", tiny_dataset, "-o", tmp_path / "r", "--random_scale", "-5", check=False)
    assert p.returncode == 2
    assert "--random_scale" in p.stderr and "Traceback" not in p.stderr


def test_tta_is_recorded_in_the_model_and_averages_the_mirror(tmp_path, tiny_dataset):
    """fit --tta -> label/evaluate use it by default; --no-tta turns it off; TTA = mean with the mirror."""
    from retrain.classifier import Classifier

    out = tmp_path / "run"
    run_cli("fit", tiny_dataset, "-o", out, "--tta")
    clf = Classifier(out, provider="cpu")
    assert clf.tta_default is True
    img = tiny_dataset / "squares" / "squares_0.jpg"
    x = clf.load_image(str(img))[None]
    plain, mirror = clf.predict(x)[0], clf.predict(x[:, :, ::-1].copy())[0]
    assert np.abs(plain - mirror).max() > 1e-7  # the picture is not symmetric
    np.testing.assert_allclose(clf.predict(x, tta=True)[0], (plain + mirror) / 2, rtol=1e-3, atol=1e-9)
    on = json.loads(run_cli("label", out, img, "--json").stdout)[0]["predictions"]
    off = json.loads(run_cli("label", out, img, "--json", "--no-tta").stdout)[0]["predictions"]
    top = {p["label"]: p["score"] for p in on}
    assert top[on[0]["label"]] == pytest.approx(float(((plain + mirror) / 2).max()), abs=1e-5)
    assert off[0]["score"] == pytest.approx(float(plain.max()), abs=1e-5)
    ev = json.loads(run_cli("evaluate", out, tiny_dataset, "--json").stdout)
    ev_off = json.loads(run_cli("evaluate", out, tiny_dataset, "--json", "--no-tta").stdout)
    assert ev["tta"] is True and ev_off["tta"] is False
