"""`retrain embed --ray`: a real two-node Ray cluster on this machine, every byte on loopback (the
head on 127.0.0.2, a worker node on 127.0.0.3: Ray rewrites 127.0.0.1 to the external address).

The cluster is started by the tests themselves (`ray start --block`, ended by process id at the
end) and skips with a reason where Ray is not installed (pip install 'retrain[ray]')."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from conftest import EXAMPLES, SHARED_FLOWERS, one_error_line, run_cli
from retrain.store import FeatureStore

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'retrain[ray]'")
pytestmark = pytest.mark.slow

RAY = Path(sys.executable).with_name("ray")
HEAD, WORKER = "127.0.0.2", "127.0.0.3"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Every process under `pid` (psutil), or none once it is gone."""
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _end(procs: list[subprocess.Popen]) -> None:
    """End the processes this test started and everything they started, by process id."""
    tree = [c for p in procs for c in _children(p.pid)]
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
    for c in tree:
        try:
            os.kill(c, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _node(args, env, log):
    return subprocess.Popen([str(RAY), "start", "--block", "--disable-usage-stats", *args], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def cluster(retrain_cache, tmp_path_factory):
    """(address, env) of a head (127.0.0.2) and a worker node (127.0.0.3), 2 logical CPUs each."""
    from retrain.architectures import get_backbone
    from retrain.features import features_onnx

    features_onnx(get_backbone("efficientnet_lite0"), precision="fp32")  # exported once, here
    tmp = tempfile.mkdtemp(prefix="rtray-", dir="/tmp")  # short: Ray's socket paths must fit
    scratch = Path(tmp) / "tmp"  # the temporary folder of the nodes' actors and of the CLI runs
    scratch.mkdir()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RETRAIN_CACHE=str(retrain_cache), TMPDIR=str(scratch))
    log = open(tmp_path_factory.mktemp("ray") / "nodes.log", "wb")
    port = _free_port(HEAD)

    def ports(host):
        return ["--node-manager-port", str(_free_port(host)), "--object-manager-port", str(_free_port(host)),
                "--dashboard-agent-listen-port", str(_free_port(host)), "--dashboard-agent-grpc-port",
                str(_free_port(host)), "--runtime-env-agent-port", str(_free_port(host)),
                "--metrics-export-port", str(_free_port(host)), "--min-worker-port", "0", "--max-worker-port", "0"]

    procs = [_node(["--head", "--node-ip-address", HEAD, "--port", str(port), "--include-dashboard=false",
                    "--ray-client-server-port", str(_free_port(HEAD)), "--num-cpus", "2",
                    "--object-store-memory", "120000000", "--temp-dir", tmp, *ports(HEAD)], env, log)]
    address = f"{HEAD}:{port}"
    try:
        _wait_nodes(address, env, 1, procs)
        procs.append(_node(["--address", address, "--node-ip-address", WORKER, "--num-cpus", "2",
                            "--object-store-memory", "120000000", *ports(WORKER)], env, log))
        _wait_nodes(address, env, 2, procs)
        yield address, env
    finally:
        _end(procs)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_nodes(address, env, n, procs, timeout=120):
    code = ("import ray, sys; ray.init(address=sys.argv[1], _node_ip_address=sys.argv[1].split(':')[0], "
            "logging_level='ERROR'); print(sum(1 for x in ray.nodes() if x['Alive']))")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            pytest.fail("a Ray node did not start (see nodes.log)")
        r = subprocess.run([sys.executable, "-c", code, address], env=env, capture_output=True, text=True,
                           timeout=60)
        if r.returncode == 0 and r.stdout.strip().isdigit() and int(r.stdout.strip()) >= n:
            return
        time.sleep(1)
    pytest.fail(f"the Ray cluster did not reach {n} nodes in {timeout} s")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, int]:
    """A few hundred real photos (the shared flowers; the 60 examples where they are absent)."""
    dst = tmp_path_factory.mktemp("photos")
    src = SHARED_FLOWERS if SHARED_FLOWERS.is_dir() else EXAMPLES
    per_class = 100 if src == SHARED_FLOWERS else 20
    n = 0
    for c in ("daisy", "roses", "tulips"):
        for f in sorted((src / c).glob("*.jpg"))[:per_class]:
            (dst / c).mkdir(exist_ok=True)
            shutil.copyfile(f, dst / c / f.name)
            n += 1
    (dst / "roses" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a photo")
    return dst, n + 1


def _embed(photos_dir, store, address, env, *extra, timeout=400):
    return subprocess.run([sys.executable, "-m", "retrain", "embed", str(photos_dir), "--out", str(store),
                           "--ray", address, "--bottleneck-precision", "fp32", "--json", *extra],
                          env=env, capture_output=True, text=True, timeout=timeout)


def _rows(store) -> tuple[int, list[str]]:
    try:
        st = FeatureStore.open(store)
    except Exception:  # noqa: BLE001 - not made yet
        return 0, []
    paths = st.column("path")
    return len(paths), paths


def test_embed_on_two_nodes_equals_the_in_process_path(cluster, photos, tmp_path):
    address, env = cluster
    src, n = photos
    r = _embed(src, tmp_path / "ray", address, env)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    assert doc["computed"] == n and doc["rows"] == n and list(doc["errors"]) == [str(src / "roses" / "broken.jpg")]
    ray_store = FeatureStore.open(tmp_path / "ray")
    assert len(ray_store.shard_paths()) <= 2  # few large files, not one per block
    keys, paths, labels, X, errors = ray_store.read_all()
    assert len(paths) == len(set(paths)) == n
    assert {lab for p, lab in zip(paths, labels)} == {"daisy", "roses", "tulips"}
    assert all(Path(p).parent.name == lab for p, lab in zip(paths, labels))

    run_cli("embed", str(src), "--out", str(tmp_path / "local"), "--bottleneck-precision", "fp32", "-q")
    lk, lp, _, LX, _ = FeatureStore.open(tmp_path / "local").read_all()
    local = {p: (k, x) for k, p, x in zip(lk, lp, LX)}
    assert set(local) == set(paths)
    ok = [i for i, e in enumerate(errors) if e is None]
    assert all(local[paths[i]][0] == keys[i] for i in range(n))  # the same keys (BLAKE2b of the bytes)
    np.testing.assert_allclose(X[ok], np.stack([local[paths[i]][1] for i in ok]), rtol=1e-3, atol=1e-3)

    again = json.loads(_embed(src, tmp_path / "ray", address, env).stdout)
    assert again["computed"] == 0 and again["already"] == n  # nothing computed twice; no cluster job at all


def _embedder_pids(cluster_root_pids) -> list[int]:
    out = []
    for pid in cluster_root_pids:
        for c in _children(pid):
            try:
                title = open(f"/proc/{c}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "MapWorker" in title and "Embedder" in title:
                out.append(c)
    return out


def _raylets() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and _is_raylet(d)]


def _is_raylet(d) -> bool:
    try:
        return b"/raylet" in open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")[0]
    except OSError:
        return False


def test_kill_9_of_a_worker_mid_run_loses_nothing(cluster, photos, tmp_path):
    address, env = cluster
    src, n = photos
    proc = subprocess.Popen([sys.executable, "-m", "retrain", "embed", str(src), "--out", str(tmp_path / "s"),
                             "--ray", address, "--bottleneck-precision", "fp32", "--json", "--rows-per-file", "16"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.monotonic() + 240
    try:
        while killed is None and time.monotonic() < deadline and proc.poll() is None:
            pids = _embedder_pids(_raylets())
            if pids and _rows(tmp_path / "s")[0] >= 16:
                os.kill(pids[0], signal.SIGKILL)  # one embedding actor, mid-run
                killed = pids[0]
            time.sleep(0.2)
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    if killed is None:
        pytest.skip("the run ended before an actor could be killed (machine too fast for this check)")
    assert proc.returncode == 0, err[-2000:]
    count, paths = _rows(tmp_path / "s")
    assert count == n and len(set(paths)) == n  # nothing missing, nothing doubled


def test_kill_9_of_the_driver_then_resume_computes_exactly_the_missing_rows(cluster, photos, tmp_path):
    address, env = cluster
    src, n = photos
    store = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-m", "retrain", "embed", str(src), "--out", str(store), "--ray",
                             address, "--bottleneck-precision", "fp32", "--json", "--rows-per-file", "16"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None and _rows(store)[0] < 48:
            time.sleep(0.1)
        if proc.poll() is not None:
            pytest.skip("the run ended before the driver could be killed (machine too fast for this check)")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # The job's tasks end with their driver: wait until the store stops growing.
    last, stable_since = -1, time.monotonic()
    while time.monotonic() - stable_since < 5 and time.monotonic() < deadline + 60:
        c = _rows(store)[0]
        if c != last:
            last, stable_since = c, time.monotonic()
        time.sleep(0.5)
    before, paths_before = _rows(store)  # complete files only: one cut short is deleted here
    assert 0 < before < n and len(set(paths_before)) == before
    r = _embed(src, store, address, env)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    assert doc["computed"] == n - before and doc["already"] == before  # exactly the missing rows
    count, paths = _rows(store)
    assert count == n and len(set(paths)) == n


def test_label_on_the_cluster_equals_label_in_process_and_resumes(cluster, photos, tmp_path, tiny_run):
    import pyarrow.parquet as pq

    address, env = cluster
    src, n = photos
    r = subprocess.run([sys.executable, "-m", "retrain", "label", str(tiny_run), str(src), "--ray", address,
                        "--out", str(tmp_path / "preds"), "--top-k", "2", "--json"],
                       env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["labelled"] == n
    got = pq.read_table(tmp_path / "preds").to_pylist()  # a plain Parquet folder: any reader takes it
    assert len(got) == len({g["path"] for g in got}) == n
    bad = [g for g in got if g["error"] is not None]
    assert [g["path"] for g in bad] == [str(src / "roses" / "broken.jpg")] and bad[0]["label"] is None

    run_cli("label", str(tiny_run), str(src), "--out", str(tmp_path / "local"), "--top-k", "2", "-q")
    local = {g["path"]: g for g in pq.read_table(tmp_path / "local").to_pylist()}
    for g in got:
        if g["error"] is None:
            assert g["label"] == local[g["path"]]["label"] and len(g["top_k"]) == 2
            assert abs(g["score"] - local[g["path"]]["score"]) < 1e-3

    again = subprocess.run([sys.executable, "-m", "retrain", "label", str(tiny_run), str(src), "--ray", address,
                            "--out", str(tmp_path / "preds"), "--top-k", "2", "--json"],
                           env=env, capture_output=True, text=True, timeout=400)
    assert json.loads(again.stdout)["labelled"] == 0 and json.loads(again.stdout)["rows"] == n
    assert _left_behind(env) == []


def _left_behind(env) -> list[str]:
    """What retrain left in the temporary folder of the cluster's nodes and of the CLI (Ray ends
    its actors by killing their processes: nothing is removed after that)."""
    return sorted(p.name for p in Path(env["TMPDIR"]).glob("retrain-*"))


def _fit(src, run, cache, env, *extra, precision="fp32", timeout=400):
    return subprocess.run([sys.executable, "-m", "retrain", "fit", str(src), "-o", str(run), "--bottleneck_dir",
                           str(cache), "--bottleneck-precision", precision, *extra],
                          env=env, capture_output=True, text=True, timeout=timeout)


def _cached(cache_dir, src) -> dict[str, np.ndarray]:
    """{path: features} of the photos of `src` found in the default backbone's fp32 cache at
    `cache_dir` (read afresh)."""
    from retrain.architectures import get_backbone
    from retrain.cache import BottleneckCache, key_of
    from retrain.config import DEFAULT_ARCHITECTURE
    from retrain.scan import scan

    c = BottleneckCache(cache_dir, get_backbone(DEFAULT_ARCHITECTURE), precision="fp32")
    found = [it for it in scan(src, quiet=True).items if key_of(it.digest) in c]
    return dict(zip((it.path for it in found), c.get([key_of(it.digest) for it in found])))


def test_fit_on_the_cluster_makes_the_model_a_local_fit_makes(cluster, tmp_path):
    """`retrain fit DIR --ray`: the bottlenecks computed on two nodes, into the cache, the rest of fit
    here: the same features, figures and predictions as a fit without --ray; a photo the cluster
    cannot read is skipped with the local reason; a later fit without --ray computes none again."""
    address, env = cluster
    src = tmp_path / "flowers"
    shutil.copytree(EXAMPLES, src)
    (src / "roses" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a photo")
    n = sum(1 for _ in src.rglob("*.jpg")) - 1

    r = _fit(src, tmp_path / "ray-run", tmp_path / "ray-cache", env, "--ray", address)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{n + 1} to compute on the Ray cluster at {address}" in r.stderr
    assert r.stdout.startswith("retrain fit: ") and len(r.stdout.splitlines()) == 1  # no Ray output on stdout
    local = _fit(src, tmp_path / "local-run", tmp_path / "local-cache", env)
    assert local.returncode == 0, local.stderr[-2000:]
    rep, ref = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("ray-run", "local-run"))
    assert rep["timings"]["bottleneck_detail"]["ray"]["computed"] == n + 1
    assert rep["timings"]["bottleneck_detail"]["computed"] == 0  # nothing computed on this machine

    ray_feats, local_feats = _cached(tmp_path / "ray-cache", src), _cached(tmp_path / "local-cache", src)
    assert set(ray_feats) == set(local_feats) and len(ray_feats) == n  # every photo but the broken one
    paths = sorted(ray_feats)
    np.testing.assert_allclose(np.stack([ray_feats[p] for p in paths]), np.stack([local_feats[p] for p in paths]),
                               rtol=1e-3, atol=1e-3)  # the same engine on other threads: close, not bitwise

    assert [s["path"] for s in rep["skipped"]] == [str(src / "roses" / "broken.jpg")]
    assert rep["skipped"] == ref["skipped"]  # with the reason a fit without --ray gives
    assert rep["split_counts"] == ref["split_counts"] and rep["class_counts"] == ref["class_counts"]
    for part in ("test", "validation", "cross_validation"):
        a, b = rep["metrics"].get(part), ref["metrics"].get(part)
        assert (a is None) == (b is None), part
        if a:
            assert (a["n"], a["accuracy"]) == (b["n"], b["accuracy"]), part
    assert rep["bottleneck_precision"] == ref["bottleneck_precision"] == "fp32"
    assert _left_behind(env) == []  # each actor's copy of the graph, removed once loaded

    photos = [str(p) for p in sorted(src.rglob("*.jpg")) if p.name != "broken.jpg"]
    preds = []
    for run in ("ray-run", "local-run"):
        out = subprocess.run([sys.executable, "-m", "retrain", "label", str(tmp_path / run), *photos, "--json"],
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        preds.append({p["path"]: p for p in json.loads(out.stdout)})
    assert [preds[0][p]["label"] for p in photos] == [preds[1][p]["label"] for p in photos]
    assert max(abs(preds[0][p]["predictions"][0]["score"] - preds[1][p]["predictions"][0]["score"])
               for p in photos) < 1e-3

    # A later fit without --ray finds every feature the cluster computed (same fingerprint, precision),
    # at fp32 and at the default precision (bf16 where this CPU has bf16 units and OpenVINO is here).
    for precision in ("fp32", "auto"):
        cache = tmp_path / ("ray-cache" if precision == "fp32" else "auto-cache")
        if precision == "auto":
            r = _fit(src, tmp_path / "ray-auto", cache, env, "--ray", address, "--no-label-check", precision="auto")
            assert r.returncode == 0, r.stderr[-2000:]
        again = _fit(src, tmp_path / f"again-{precision}", cache, env, "--no-label-check", precision=precision)
        assert again.returncode == 0, again.stderr[-2000:]
        doc = json.loads((tmp_path / f"again-{precision}" / "report.json").read_text())
        detail = doc["timings"]["bottleneck_detail"]
        assert detail["cached"] == n and "ray" not in detail
        if precision == "auto":
            ray_doc = json.loads((tmp_path / "ray-auto" / "report.json").read_text())
            assert doc["bottleneck_precision"] == ray_doc["bottleneck_precision"]


def test_fit_on_the_cluster_refuses_nodes_that_would_compute_other_features(cluster, tmp_path):
    """A node whose OpenVINO differs from the driver's would cache other bf16 features under the
    driver's fingerprint: its actors refuse, and fit says so in one line (exit 2). Here the driver
    reports another OpenVINO version than the nodes have (one machine cannot hold two)."""
    from retrain.runtime import cpu_has_bf16, openvino_available

    if not (cpu_has_bf16() and openvino_available()):
        pytest.skip("bf16 bottlenecks need a CPU with bf16 units and OpenVINO")
    address, env = cluster
    run = tmp_path / "run"
    code = ("import sys; import retrain.runtime as rt; rt.openvino_version = lambda: '0.0-another'; "
            "from retrain.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "fit", str(EXAMPLES), "-o", str(run), "--bottleneck_dir",
                        str(tmp_path / "cache"), "--bottleneck-precision", "bf16", "--ray", address],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    line = one_error_line(r.stderr)
    assert "would compute other bf16 bottlenecks than this machine" in line and "127.0.0." in line
    assert r.stdout == "" and not run.exists()
