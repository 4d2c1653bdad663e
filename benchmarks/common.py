"""Helpers shared by the benchmark scripts: machine description, timing, peak memory, output."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOWERS = ROOT.parent / "shared" / "data" / "flower_photos"


def machine() -> str:
    from retrain.runtime import cpu_name

    cpu = cpu_name()
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    import numpy
    import onnxruntime

    return (f"{cpu}, {os.cpu_count()} cores{mem}; Python {platform.python_version()}, "
            f"onnxruntime {onnxruntime.__version__}, numpy {numpy.__version__}")


def timed_cli(*args, env=None) -> tuple[float, int, subprocess.CompletedProcess]:
    """Run `retrain ARGS` in a fresh wrapper process; (wall seconds, peak RSS MiB, result).

    The wrapper's RUSAGE_CHILDREN max RSS is the peak of that one command alone.
    """
    code = ("import resource, subprocess, sys, time, json\n"
            "t = time.perf_counter()\n"
            "p = subprocess.run([sys.executable, '-m', 'retrain', *sys.argv[1:]], capture_output=True, text=True)\n"
            "wall = time.perf_counter() - t\n"
            "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
            "print(json.dumps({'wall': wall, 'rss_kb': rss, 'rc': p.returncode, 'out': p.stdout, 'err': p.stderr}))\n")
    e = dict(os.environ)
    e.update(env or {})
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=e)
    import json

    d = json.loads(r.stdout)
    cp = subprocess.CompletedProcess(args, d["rc"], d["out"], d["err"])
    if d["rc"] != 0:
        raise SystemExit(f"retrain {' '.join(map(str, args))} failed:\n{d['err'][-2000:]}")
    return d["wall"], d["rss_kb"] // 1024, cp


def append_markdown(path: Path, title: str, body: str) -> None:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    with open(path, "a") as f:
        f.write(f"\n### {title} ({stamp})\n\n{body.rstrip()}\n")


class Timer:
    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *a):
        self.s = time.perf_counter() - self.t
