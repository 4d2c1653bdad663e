"""The bottleneck cache: computed once, reused, never trusted when damaged, resumable after kill -9."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import EXAMPLES, make_dataset, run_cli
from retrain.architectures import get_backbone
from retrain.bottlenecks import choose_precision, extract, feature_session
from retrain.cache import BottleneckCache
from retrain.config import DEFAULT_ARCHITECTURE
from retrain.errors import ConfigError
from retrain.runtime import cpu_has_bf16, cpu_lacks_int8_dot, openvino_available
from retrain.scan import scan

BB = get_backbone("efficientnet_lite0")
DEFAULT = get_backbone(DEFAULT_ARCHITECTURE)  # what `retrain fit` uses when no --architecture is given


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
    assert BB.fingerprint() in meta and f'"size": {BB.image_size}' in meta  # records what produced it


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
    shards = sorted(cache_dir.glob("*/shard-*.parquet"))
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


SHARDS_OFTEN = ("import sys, retrain.cache as b; b.SHARD_SECONDS = 0.05; "
                "from retrain.cli import main; sys.exit(main(sys.argv[1:]))")


# The real CLI, pressing Ctrl-C (a real SIGINT) once 16 bottlenecks are computed, with periodic
# shard writes turned off: whatever reaches the disk was written on the way out.
CTRL_C_AFTER_16 = """
import os, signal, sys, retrain.cache as b
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
    done = len(BottleneckCache(cache, DEFAULT, precision=choose_precision("auto")))
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
    while time.time() < deadline and len(list(cache.glob("*/shard-*.parquet"))) < 2:
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    done = len(BottleneckCache(cache, DEFAULT, precision=choose_precision("auto")))  # the default's cache
    assert 0 < done < 240, done
    r = run_cli("fit", data, "-o", tmp_path / "run", "--cache-dir", cache)
    assert f"{240 - done} computed" in r.stderr and f"{done} from cache" in r.stderr
    assert (tmp_path / "run" / "model.onnx").is_file()


@pytest.mark.skipif(cpu_lacks_int8_dot(), reason="int8 bottlenecks need a CPU with VNNI or AMX")
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
    assert choose_precision("auto", provider="cuda") == "fp32"
    with pytest.raises(ConfigError, match="runs on the CPU"):
        choose_precision("bf16", provider="tensorrt")
    import retrain.runtime

    monkeypatch.setattr(retrain.runtime, "cpu_flags", lambda: {"sse4_2", "avx2", "avx512_vnni"})  # a Cascade Lake
    assert choose_precision("auto") == "fp32" and choose_precision("int8") == "int8"
    with pytest.raises(ConfigError, match="needs a CPU with bf16 units .*; use fp32 or int8$"):
        choose_precision("bf16")
    monkeypatch.setattr(retrain.runtime, "cpu_flags", lambda: {"sse4_2", "avx2"})  # an older CPU, or an AVX2 EPYC
    assert choose_precision("auto") == "fp32"
    with pytest.raises(ConfigError, match="needs a CPU with bf16 units .*; use fp32$"):  # not int8 either
        choose_precision("bf16")
    with pytest.raises(ConfigError, match="int8 needs a CPU with int8 dot-product units"):
        choose_precision("int8")
    assert choose_precision("int8", provider="cuda") == "int8"
    monkeypatch.setattr(retrain.runtime, "cpu_flags", lambda: set())  # not x86 (ARM dot products do not overflow)
    assert choose_precision("int8") == "int8"


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
    x = np.stack([images.load(it.path, BB.image_size, BB.crop_fraction) for it in s.items[:6]])
    sess = feature_session(BB, precision="bf16", batch=4)
    assert sess.batch == 4
    whole = sess(x)  # 4 + 2 padded
    one_by_one = np.concatenate([sess(x[i:i + 1]) for i in range(6)])
    assert whole.shape == (6, 1280) and np.allclose(whole, one_by_one, atol=1e-3)
    sess.submit(x[:3], "a")
    sess.submit(x[3:], "b")
    got = dict(sess.finished(wait=True))
    assert np.allclose(np.concatenate([got["a"], got["b"]]), whole, atol=1e-3)


