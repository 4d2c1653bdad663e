"""`retrain embed` in-process against `retrain embed --ray` on a two-node Ray cluster on this
machine (head 127.0.0.2, worker 127.0.0.3: every byte on loopback), on the same photos.

    nice -n 19 python benchmarks/bench_ray.py --photos 20000

The photos are the shared flowers, copied under --dir (in /tmp) as often as needed with one
byte appended after each JPEG's end (another file to the hash, the same picture to the
decoder). Each path embeds a small set (--small photos, evenly spaced among the copies) and the whole
set into new stores, so that wall = overhead + photos / rate gives each path's per-job overhead
and per-photo rate; the CPU seconds of each run (the embed process, and on Ray the cluster's
processes too) give the same per CPU-second, a figure a machine shared with other jobs moves
less than the wall. The cluster is started here (every port chosen on the node's own loopback
address, the driver on 127.0.0.2, usage stats off, no dashboard; Ray 2.60's GCS and raylets
listen on every interface all the same, so the listening sockets are recorded, and so is any
connection of the cluster with an end off loopback: there should be none) and ended here by
process id with everything it started; every step has a time limit; the copies are deleted at
the end. Results: benchmarks/results/ray.{json,md}.
"""

from __future__ import annotations

import argparse
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

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FLOWERS, ROOT, append_markdown, machine  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RAY = Path(sys.executable).with_name("ray")
HEAD, WORKER = "127.0.0.2", "127.0.0.3"
ENV = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")


def make_photos(dst: Path, n: int) -> Path:
    by_class = [sorted(d.glob("*.jpg")) for d in sorted(FLOWERS.iterdir()) if d.is_dir()]
    # the classes interleaved, so that any n photos hold every class
    files = [f for *_, f in sorted((i / len(fs), f.parent.name, f) for fs in by_class for i, f in enumerate(fs))]
    if not files:
        raise SystemExit(f"no photos in {FLOWERS}")
    for i in range(n):
        f = files[i % len(files)]
        out = dst / f.parent.name / f"{f.stem}_copy{i // len(files)}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(f.read_bytes() + bytes([i // len(files) % 256]))
    return dst


