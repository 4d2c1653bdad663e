"""`retrain embed` in-process against `retrain embed --ray` on a two-node Ray cluster on this
machine (head 127.0.0.2, worker 127.0.0.3: every byte on loopback), on the same photos.

    python benchmarks/bench_ray.py --photos 20000

The photos are the shared flowers, copied as often as needed with one byte appended after each
JPEG's end (another file to the hash, the same picture to the decoder). Both runs write a new
store; the cluster is started and ended here. Results: benchmarks/results/ray.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FLOWERS, ROOT, append_markdown, machine  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RAY = Path(sys.executable).with_name("ray")


def make_photos(dst: Path, n: int) -> Path:
    files = sorted(FLOWERS.rglob("*.jpg"))
    for i in range(n):
        f = files[i % len(files)]
        out = dst / f.parent.name / f"{f.stem}_copy{i // len(files)}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(f.read_bytes() + bytes([i // len(files) % 256]))
    return dst


def run_embed(*args) -> tuple[float, dict]:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "retrain", "embed", *map(str, args), "--json"], capture_output=True,
                       text=True, env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return time.perf_counter() - t, json.loads(r.stdout)


def start_cluster(tmp: str, cpus: int):
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    common = ["--block", "--disable-usage-stats", "--num-cpus", str(cpus), "--object-store-memory", "300000000"]
    head = subprocess.Popen([str(RAY), "start", "--head", "--node-ip-address", "127.0.0.2", "--port", "46390",
                             "--include-dashboard=false", "--ray-client-server-port", "46391", "--temp-dir", tmp,
                             *common], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    time.sleep(15)
    worker = subprocess.Popen([str(RAY), "start", "--address", "127.0.0.2:46390", "--node-ip-address", "127.0.0.3",
                               *common], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    time.sleep(15)
    return [head, worker]


def stop(procs) -> None:
    for p in reversed(procs):
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=int, default=20_000)
    ap.add_argument("--dir", default="/tmp/bench-ray")
    ap.add_argument("--cpus", type=int, default=2, help="logical CPUs of each node")
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()
    base = Path(args.dir)
    shutil.rmtree(base, ignore_errors=True)
    photos = make_photos(base / "photos", args.photos)
    wall_local, local = run_embed(photos, "--out", base / "local", "--bottleneck-precision", args.precision, "-q")
    tmp = tempfile.mkdtemp(prefix="rtbench-", dir="/tmp")
    procs = start_cluster(tmp, args.cpus)
    try:
        wall_ray, ray = run_embed(photos, "--out", base / "ray", "--ray", "127.0.0.2:46390",
                                  "--bottleneck-precision", args.precision, "-q")
    finally:
        stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)
    res = {"machine": machine(), "photos": args.photos, "precision": local["precision"],
           "in_process": {"wall_s": round(wall_local, 1), "images_per_second": local["images_per_second"]},
           "ray_two_nodes": {"wall_s": round(wall_ray, 1), "images_per_second": ray["images_per_second"],
                             "cpus_per_node": args.cpus}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ray.json").write_text(json.dumps(res, indent=1))
    body = ("| run | wall (process start to end) | images/s (embedding only) |\n|---|---:|---:|\n"
            f"| in-process | {wall_local:.1f} s | {local['images_per_second']} |\n"
            f"| Ray, 2 local nodes x {args.cpus} CPUs | {wall_ray:.1f} s | {ray['images_per_second']} |\n")
    append_markdown(RESULTS / "ray.md", f"embed {args.photos} photos ({machine()})", body)
    print(body)
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