def test_one_process_runs_one_network_at_two_sides(tmp_path):
    """The Python API (or a head-only fit then a fine-tune) may ask for lite0 at 288 and at 224
    in one process: each side gets its own engine and its own features."""
    s = scan(EXAMPLES, quiet=True)
    items = s.items[:4]
    small = BB.at_size(224)
    big, _, _ = extract(items, BB, BottleneckCache(tmp_path / "a", BB), quiet=True)
    little, fails, _ = extract(items, small, BottleneckCache(tmp_path / "b", small), quiet=True)
    assert not fails and not np.allclose(big, little, atol=1e-3)
    assert feature_session(BB) is not feature_session(small)


# ------------------------------------------------------------------ a cache shared by several processes

def _made_up(n: int, seed: int):
    """n distinct 16-byte keys and (n, 1280) float32 features (what a run would cache)."""
    import hashlib

    keys = [hashlib.blake2b(f"{seed}-{i}".encode(), digest_size=16).digest() for i in range(n)]
    return keys, np.random.default_rng(seed).standard_normal((n, BB.feature_dim)).astype(np.float32)


@pytest.mark.parametrize("first", ["a", "b"])
def test_compaction_keeps_the_shards_another_process_wrote(tmp_path, first):
    ka, fa = _made_up(10, 1)
    kb, fb = _made_up(7, 2)
    a = BottleneckCache(tmp_path / "c", BB)  # process A has loaded the folder (empty) ...
    a.add(ka[:5], fa[:5])
    a.flush()
    a.add(ka[5:], fa[5:])
    a.flush()  # ... and written two shards of its own
    b = BottleneckCache(tmp_path / "c", BB)  # process B starts (it sees A's two shards) ...
    b.add(kb, fb)
    b.flush()  # ... and writes one after A loaded
    for c in ([a, b] if first == "a" else [b, a]):
        c.compact()  # each merges what it knows and deletes only the shards it loaded or wrote
    fresh = BottleneckCache(tmp_path / "c", BB)
    assert fresh.damaged == 0 and len(fresh) == 17
    assert np.array_equal(fresh.get(ka), fa) and np.array_equal(fresh.get(kb), fb)


