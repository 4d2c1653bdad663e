"""`retrain fit --features STORE` at scale: head training time and peak memory of both optimisers.

    nice -n 19 python benchmarks/bench_store.py --rows 200000,1000000,10000000 --dir /tmp/bench-store

For each size a synthetic store (the real backbone's identity, 1280 float16 features per row,
5 classes, written in row groups, never held in memory) is made on disk, `retrain fit
--features` is run on it in a fresh process (wall time, peak RSS of that process alone), and
the store is deleted. Memory: the kernel's peak RSS of that process (wait4), and from /proc
polled twice a second its anonymous part (RssAnon: the heap, what the fit itself holds; the
store is read with read(), not mapped, so its page cache is not in the process's RSS) and USS.
L-BFGS (in memory) runs where the float32 features fit in --lbfgs-upto
rows; the streamed optimiser runs on every size. The disk must hold 2.6 GB per million rows
(checked with the free space first). Results: benchmarks/results/store.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, append_markdown, machine  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def make_store(root: Path, rows: int, *, classes: int = 5, seed: int = 0, file_rows: int = 262_144) -> Path:
    """A synthetic store of `rows` rows, class-dependent features (centre + noise, non-negative as
    pooled ReLU features are), written file by file, row group by row group."""
    import pyarrow.parquet as pq

    from retrain.architectures import get_backbone
    from retrain.store import ROW_GROUP_ROWS, FeatureStore
    from retrain.store_format import WRITE_OPTIONS, rows_table, schema

    bb = get_backbone("efficientnet_lite0")
    st = FeatureStore.create(root, bb, precision="fp32", dtype="float16")
    rng = np.random.default_rng(seed)
    C = bb.feature_dim
    base = np.abs(rng.normal(0.6, 0.5, C))
    centres = (base + rng.normal(0, 0.045, (classes, C))).astype(np.float32)  # near each other: ~90% accuracy
    bank = rng.normal(0, 1.0, (65_536, C)).astype(np.float32)  # noise rows, drawn from at random
    done = 0
    while done < rows:
        n_file = min(file_rows, rows - done)
        path = f"{st.path}/part-synthetic-{done:012d}.parquet"
        with pq.ParquetWriter(path, schema(C, "float16"), **WRITE_OPTIONS) as w:
            for s in range(0, n_file, ROW_GROUP_ROWS):
                n = min(ROW_GROUP_ROWS, n_file - s)
                y = rng.integers(0, classes, n)
                X = np.maximum(centres[y] + bank[rng.integers(0, len(bank), n)], 0)
                i0 = done + s
                keys = [int(i0 + i).to_bytes(16, "little") for i in range(n)]
                paths = [f"/synthetic/c{c}/img_{i0 + i:09d}.jpg" for i, c in enumerate(y)]
                w.write_table(rows_table(C, "float16", keys, paths, [f"c{c}" for c in y], X),
                              row_group_size=ROW_GROUP_ROWS)
        done += n_file
    return root


def _proc_mem(pid: int) -> dict | None:
    """KiB of one process now: VmRSS, its anonymous and file-backed parts (RssAnon, RssFile:
    shared libraries and any mapped file; page cache of files read with read() is in neither),
    and USS (Private_Clean + Private_Dirty of smaps_rollup)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            st = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)
                  if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")}
        uss = 0
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith(("Private_Clean:", "Private_Dirty:")):
                        uss += int(line.split()[1])
        except OSError:
            uss = None
        return st | {"USS": uss}
    except (OSError, ValueError):
        return None


