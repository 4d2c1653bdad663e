"""Load test of `retrain serve` on loopback: requests/s and p50/p99 latency at concurrency 1, 4, 16.

    python benchmarks/bench_serve.py [RUN] [--requests 400] [--seconds 20] [--out FILE]

Starts `retrain serve RUN -q` on 127.0.0.1 (a free port; nothing else is ever targeted), then
for each concurrency C keeps C keep-alive connections busy POSTing the example flower photos
(raw JPEG bodies, one image per request) until `--requests` answers or `--seconds` have passed,
after a short warm-up. The client is a few lines of asyncio sockets, so that it costs the server
as little CPU as possible on a small machine. Without RUN, trains one on examples/flowers first.
"""

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from retrain.runtime import cpu_name

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "flowers"
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


async def request(reader, writer, path: str, body: bytes, ctype="image/jpeg") -> tuple[int, bytes]:
    """One HTTP/1.1 keep-alive request: (status, body)."""
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: {ctype}\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(v) for k, _, v in (ln.partition(":") for ln in lines[1:]) if k.lower() == "content-length")
    return status, await reader.readexactly(length)


async def run_level(port: int, photos: list[bytes], concurrency: int, n_requests: int, seconds: float,
                    warmup: int) -> dict:
    latencies, errors, counter = [], [], {"sent": 0}
    stop_at = [0.0]

    async def worker(i: int):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            for w in range(warmup):  # first requests per connection are not timed
                await request(reader, writer, "/v1/classify", photos[(i + w) % len(photos)])
            await start.wait()
            k = i
            while counter["sent"] < n_requests and time.perf_counter() < stop_at[0]:
                counter["sent"] += 1
                t0 = time.perf_counter()
                status, body = await request(reader, writer, "/v1/classify", photos[k % len(photos)])
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    errors.append((status, body[:200]))
                k += concurrency
        finally:
            writer.close()

    start = asyncio.Event()
    tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    await asyncio.sleep(0.5 + 0.1 * warmup * concurrency)  # let the warm-up finish
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    start.set()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": len(latencies), "errors": len(errors), "seconds": round(wall, 2),
            "rps": round(len(latencies) / wall, 1), "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1), "mean_ms": round(float(lat.mean()), 1),
            "first_error": errors[0] if errors else None}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads (Linux /proc), or NaN."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def health(port: int) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=5) as r:
        return json.loads(r.read())


def start_server(run, port, extra) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "retrain", "serve", str(run), "--host", HOST, "--port", str(port),
                             "-q", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"retrain serve exited {proc.returncode}: {proc.stderr.read()}")
        try:
            health(port)
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("retrain serve did not start within 90 s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?", help="run folder or .onnx (default: train one on examples/flowers)")
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated levels (default 1,4,16)")
    ap.add_argument("--requests", type=int, default=400, help="most timed requests per level (default 400)")
    ap.add_argument("--seconds", type=float, default=20.0, help="most seconds per level (default 20)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed requests per connection first (default 2)")
    ap.add_argument("--server-args", default="", help="extra `retrain serve` flags, e.g. '--max-batch 8'")
    ap.add_argument("--out", help="also write the markdown table here")
    a = ap.parse_args()
    levels = [int(c) for c in a.concurrency.split(",")]
    if not (1 <= a.requests <= 100_000 and 0 < a.seconds <= 600 and all(1 <= c <= 256 for c in levels)):
        raise SystemExit("bounds: 1..100000 requests, 0..600 s per level, concurrency 1..256")

    tmp = tempfile.TemporaryDirectory(prefix="bench-serve-")
    run = a.run
    if run is None:
        run = Path(tmp.name) / "run"
        print(f"training a run on {EXAMPLES} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "retrain", "fit", str(EXAMPLES), "-o", str(run), "-q"], check=True)
    photos = [p.read_bytes() for p in sorted(EXAMPLES.glob("*/*.jpg"))]
    port = free_port()
    proc = start_server(run, port, a.server_args.split())
    rows = []
    try:
        model_id = health(port)["model_id"]
        for c in levels:
            before = health(port)
            cpu0 = cpu_seconds(proc.pid)
            r = asyncio.run(run_level(port, photos, c, a.requests, a.seconds, a.warmup))
            cpu1 = cpu_seconds(proc.pid)
            after = health(port)
            served = after["images"] - before["images"]  # includes the untimed warm-up requests
            r["cpu_ms"] = round((cpu1 - cpu0) * 1000 / max(1, served), 1)
            r["cores_used"] = round(r["rps"] * r["cpu_ms"] / 1000, 2)  # CPU the server got while timed
            r["mean_batch"] = round((after["images"] - before["images"]) / max(1, after["batches"] - before["batches"]), 2)
            rows.append(r)
            print(f"concurrency {c:>3}: {r['rps']:7.1f} requests/s  p50 {r['p50_ms']:6.1f} ms  "
                  f"p99 {r['p99_ms']:6.1f} ms  ({r['requests']} requests, {r['errors']} errors, "
                  f"mean model batch {r['mean_batch']}, server CPU {r['cpu_ms']} ms/request, {r['cores_used']} cores)", file=sys.stderr)
            if r["errors"]:
                print(f"  first error: {r['first_error']}", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(15)
        tmp.cleanup()

    sizes = [len(p) for p in photos]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"`retrain serve` load test: {len(photos)} example flower JPEGs ({min(sizes) // 1024}-{max(sizes) // 1024} KB), "
             f"one image per request, raw body, keep-alive, 127.0.0.1.",
             f"Model {model_id}; server flags: `{('-q ' + a.server_args).strip()}`.",
             f"Machine: {os.cpu_count()} cores, {cpu_name()}; Python {platform.python_version()}; "
             f"load average at the end {load:.2f}.",
             f"Command: `python benchmarks/bench_serve.py{' ' + str(a.run) if a.run else ''} --requests {a.requests} "
             f"--seconds {a.seconds:g}{' --server-args ' + repr(a.server_args) if a.server_args else ''}`", "",
             "Server CPU ms/request: CPU time the server process used per request served (all its "
             "threads); 1000 x cores / that is the most requests/s these cores could give it alone. "
             "Server cores used = requests/s x CPU ms/request: below the core count when other "
             "programs share the machine.", "",
             "| concurrency | requests/s (= images/s) | p50 ms | p99 ms | mean ms | requests | errors | "
             "mean model batch | server CPU ms/request | server cores used |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['concurrency']} | {r['rps']} | {r['p50_ms']} | {r['p99_ms']} | {r['mean_ms']} | {r['requests']} | "
              f"{r['errors']} | {r['mean_batch']} | {r['cpu_ms']} | {r['cores_used']} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if a.out:
        Path(a.out).write_text(table + "\n")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