def subset(src: Path, dst: Path, n: int) -> Path:
    """n photos of src, evenly spaced in sorted order (every class), hard-linked into dst."""
    files = sorted(src.rglob("*.jpg"))
    for f in (files[i * len(files) // n] for i in range(min(n, len(files)))):
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.link(f, out)
    return dst


def run_embed(*args, timeout: float) -> tuple[float, float, dict]:
    """`retrain embed ARGS --json` in a fresh process: (wall s, CPU s of that process, its result)."""
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = _Popen([sys.executable, "-m", "retrain", "embed", *map(str, args), "--json"], stdout=out,
                             stderr=err, text=True, env=ENV)
        try:
            p.wait(timeout=timeout)  # polls; the status is left for wait4 below
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise SystemExit(f"retrain embed {' '.join(map(str, args))} took more than {timeout:.0f} s") from None
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if p.returncode != 0:
        raise SystemExit(stderr[-3000:])
    return wall, p.cpu_s, json.loads(stdout)


class _Popen(subprocess.Popen):
    """Popen that reaps its child with wait4 and keeps the child's CPU seconds (user + system)."""

    cpu_s = 0.0

    def _try_wait(self, wait_flags):
        try:
            pid, sts, ru = os.wait4(self.pid, wait_flags)
        except ChildProcessError:
            return self.pid, 0
        if pid == self.pid:
            self.cpu_s = ru.ru_utime + ru.ru_stime
        return pid, sts


class TreeCPU:
    """CPU seconds (user + system) used by the cluster's processes while it runs: their tree
    polled from /proc twice a second, each process counted at the last value seen (an actor that
    ends between two polls loses at most half a second; Ray does not account its ended workers
    to the raylet's children's times)."""

    def __init__(self, procs):
        import threading

        self.procs, self.seen, self.done = procs, {}, threading.Event()
        self.tick = os.sysconf("SC_CLK_TCK")
        self.poll()
        self.base = dict(self.seen)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def poll(self) -> None:
        for pid in {p.pid for p in self.procs} | {c for p in self.procs for c in _children(p.pid)}:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                start = fields[19]  # start time: a reused pid is another process
                self.seen[(pid, start)] = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
            except (OSError, ValueError, IndexError):
                pass

    def _run(self) -> None:
        while not self.done.wait(0.5):
            self.poll()

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        self.poll()
        return sum(v - self.base.get(k, 0) for k, v in self.seen.items()) / self.tick


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


def _ports(host: str) -> list[str]:
    return ["--node-manager-port", str(_free_port(host)), "--object-manager-port", str(_free_port(host)),
            "--dashboard-agent-listen-port", str(_free_port(host)), "--dashboard-agent-grpc-port",
            str(_free_port(host)), "--runtime-env-agent-port", str(_free_port(host)),
            "--metrics-export-port", str(_free_port(host)), "--min-worker-port", "0", "--max-worker-port", "0"]


def _wait_nodes(address: str, n: int, procs, timeout: float = 120) -> None:
    code = ("import ray, sys; ray.init(address=sys.argv[1], _node_ip_address=sys.argv[1].split(':')[0], "
            "logging_level='ERROR'); print(sum(1 for x in ray.nodes() if x['Alive']))")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise SystemExit("a Ray node did not start (see nodes.log in the temp folder)")
        r = subprocess.run([sys.executable, "-c", code, address], env=ENV, capture_output=True, text=True, timeout=60)
        if r.returncode == 0 and r.stdout.strip().isdigit() and int(r.stdout.strip()) >= n:
            return
        time.sleep(1)
    raise SystemExit(f"the Ray cluster did not reach {n} nodes in {timeout} s")


def start_cluster(tmp: str, cpus: int, log) -> tuple[str, list]:
    common = ["--block", "--disable-usage-stats", "--num-cpus", str(cpus), "--object-store-memory", "300000000"]
    port = _free_port(HEAD)
    procs = [subprocess.Popen([str(RAY), "start", "--head", "--node-ip-address", HEAD, "--port", str(port),
                               "--include-dashboard=false", "--ray-client-server-port", str(_free_port(HEAD)),
                               "--temp-dir", tmp, *common, *_ports(HEAD)], env=ENV, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)]
    address = f"{HEAD}:{port}"
    try:
        _wait_nodes(address, 1, procs)
        procs.append(subprocess.Popen([str(RAY), "start", "--address", address, "--node-ip-address", WORKER,
                                       *common, *_ports(WORKER)], env=ENV, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        _wait_nodes(address, 2, procs)
    except BaseException:
        stop(procs)
        raise
    return address, procs


def listening(procs) -> list[str]:
    """The TCP sockets the cluster's processes listen on (ss -tlnp, by process id), as
    "address:port process"."""
    pids = {p.pid for p in procs} | {c for p in procs for c in _children(p.pid)}
    try:
        out = subprocess.run(["ss", "-tlnpH"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    found = set()
    for line in out.splitlines():
        cols = line.split()
        who = [p for p in pids if f"pid={p}," in cols[-1]] if len(cols) >= 6 else []
        if who:
            found.add(f"{cols[3]} {cols[-1].split(chr(34))[1] if chr(34) in cols[-1] else who[0]}")
    return sorted(found)


def outside_peers(procs) -> list[str]:
    """TCP connections of the cluster's processes whose either end is not a loopback address
    (ss -tnp, by process id): none when every byte stays on loopback."""
    import ipaddress

    pids = {p.pid for p in procs} | {c for p in procs for c in _children(p.pid)}
    try:
        out = subprocess.run(["ss", "-tnpH"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ["(ss failed)"]
    bad = []
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 6 and any(f"pid={p}," in cols[-1] for p in pids):
            for end in (cols[3], cols[4]):
                host = end.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")
                try:
                    if not ipaddress.ip_address(host).is_loopback:
                        bad.append(line)
                except ValueError:
                    bad.append(line)
    return bad


def stop(procs) -> None:
    """End the nodes and everything they started, by process id."""
    tree = [c for p in procs for c in _children(p.pid)]
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
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


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def line_fit(n1: int, s1: float, n2: int, s2: float) -> dict:
    """seconds = overhead + photos / rate through two runs."""
    per = (s2 - s1) / (n2 - n1)
    return {"photos_per_second": round(1 / per, 1) if per > 0 else None, "overhead_s": round(s1 - n1 * per, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=int, default=20_000)
    ap.add_argument("--small", type=int, default=1_000, help="photos of the small run (the per-job overhead)")
    ap.add_argument("--dir", default="/tmp/bench-ray")
    ap.add_argument("--cpus", type=int, default=2, help="logical CPUs of each node")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--results", default=str(RESULTS), help="folder of ray.{json,md}")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds each embed may take")
    args = ap.parse_args()
    base = Path(args.dir)
    if not str(base.resolve()).startswith("/tmp/"):
        raise SystemExit("--dir must be under /tmp (the copies are deleted at the end)")
    shutil.rmtree(base, ignore_errors=True)
    load_before = uptime()
    runs: dict = {}
    procs: list = []
    outside: list = []  # connections of the cluster with an end off loopback
    tmp = tempfile.mkdtemp(prefix="rtbench-", dir="/tmp")  # short: Ray's socket paths must fit
    try:
        photos = make_photos(base / "photos", args.photos)
        small = subset(photos, base / "photos-small", args.small)
        sets = [("small", small, args.small), ("all", photos, args.photos)]
        for name, src, n in sets:
            wall, cpu, r = run_embed(src, "--out", base / f"local-{name}", "--bottleneck-precision", args.precision,
                                     "-q", timeout=args.timeout)
            runs[f"in_process_{name}"] = {"photos": n, "wall_s": round(wall, 1), "job_s": r["seconds"],
                                          "cpu_s": round(cpu, 1), "load_1min_after": round(os.getloadavg()[0], 2),
                                          "computed": r["computed"], "errors": len(r["errors"]),
                                          "images_per_second": r["images_per_second"], "precision": r["precision"]}
            print(json.dumps(runs[f"in_process_{name}"]), file=sys.stderr, flush=True)
        with open(Path(tmp) / "nodes.log", "wb") as log:
            address, procs = start_cluster(tmp, args.cpus, log)
            listen = listening(procs)
            for name, src, n in sets:
                meter = TreeCPU(procs)
                wall, cpu, r = run_embed(src, "--out", base / f"ray-{name}", "--ray", address,
                                         "--bottleneck-precision", args.precision, "-q", timeout=args.timeout)
                time.sleep(2)  # the actors end after the driver
                cluster = meter.stop()
                runs[f"ray_{name}"] = {"photos": n, "wall_s": round(wall, 1), "job_s": r["seconds"],
                                       "cpu_s": round(cpu + cluster, 1), "driver_cpu_s": round(cpu, 1),
                                       "load_1min_after": round(os.getloadavg()[0], 2),
                                       "computed": r["computed"], "errors": len(r["errors"]),
                                       "images_per_second": r["images_per_second"], "precision": r["precision"]}
                print(json.dumps(runs[f"ray_{name}"]), file=sys.stderr, flush=True)
                outside += outside_peers(procs)
    finally:
        stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    load_after = uptime()
    fits = {}
    for path in ("in_process", "ray"):
        a, b = runs[f"{path}_small"], runs[f"{path}_all"]
        fits[path] = {"wall": line_fit(a["photos"], a["wall_s"], b["photos"], b["wall_s"]),
                      "job": line_fit(a["photos"], a["job_s"], b["photos"], b["job_s"]),
                      "cpu": line_fit(a["photos"], a["cpu_s"], b["photos"], b["cpu_s"])}
    res = {"machine": machine(), "photos": args.photos, "small": args.small, "precision": runs["in_process_all"]["precision"],
           "cpus_per_node": args.cpus, "runs": runs, "fits": fits, "cluster_listens_on": listen,
           "connections_off_loopback": outside,
           "uptime_before": load_before, "uptime_after": load_after}
    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ray.json").write_text(json.dumps(res, indent=1))
    rows = ["| run | photos | wall (process start to end) | embedding job | images/s (job) | CPU time | load after |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for path, label in (("in_process", "in-process"), ("ray", f"Ray, 2 local nodes x {args.cpus} CPUs")):
        for name in ("small", "all"):
            r = runs[f"{path}_{name}"]
            rows.append(f"| {label} | {r['photos']:,} | {r['wall_s']} s | {r['job_s']:.1f} s | {r['images_per_second']} | "
                        f"{r['cpu_s']} s | {r['load_1min_after']} |")
    rows += ["", "| path | per-photo rate (wall fit) | per-job overhead (wall fit) | rate (job fit) | overhead (job fit) "
             "| photos per CPU-second | CPU overhead |", "|---|---:|---:|---:|---:|---:|---:|"]
    for path in ("in_process", "ray"):
        w, j, c = fits[path]["wall"], fits[path]["job"], fits[path]["cpu"]
        rows.append(f"| {path} | {w['photos_per_second']} photos/s | {w['overhead_s']} s | "
                    f"{j['photos_per_second']} photos/s | {j['overhead_s']} s | {c['photos_per_second']} | "
                    f"{c['overhead_s']} s |")
    rows += ["", f"Precision {res['precision']}; the cluster's listening sockets: {', '.join(listen) or '?'}; "
             f"its connections with an end off loopback (after each run): {len(outside)}.",
             f"Load before: `{load_before}`; after: `{load_after}`."]
    body = "\n".join(rows)
    append_markdown(out_dir / "ray.md", f"embed {args.photos} photos ({machine()})", body)
    print(body)


if __name__ == "__main__":
    main()
