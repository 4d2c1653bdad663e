"""The bottleneck cache: computed once, reused, never trusted when damaged, resumable after kill -9."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import EXAMPLES, make_dataset, run_cli
from retrain.backbones import get_backbone
from retrain.bottlenecks import BottleneckCache, choose_precision, extract, feature_session
from retrain.errors import ConfigError
from retrain.runtime import cpu_has_bf16, openvino_available
from retrain.scan import scan

BB = get_backbone("efficientnet_lite0")


def test_cache_reuses_and_matches(tiny_dataset, tmp_path):
    s = scan(tiny_dataset, quiet=True)
    cache = BottleneckCache(tmp_path / "c", BB)
    f1, fails, t1 = extract(s.items, BB, cache, quiet=True)
    assert not fails and t1["computed"] == len(s.items) and f1.shape == (len(s.items), 1280)
    again = BottleneckCache(tmp_path / "c", BB)  # a later run, from disk
    f2, _, t2 = extract(s.items, BB, again, quiet=True)
    assert t2["computed"] == 0 and t2["cached"] == len(s.items)
    assert np.array_equal(f1, f2)
    meta = (again.folder / "meta.json").read_text()
    assert BB.fingerprint() in meta and '"size": 224' in meta  # records what produced it


def test_unreadable_images_are_reported_not_fatal(tiny_dataset, tmp_path):
    (tiny_dataset / "circle" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    s = scan(tiny_dataset, quiet=True)
    feats, fails, _ = extract(s.items, BB, BottleneckCache(tmp_path / "c", BB), quiet=True)
    assert list(fails) == [str(tiny_dataset / "circle" / "broken.jpg")]
    bad = [i for i, it in enumerate(s.items) if it.path in fails]
    assert np.isnan(feats[bad]).all() and np.isfinite(np.delete(feats, bad, 0)).all()


def test_damaged_shard_is_detected_and_recomputed(tiny_dataset, tmp_path):
    s = scan(tiny_dataset, quiet=True)
    extract(s.items[:9], BB, BottleneckCache(tmp_path / "c", BB), batch_size=4, quiet=True)  # two runs,
    ref, _, _ = extract(s.items, BB, BottleneckCache(tmp_path / "c", BB), batch_size=4, quiet=True)  # two shards
    cache_dir = tmp_path / "c"
    shards = sorted(cache_dir.glob("*/shard-*.npz"))
    assert len(shards) >= 2
    # Flip bytes in the middle of one shard (its feature data), truncate another.
    data = bytearray(shards[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    shards[0].write_bytes(bytes(data))
    shards[1].write_bytes(shards[1].read_bytes()[:100])
    cache = BottleneckCache(cache_dir, BB)
    assert cache.damaged == 2
    feats, _, t = extract(s.items, BB, cache, quiet=True)
    assert t["computed"] > 0
    assert np.allclose(feats, ref, atol=1e-5)


def test_changed_meta_starts_afresh(tiny_dataset, tmp_path):
    s = scan(tiny_dataset, quiet=True)
    extract(s.items, BB, BottleneckCache(tmp_path / "c", BB), quiet=True)
    meta = next((tmp_path / "c").glob("*/meta.json"))
    meta.write_text(meta.read_text().replace('"float32"', '"float16"'))
    _, _, t = extract(s.items, BB, BottleneckCache(tmp_path / "c", BB), quiet=True)
    assert t["computed"] == len(s.items)


SHARDS_OFTEN = ("import sys, retrain.bottlenecks as b; b.SHARD_SECONDS = 0.05; "
                "from retrain.cli import main; sys.exit(main(sys.argv[1:]))")


# The real CLI, pressing Ctrl-C (a real SIGINT) once 16 bottlenecks are computed, with periodic
# shard writes turned off: whatever reaches the disk was written on the way out.
CTRL_C_AFTER_16 = """
import os, signal, sys, retrain.bottlenecks as b
b.SHARD_SECONDS = 3600
add = b.BottleneckCache.add
def add_then_ctrl_c(self, keys, feats):
    add(self, keys, feats)
    if len(self) >= 16:
        os.kill(os.getpid(), signal.SIGINT)
