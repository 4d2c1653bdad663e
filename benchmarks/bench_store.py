"""`retrain fit --features STORE` at scale: head training time and peak memory of both optimisers.

    python benchmarks/bench_store.py --rows 200000,1000000,10000000 --dir /tmp/bench-store

For each size a synthetic store (the real backbone's identity, 1280 float16 features per row,
5 classes, written in row groups, never held in memory) is made on disk, `retrain fit
--features` is run on it in a fresh process (wall time, peak RSS of that process alone), and
the store is deleted. L-BFGS (in memory) runs where the float32 features fit in --lbfgs-upto
rows; the streamed optimiser runs on every size. The disk must hold 2.6 GB per million rows
(checked with the free space first). Results: benchmarks/results/store.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, append_markdown, machine, timed_cli  # noqa: E402

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


def fit(store: Path, out: Path, optimizer: str) -> dict:
    wall, rss, cp = timed_cli("fit", "--features", store, "-o", out, "--optimizer", optimizer, "-q")
    report = json.loads((out / "report.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {"optimizer": optimizer, "wall_s": round(wall, 1), "peak_rss_mib": rss,
            "train_s": report["timings"].get("train_s"), "load_s": report["timings"].get("bottlenecks_s"),
            "test_accuracy": report["metrics"]["test"]["accuracy"], "test_n": report["metrics"]["test"]["n"],
            "l2": report["train"].get("l2"), "line": cp.stdout.strip()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="200000,1000000,10000000")
    ap.add_argument("--dir", default="/tmp/bench-store")
    ap.add_argument("--lbfgs-upto", type=int, default=400_000, help="run L-BFGS too up to this many rows")
    args = ap.parse_args()
    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        need = rows * 1280 * 2 * 1.05
        free = shutil.disk_usage(base).free
        if free < need + 5e9:
            print(f"skipping {rows} rows: {free / 1e9:.0f} GB free, {need / 1e9:.0f} GB needed", file=sys.stderr)
            continue
        store = base / f"store-{rows}"
        shutil.rmtree(store, ignore_errors=True)
        t0 = time.perf_counter()
        make_store(store, rows)
        made = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in store.rglob("*.parquet"))
        print(f"{rows} rows: store of {size / 1e9:.1f} GB made in {made:.0f} s", file=sys.stderr, flush=True)
        for opt in (["lbfgs"] if rows <= args.lbfgs_upto else []) + ["stream"]:
            r = fit(store, base / f"run-{rows}-{opt}", opt)
            r |= {"rows": rows, "store_gb": round(size / 1e9, 2)}
            print(json.dumps(r), file=sys.stderr, flush=True)
            results.append(r)
        shutil.rmtree(store, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "store.json").write_text(json.dumps({"machine": machine(), "results": results}, indent=1))
    lines = ["| rows | store | optimiser | fit wall | head training | peak RSS | test accuracy |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['rows']:,} | {r['store_gb']} GB | {r['optimizer']} | {r['wall_s']} s | {r['train_s']} s | "
                     f"{r['peak_rss_mib']} MiB | {r['test_accuracy']:.1%} (n={r['test_n']}) |")
    append_markdown(RESULTS / "store.md", f"fit --features ({machine()})", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
