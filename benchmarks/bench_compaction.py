"""What compacting a bottleneck cache costs: the merged shard written from the arrays in memory
(BottleneckCache.compact) against a copy of every row first, then the write (how compact worked
before), on a cache the size of a fine-tune's activations, in one process, interleaved rounds.

    python benchmarks/bench_compaction.py [--shards 100] [--rows 170] [--rounds 2]

The rows are float16 activations of Lite0's prefix at the default --unfreeze 8 (80 x 14 x 14),
written as the cache writes them while computing: one shard a second, about 170 views each.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--rows", type=int, default=170)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    import pyarrow as pa

    from retrain import cache as cache_mod
    from retrain.architectures import get_backbone

    bb = dataclasses.replace(get_backbone("efficientnet_lite0").at_size(224), name="efficientnet_lite0-prefix8",
                             feature_dim=80 * 14 * 14)
    rng = np.random.default_rng(0)
    times = {"copy, then write (before)": [], "from the arrays in memory (now)": []}
    with tempfile.TemporaryDirectory(prefix="bench-compaction-") as tmp:
        for rnd in range(a.rounds):
            for name in times:
                folder = Path(tmp) / f"{rnd}-{len(times[name])}-{name[:4]}"
                c = cache_mod.BottleneckCache(folder, bb, dtype="float16")
                for s in range(a.shards):
                    keys = [rng.bytes(16) for _ in range(a.rows)]
                    c.add(keys, rng.standard_normal((a.rows, bb.feature_dim), dtype=np.float32).astype(np.float16))
                    c.flush()
                t0 = time.perf_counter()
                if name.startswith("copy"):
                    keys = list(c._index)
                    k = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 16)
                    c._write_shard(k, c.get(keys))
                else:
                    c._write_table(pa.concat_tables(c._tables()))
                times[name].append(time.perf_counter() - t0)
                del c
    gb = a.shards * a.rows * bb.feature_dim * 2 / 1e9
    print(f"Machine: {machine()}; {a.shards} shards of {a.rows} rows, {gb:.2f} GB of float16, {a.rounds} rounds\n")
    print("| merged shard | seconds (median) | / before |")
    print("|---|---:|---:|")
    base = statistics.median(times["copy, then write (before)"])
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.2f} | {statistics.median(ts) / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
