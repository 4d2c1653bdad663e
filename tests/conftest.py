"""Shared fixtures: tiny real images made here, a trained run, and the shared flowers if present.

Each test session has a temporary cache folder of its own (RETRAIN_CACHE), so tests never touch
the user's cache and every bottleneck is computed afresh in a session. The exported backbone
graphs (RETRAIN_CACHE/backbones: minutes of torch export and int8 quantization) are kept between
sessions in BACKBONE_STORE (.pytest_cache/retrain-backbones, removed by `make clean`): copied
into the session's cache at its start, and what the session exported copied back at its end.
A graph's file name carries its fingerprint (weights, export code, preprocessing), so a stale
one is never used. RETRAIN_TEST_FRESH_BACKBONES=1 starts from an empty cache and keeps nothing.
"""

from __future__ import annotations

import os
import signal
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# A run started in the background of a non-interactive shell (`cmd &`) inherits SIGINT ignored,
# and so would every retrain the tests start: the Ctrl-C tests need it delivered.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "flowers"
UNSEEN = ROOT / "examples" / "unseen"
SHARED_FLOWERS = ROOT.parent / "shared" / "data" / "flower_photos"


BACKBONE_STORE = ROOT / ".pytest_cache" / "retrain-backbones"


def _reuse_backbones() -> bool:
    return os.environ.get("RETRAIN_TEST_FRESH_BACKBONES", "") in ("", "0")


def _graphs(folder: Path) -> list[Path]:
    """The built-in backbones' finished graphs and their sidecars in a backbones folder:
    NAME-FINGERPRINT.onnx/.json, NAME-FINGERPRINT-int8.*, NAME-FINGERPRINT-prefixN.onnx, NAME
    being one network or several joined with '+' (the two-network default). Not a
    .part- being written, not speed.json (measured speeds), not the graphs adapted from a test's
    own ONNX files (those are the tests' business)."""
    import re

    from retrain.architectures import BACKBONES

    names = "|".join(map(re.escape, BACKBONES))  # one network, or several joined with '+' (concat)
    pattern = re.compile(rf"({names})(\+({names}))*-[0-9a-f]{{16}}(-int8|-prefix\d+)?\.(onnx|json)")
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if pattern.fullmatch(p.name) and p.is_file())


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.part")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)  # another session copying the same graph at once: either copy wins
    finally:
        if tmp.exists():
            tmp.unlink()


def _sync_graphs(src: Path, dst: Path) -> None:
    """Copy the graphs of `src` that `dst` lacks (sidecars first, so a graph is never without one)."""
    new = [p for p in _graphs(src) if not (dst / p.name).is_file()]
    if not new:
        return
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(new, key=lambda p: p.suffix != ".json"):
        _copy_atomic(p, dst / p.name)


@pytest.fixture(scope="session", autouse=True)
def retrain_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("retrain-cache")
    if _reuse_backbones():
        try:
            _sync_graphs(BACKBONE_STORE, cache / "backbones")
        except OSError as e:  # an unreadable store: export afresh, as a fresh checkout does
            print(f"conftest: not reusing {BACKBONE_STORE} ({e})", file=sys.stderr)
    old = os.environ.get("RETRAIN_CACHE")
    os.environ["RETRAIN_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("RETRAIN_CACHE", None)
    else:
        os.environ["RETRAIN_CACHE"] = old
    if _reuse_backbones():
        try:
            _sync_graphs(cache / "backbones", BACKBONE_STORE)
        except OSError as e:  # a read-only checkout: the next session exports again
            print(f"conftest: could not keep the backbone graphs in {BACKBONE_STORE} ({e})", file=sys.stderr)


def make_image(path: Path, kind: int, seed: int, size=(96, 80), fmt=None, mode="RGB") -> Path:
    """A small picture whose class is easy to see: 0 red disc, 1 green stripes, 2 blue squares..."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(base, "RGB")
    d = ImageDraw.Draw(im)
    jitter = int(rng.integers(-8, 9))
    if kind % 3 == 0:
        d.ellipse([w // 4 + jitter, h // 4, 3 * w // 4 + jitter, 3 * h // 4], fill=(220, 40, 40))
    elif kind % 3 == 1:
        for x in range(jitter % 12, w, 12):
            d.rectangle([x, 0, x + 5, h], fill=(40, 200, 60))
    else:
        for i in range(4):
            x, y = rng.integers(0, w - 20), rng.integers(0, h - 20)
            d.rectangle([x, y, x + 18, y + 18], fill=(40, 60, 230))
    if mode != "RGB":
        im = im.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, fmt)
    return path


def make_dataset(root: Path, classes=("circle", "stripes", "squares"), per_class=6, seed=0) -> Path:
    for k, c in enumerate(classes):
        for i in range(per_class):
            make_image(root / c / f"{c}_{i}.jpg", k, seed * 1000 + k * 100 + i)
    return root


@pytest.fixture()
def tiny_dataset(tmp_path) -> Path:
    """3 classes x 6 generated JPEGs (a fresh copy per test: tests may add bad files)."""
    return make_dataset(tmp_path / "images")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder trained once per session on 3 x 8 generated images (library call)."""
    from retrain.config import FitConfig
    from retrain.fit import fit

    root = tmp_path_factory.mktemp("tiny")
    data = make_dataset(root / "images", per_class=8)
    out = root / "run"
    fit(FitConfig(image_dir=str(data), output=str(out), quiet=True))
    return out


@pytest.fixture(scope="session")
def flowers_run(tmp_path_factory) -> Path:
    """A run trained on the 60 example flower photos committed under examples/."""
    from retrain.config import FitConfig
    from retrain.fit import fit

    out = tmp_path_factory.mktemp("flowers") / "run"
    fit(FitConfig(image_dir=str(EXAMPLES), output=str(out), quiet=True))
    return out


def pytest_collection_modifyitems(items):
    """A test that uses the shared flowers is marked `shared` (-m "not shared" leaves them out)."""
    for item in items:
        if "shared_flowers" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared)


@pytest.fixture()
def shared_flowers() -> Path:
    if not SHARED_FLOWERS.is_dir():
        pytest.skip(f"../shared/data/flower_photos not found at {SHARED_FLOWERS}")
    return SHARED_FLOWERS


def run_cli(*args, check=True, timeout=600, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Run the real `retrain` CLI in a subprocess (python -m retrain)."""
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "retrain", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=e, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"retrain {' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def one_error_line(stderr: str) -> str:
    """The single `error: ...` line of a failed command; fails on a traceback or several errors."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert "internal error" not in errors[0], stderr
    return errors[0]


def with_metadata(src, dst, **values) -> Path:
    """A copy of the model file `src` (a run folder or .onnx) at `dst` with metadata keys set
    (JSON for non-strings, as retrain stores them; None removes the key)."""
    import json

    import onnx

    src = Path(src)
    m = onnx.load(str(src / "model.onnx" if src.is_dir() else src))
    props = {p.key: p.value for p in m.metadata_props}
    for k, v in values.items():
        if v is None:
            props.pop(k, None)
        else:
            props[k] = v if isinstance(v, str) else json.dumps(v)
    del m.metadata_props[:]
    for k, v in props.items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, str(dst))
    return Path(dst)