def test_a_meta_json_that_cannot_be_read_never_deletes_shards(tmp_path):
    keys, feats = _made_up(4, 3)
    c = BottleneckCache(tmp_path / "c", BB)
    c.add(keys, feats)
    c.flush()
    meta = c.folder / "meta.json"
    whole = meta.read_text()
    for broken in (whole[: len(whole) // 2], "", "null"):  # cut short, empty, not an object
        meta.write_text(broken)
        again = BottleneckCache(tmp_path / "c", BB)
        assert len(again) == 4 and np.array_equal(again.get(keys), feats)
        assert meta.read_text() == whole  # rewritten whole
    meta.write_text(whole.replace('"float32"', '"float16"'))  # whole, and made differently: afresh
    assert len(BottleneckCache(tmp_path / "c", BB)) == 0


# Two real `retrain fit` at once on one --cache-dir, shards every 20 ms, compaction over 2 shards.
SHARE_CACHE = ("import sys, retrain.cache as b; b.SHARD_SECONDS = 0.02; b.COMPACT_OVER = 2; "
               "from retrain.cli import main; sys.exit(main(sys.argv[1:]))")


@pytest.mark.slow
def test_two_fits_at_once_on_one_cache_keep_all_features(tmp_path):
    sets = [make_dataset(tmp_path / f"set{i}", per_class=40, seed=i + 1) for i in range(2)]  # 2 x 120 photos
    cache = tmp_path / "cache"
    BottleneckCache(cache, DEFAULT, precision=choose_precision("auto"))  # the folder exists before both start
    procs = [subprocess.Popen([sys.executable, "-c", SHARE_CACHE, "fit", str(d), "-o", str(tmp_path / f"run{i}"),
                               "--cache-dir", str(cache), "--batch-size", "8", "--workers", "1", "-q"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, d in enumerate(sets)]
    for p in procs:
        _out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    fresh = BottleneckCache(cache, DEFAULT, precision=choose_precision("auto"))
    want = {bytes.fromhex(it.digest) for d in sets for it in scan(d, quiet=True).items}
    assert len(want) == 240 and fresh.damaged == 0
    assert want <= set(fresh._index), f"{len(want - set(fresh._index))} of 240 features lost"


# A process that keeps adding features and compacting (a shard vanishes under a concurrent reader).
COMPACT_LOOP = """
import sys, time, numpy as np, retrain.cache as b
from retrain.architectures import get_backbone
bb = get_backbone("efficientnet_lite0")
rng = np.random.default_rng(0)
deadline = time.monotonic() + float(sys.argv[2])
i = 0
while time.monotonic() < deadline:
    c = b.BottleneckCache(sys.argv[1], bb)
    for _ in range(3):
        c.add([i.to_bytes(16, "big")], rng.standard_normal((1, 1280)).astype(np.float32))
        c.flush()
        i += 1
    c.compact()
print(i)
"""


def test_a_shard_compacted_away_while_loading_is_not_called_damaged(tmp_path):
    cache = tmp_path / "c"
    BottleneckCache(cache, BB)
    p = subprocess.Popen([sys.executable, "-c", COMPACT_LOOP, str(cache), "3"], stdout=subprocess.PIPE, text=True)
    loads = damaged = 0
    deadline = time.monotonic() + 20
    while p.poll() is None and time.monotonic() < deadline:
        c = BottleneckCache(cache, BB)
        loads += 1
        damaged += c.damaged
    written = int(p.communicate(timeout=30)[0])
    assert loads > 5 and damaged == 0, f"{damaged} of {loads} loads saw a shard vanish and called it damaged"
    fresh = BottleneckCache(cache, BB)
    assert fresh.damaged == 0 and len(fresh) == written  # nothing lost either


# ------------------------------------------------------------------ what kill -9 loses

# The real CLI with the default shard interval (SHARD_SECONDS, 1 s), logging every batch it adds
# to the cache: the time the add began and ended (the child's monotonic clock) and the count.
LOG_ADDS = """
import sys, time, retrain.cache as b
add = b.BottleneckCache.add
def add_and_log(self, keys, feats):
    t0 = time.monotonic()
    add(self, keys, feats)
    print("added", t0, time.monotonic(), len(self), flush=True)
b.BottleneckCache.add = add_and_log
from retrain.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _many_photos(tmp_path):
    """The 2,934 shared flowers where present, else the 60 example photos, each in 20 copies made
    distinct by bytes after the JPEG's end (1,200 real photos, each with its own digest)."""
    from conftest import SHARED_FLOWERS

    if SHARED_FLOWERS.is_dir():
        return SHARED_FLOWERS
    root = tmp_path / "photos"
    for src in EXAMPLES.glob("*/*.jpg"):
        (root / src.parent.name).mkdir(parents=True, exist_ok=True)
        data = src.read_bytes()
        for i in range(20):
            (root / src.parent.name / f"{src.stem}-{i}.jpg").write_bytes(data + i.to_bytes(4, "big"))
    return root


@pytest.mark.slow
def test_kill_9_loses_at_most_the_last_second_of_work(tmp_path):
    import threading

    from retrain.cache import SHARD_SECONDS

    data = _many_photos(tmp_path)
    cache = tmp_path / "cache"
    p = subprocess.Popen([sys.executable, "-c", LOG_ADDS, "fit", str(data), "-o", str(tmp_path / "run"),
                          "--cache-dir", str(cache), "-q"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True, start_new_session=True)
    adds = []  # (began, ended, features in the cache after it)

    def read():
        for line in p.stdout:
            if line.startswith("added ") and line.endswith("\n"):  # not a line cut short by the kill
                adds.append(tuple(float(x) for x in line.split()[1:]))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 240

    def shard_due():  # an add ended a whole shard interval before the latest one began
        return bool(adds) and any(e < adds[-1][0] - SHARD_SECONDS for _b, e, _n in list(adds))

    # Kill once shards were due on the way (one add can take over a second on a loaded machine,
    # so the time since the first add alone does not say that).
    while time.monotonic() < deadline and p.poll() is None and not shard_due():
        time.sleep(0.005)
    if p.poll() is not None:
        pytest.skip(f"this machine computed all {len(adds) and adds[-1][2]:.0f} features in under "
                    f"{2 * SHARD_SECONDS} s: too fast to kill mid-way")
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    reader.join(10)
    on_disk = len(BottleneckCache(cache, DEFAULT, precision=choose_precision("auto")))
    began_last, _, added = adds[-1]  # the last add the run reported (a later one can only add to the disk)
    # Every add that ended a shard interval before the last one began had reached the disk: what
    # was lost is at most the features added in the last second (plus the batches in the engine).
    older = [n for _b, e, n in adds if e < began_last - SHARD_SECONDS]
    assert older and 0 < older[-1] <= on_disk, (older[-1], on_disk, added)
    rate = (added - adds[0][2]) / (adds[-1][1] - adds[0][0])  # features per second in this run
    print(f"kill -9: {added:.0f} added, {on_disk} on disk: lost {(added - on_disk) / rate:.2f} s of work")


# ------------------------------------------------------------------ a cache folder that cannot be written

def _fill(cache, data):
    """A real cache of `data` (the CLI's default precision), and the bytes of its files."""
    c = BottleneckCache(cache, BB, precision=choose_precision("auto"))
    extract(scan(data, quiet=True).items, BB, c, quiet=True)
    return {p: p.read_bytes() for p in c.folder.iterdir()}


def _one_error(r, *needles):
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(errors) == 1 and r.stderr.rstrip().endswith(errors[0]), r.stderr  # warnings may come first
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def _mount(*args):
    r = subprocess.run(["mount", *map(str, args)], check=False, capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount here (mount {' '.join(map(str, args))}: {r.stderr.strip()})")


def test_a_full_cache_folder_is_one_error_and_damages_nothing(tmp_path):
    cache = tmp_path / "small"
    cache.mkdir()
    _mount("-t", "tmpfs", "-o", "size=200k", "tmpfs", cache)  # room for one small run's features
    try:
        before = _fill(cache, make_dataset(tmp_path / "a", per_class=6))  # 18 features: ~95 kB
        data = make_dataset(tmp_path / "b", per_class=12, seed=1)  # 36 more do not fit
        r = run_cli("fit", data, "-o", tmp_path / "run", "--cache-dir", cache, "-q", check=False)
        _one_error(r, f"the bottleneck cache folder {cache} is full (No space left on device): "
                      "free space or pass --cache-dir elsewhere")
        folder = next(iter(before)).parent
        assert all(p.read_bytes() == b for p, b in before.items())  # what was there is untouched,
        assert not list(folder.glob(".tmp-*"))  # no half-written shard is left behind
        after = BottleneckCache(cache, BB, precision=choose_precision("auto"))
        assert after.damaged == 0 and len(after) >= 18  # (a shard written before the disk filled is kept)
        assert not (tmp_path / "run").exists()
    finally:
        subprocess.run(["umount", str(cache)], check=True)


def test_a_read_only_cache_folder_is_one_error(tmp_path):
    cache = tmp_path / "ro"
    cache.mkdir()
    before = _fill(cache, make_dataset(tmp_path / "a", per_class=6))
    _mount("--bind", cache, cache)
    try:
        _mount("-o", "remount,ro,bind", cache)  # read-only even for root (unlike chmod)
        r = run_cli("fit", make_dataset(tmp_path / "b", seed=1), "-o", tmp_path / "run", "--cache-dir", cache,
                    "-q", check=False)
        _one_error(r, f"the bottleneck cache folder {cache} is read-only (Read-only file system): "
                      "make it writable or pass --cache-dir elsewhere")
        assert {p: p.read_bytes() for p in next(iter(before)).parent.iterdir()} == before
    finally:
        subprocess.run(["umount", str(cache)], check=True)


@pytest.mark.parametrize("under", ["", "sub"])
def test_a_cache_dir_that_is_a_file_is_one_error(tmp_path, under):
    f = tmp_path / "notes.txt"
    f.write_text("mine\n")
    cache = f / under if under else f
    r = run_cli("fit", make_dataset(tmp_path / "a"), "-o", tmp_path / "run", "--cache-dir", cache, "-q", check=False)
    _one_error(r, f"the bottleneck cache folder {cache} cannot be made: {f} is a file, not a folder; "
                  "pass --cache-dir a folder")
    assert f.read_text() == "mine\n"