def run_measured(*args, every: float = 0.5) -> tuple[float, dict, subprocess.CompletedProcess]:
    """`python -m retrain ARGS` in a fresh process, its memory polled from /proc every `every`
    seconds; the kernel's own peak (wait4's ru_maxrss of that one child) is taken too.
    Returns (wall s, memory figures in MiB with a coarse timeline, the result)."""
    import threading

    cmd = [sys.executable, "-m", "retrain", *map(str, args)]
    t0 = time.perf_counter()
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
    peaks: dict = {}
    timeline: list = []
    done = threading.Event()

    def poll():
        last = -1e9
        while not done.is_set():
            m = _proc_mem(p.pid)
            if m:
                for k, v in m.items():
                    if v is not None:
                        peaks[k] = max(peaks.get(k, 0), v)
                now = time.perf_counter() - t0
                if now - last >= 10:
                    timeline.append([round(now), m["VmRSS"] // 1024, m["RssAnon"] // 1024])
                    last = now
            done.wait(every)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    _pid, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    cp = subprocess.CompletedProcess(cmd, p.returncode, out.read(), err.read())
    out.close()
    err.close()
    if p.returncode != 0:
        raise SystemExit(f"retrain {' '.join(map(str, args))} failed:\n{cp.stderr[-2000:]}")
    mem = {"peak_rss_mib": ru.ru_maxrss // 1024, "peak_rss_polled_mib": peaks.get("VmRSS", 0) // 1024,
           "peak_anon_mib": peaks.get("RssAnon", 0) // 1024, "peak_file_mib": peaks.get("RssFile", 0) // 1024,
           "peak_uss_mib": peaks.get("USS", 0) // 1024, "timeline_s_rss_anon_mib": timeline}
    return wall, mem, cp


def fit(store: Path, out: Path, optimizer: str) -> dict:
    wall, mem, cp = run_measured("fit", "--features", store, "-o", out, "--optimizer", optimizer, "-q")
    report = json.loads((out / "report.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {"optimizer": optimizer, "wall_s": round(wall, 1), **mem,
            "train_s": report["timings"].get("train_s"), "load_s": report["timings"].get("bottlenecks_s"),
            "rows_per_second": report["train"].get("rows_per_second"),
            "test_accuracy": report["metrics"]["test"]["accuracy"], "test_n": report["metrics"]["test"]["n"],
            "l2": report["train"].get("l2"), "line": cp.stdout.strip()}


def dumps(d: dict) -> str:
    """JSON, indented, with each [t, rss, anon] point of a timeline on one line."""
    import re

    return re.sub(r"\[\s+(\d+),\s+(\d+),\s+(\d+)\s+\]", r"[\1, \2, \3]", json.dumps(d, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="200000,1000000,10000000")
    ap.add_argument("--dir", default="/tmp/bench-store")
    ap.add_argument("--results", default=str(RESULTS), help="folder of store.{json,md}")
    ap.add_argument("--lbfgs-upto", type=int, default=400_000, help="run L-BFGS too up to this many rows")
    args = ap.parse_args()
    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.results)
    results = []
    load = [os.getloadavg()[0]]

    def save() -> None:  # after every fit: a long run's figures so far are on disk
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "store.json").write_text(dumps(
            {"machine": machine(), "load_1min_before": round(load[0], 2), "results": results}))

    for rows in [int(r) for r in args.rows.split(",")]:
        need = rows * 1280 * 2 * 1.05
        free = shutil.disk_usage(base).free
        if free < need + 5e9:
            print(f"skipping {rows} rows: {free / 1e9:.0f} GB free, {need / 1e9:.0f} GB needed", file=sys.stderr)
            continue
        store = base / f"store-{rows}"
        shutil.rmtree(store, ignore_errors=True)
        try:
            t0 = time.perf_counter()
            make_store(store, rows)
            made = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in store.rglob("*.parquet"))
            print(f"{rows} rows: store of {size / 1e9:.1f} GB made in {made:.0f} s", file=sys.stderr, flush=True)
            for opt in (["lbfgs"] if rows <= args.lbfgs_upto else []) + ["stream"]:
                la = os.getloadavg()[0]
                r = fit(store, base / f"run-{rows}-{opt}", opt)
                r |= {"rows": rows, "store_gb": round(size / 1e9, 2), "store_made_s": round(made),
                      "load_1min_at_start": round(la, 2), "load_1min_at_end": round(os.getloadavg()[0], 2)}
                print(json.dumps({k: v for k, v in r.items() if k != "timeline_s_rss_anon_mib"}), file=sys.stderr,
                      flush=True)
                results.append(r)
                save()
        finally:
            shutil.rmtree(store, ignore_errors=True)
    save()
    lines = ["| rows | store | optimiser | fit wall | head training | peak RSS | of it anonymous (USS) | test accuracy |",
             "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['rows']:,} | {r['store_gb']} GB | {r['optimizer']} | {r['wall_s']} s | {r['train_s']} s | "
                     f"{r['peak_rss_mib']:,} MiB | {r['peak_anon_mib']:,} MiB ({r['peak_uss_mib']:,} MiB) | "
                     f"{r['test_accuracy']:.1%} (n={r['test_n']}) |")
    append_markdown(out_dir / "store.md", f"fit --features ({machine()})", "\n".join(lines))
    print("\n".join(lines))

if __name__ == "__main__":
    main()