b.BottleneckCache.add = add_then_ctrl_c
from retrain.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_during_bottlenecks_keeps_what_was_computed(tmp_path):
    data = make_dataset(tmp_path / "many", per_class=80)  # 240 images
    cache = tmp_path / "cache"
    r = subprocess.run([sys.executable, "-c", CTRL_C_AFTER_16, "fit", str(data), "-o", str(tmp_path / "run"),
                        "--cache-dir", str(cache), "--batch-size", "8"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 130 and "finished work is kept" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()
    done = len(BottleneckCache(cache, BB, precision=choose_precision("auto")))
    assert 16 <= done < 240, done
    r = run_cli("fit", data, "-o", tmp_path / "run", "--cache-dir", cache)
    assert f"{240 - done} computed" in r.stderr and f"{done} from cache" in r.stderr


def test_kill_9_during_bottlenecks_then_resume(tmp_path):
    data = make_dataset(tmp_path / "many", per_class=80)  # 240 images
    cache = tmp_path / "cache"
    # The real CLI, with shards written every 50 ms instead of every second (the photos are tiny).
    cmd = [sys.executable, "-c", SHARDS_OFTEN, "fit", str(data), "-o", str(tmp_path / "run"),
           "--cache-dir", str(cache), "--batch-size", "8", "--workers", "1"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cache.glob("*/shard-*.npz"))) < 2:
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    done = len(BottleneckCache(cache, BB, precision=choose_precision("auto")))  # the default's cache
    assert 0 < done < 240, done
    r = run_cli("fit", data, "-o", tmp_path / "run", "--cache-dir", cache)
    assert f"{240 - done} computed" in r.stderr and f"{done} from cache" in r.stderr
    assert (tmp_path / "run" / "model.onnx").is_file()


def test_int8_bottlenecks_have_their_own_cache_and_agree_with_fp32(tiny_dataset, tmp_path):
    s = scan(tiny_dataset, quiet=True)
    f32, _, _ = extract(s.items, BB, BottleneckCache(tmp_path / "c", BB), quiet=True)
    c8 = BottleneckCache(tmp_path / "c", BB, precision="int8")
    assert c8.folder != BottleneckCache(tmp_path / "c", BB).folder and len(c8) == 0
    f8, _, t = extract(s.items, BB, c8, quiet=True)
    assert t["computed"] == len(s.items)
    cos = (f8 * f32).sum(1) / (np.linalg.norm(f8, axis=1) * np.linalg.norm(f32, axis=1))
    assert cos.mean() > 0.93 and not np.array_equal(f8, f32)  # off-domain synthetic images
    assert '"precision": "int8"' in (c8.folder / "meta.json").read_text()


BF16 = cpu_has_bf16() and openvino_available()


@pytest.mark.skipif(not BF16, reason="needs a CPU with AMX / AVX-512 BF16 and OpenVINO installed")
def test_bf16_bottlenecks_run_on_openvino_and_agree_with_fp32(tmp_path):
    s = scan(EXAMPLES, quiet=True)  # real photos
    items = s.items[::6]
    f32, _, _ = extract(items, BB, BottleneckCache(tmp_path / "c", BB), quiet=True)
    c16 = BottleneckCache(tmp_path / "c", BB, precision="bf16")
    assert c16.folder != BottleneckCache(tmp_path / "c", BB).folder and len(c16) == 0
    f16, _, t = extract(items, BB, c16, quiet=True)
    assert t["computed"] == len(items)
    assert type(feature_session(BB, precision="bf16")).__name__ == "OpenVINOSession"
    cos = (f16 * f32).sum(1) / (np.linalg.norm(f16, axis=1) * np.linalg.norm(f32, axis=1))
    assert cos.min() > 0.99 and not np.array_equal(f16, f32)
    assert '"precision": "bf16"' in (c16.folder / "meta.json").read_text()


def test_auto_precision_is_bf16_only_where_it_runs_and_never_for_fine_tuning(monkeypatch):
    assert choose_precision("auto") == ("bf16" if BF16 else "fp32")
    assert choose_precision("auto", fine_tune=True) == "fp32"
    assert choose_precision("auto", provider="cuda") == "fp32"
    assert choose_precision("int8") == "int8"
    with pytest.raises(ConfigError, match="runs on the CPU"):
        choose_precision("bf16", provider="tensorrt")
    import retrain.runtime

    monkeypatch.setattr(retrain.runtime, "cpu_flags", lambda: {"avx2"})  # an older CPU
    assert choose_precision("auto") == "fp32"
    with pytest.raises(ConfigError, match="needs a CPU with bf16 units"):
        choose_precision("bf16")


@pytest.mark.skipif(not openvino_available(), reason="OpenVINO is not installed")
def test_openvino_that_cannot_compile_is_one_clear_error(tmp_path):
    from retrain.errors import ModelError
    from retrain.runtime import openvino_session

    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="OpenVINO could not compile .*--bottleneck-precision fp32"):
        openvino_session(bad, precision="bf16", size=224, mean=127.0, std=128.0)


@pytest.mark.skipif(not BF16, reason="needs a CPU with AMX / AVX-512 BF16 and OpenVINO installed")
def test_openvino_static_batch_pads_short_batches_and_keeps_order():
    from retrain import images

    s = scan(EXAMPLES, quiet=True)
    x = np.stack([images.load(it.path, 224, BB.crop_fraction) for it in s.items[:6]])
    sess = feature_session(BB, precision="bf16", batch=4)
    assert sess.batch == 4
    whole = sess.run(None, {"input": x})[0]  # 4 + 2 padded
    one_by_one = np.concatenate([sess.run(None, {"input": x[i:i + 1]})[0] for i in range(6)])
    assert whole.shape == (6, 1280) and np.allclose(whole, one_by_one, atol=1e-3)
    sess.submit(x[:3], "a")
    sess.submit(x[3:], "b")
    got = dict(sess.finished(wait=True))
    assert np.allclose(np.concatenate([got["a"], got["b"]]), whole, atol=1e-3)
