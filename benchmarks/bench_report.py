"""Issue 4 benchmark: what seeing a run costs on the flowers (2,934 photos).

    python benchmarks/bench_report.py [--data DIR] [--cache-dir DIR] [--out benchmarks/results/report.md]

All through the real CLI in subprocesses, with warm bottlenecks (a first fit fills the cache):
fit with and without --summaries_dir (the difference is the TensorBoard cost), `retrain report`,
`retrain check` (decodes every photo, perceptual hashes), the cheap check that every fit runs
(in-process, on the scan), a 3-value learning-rate sweep and `retrain compare` of it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FLOWERS, ROOT, machine, timed_cli  # noqa: E402


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(FLOWERS))
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "retrain-bench-cache"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "report.md"))
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-report-"))
    sgd = ["--learning_rate", "0.01", "--how_many_training_steps", "500", "--cache-dir", a.cache_dir, "-q"]
    rows = []

    timed_cli("fit", a.data, "-o", work / "warmup", *sgd)  # fills the bottleneck cache
    t_plain, _, _ = timed_cli("fit", a.data, "-o", work / "plain", *sgd)
    t_tb, _, _ = timed_cli("fit", a.data, "-o", work / "tb", *sgd, "--summaries_dir", work / "summaries")
    rows.append(("fit, SGD 500 steps, warm bottlenecks", f"{t_plain:.1f} s", "report.html included"))
    rows.append(("same with --summaries_dir", f"{t_tb:.1f} s",
                 f"+{t_tb - t_plain:.1f} s; event files + projector {_size(work / 'summaries') / 2**20:.1f} MiB"))
    t_rep, _, _ = timed_cli("report", work / "plain")
    rows.append(("retrain report RUN (rewrite report.html)", f"{t_rep:.2f} s",
                 f"report.html {_size(work / 'plain' / 'report.html') / 1024:.0f} KiB"))
    t_chk, rss, cp = timed_cli("check", a.data, "--json")
    f = json.loads(cp.stdout)
    rows.append(("retrain check DIR (decode all, pHash)", f"{t_chk:.1f} s",
                 f"{f['total']} images: {len(f['corrupt'])} corrupt, {len(f['exact_duplicates'])} exact-duplicate "
                 f"groups ({sum(d['cross_class'] for d in f['exact_duplicates'])} across classes), "
                 f"{len(f['near_duplicates'])} near-duplicate groups, {len(f['tiny'])} tiny; peak {rss} MiB"))

    sys.path.insert(0, str(ROOT))
    from retrain.check import quick_check
    from retrain.scan import scan

    s = scan(a.data, quiet=True)
    t0 = time.perf_counter()
    w = quick_check(s)
    rows.append(("quick check inside fit (after the scan)", f"{(time.perf_counter() - t0) * 1000:.0f} ms",
                 f"{len(w)} warnings"))

    t_sw, _, _ = timed_cli("fit", a.data, "-o", work / "sweep", "--learning_rate", "0.005,0.1,1.0",
                           "--how_many_training_steps", "500", "--cache-dir", a.cache_dir, "-q")
    rows.append(("fit --learning_rate 0.005,0.1,1.0 (3 runs, warm)", f"{t_sw:.1f} s", "one process"))
    t_cmp, _, cp = timed_cli("compare", work / "sweep", "--html", work / "compare.html")
    rows.append(("retrain compare (3 runs, table + plot + HTML)", f"{t_cmp:.2f} s", ""))

    body = [f"Machine: {machine()}", "", f"Command: `python benchmarks/bench_report.py --data {a.data}`", "",
            "| what | wall | notes |", "|---|---|---|"]
    body += [f"| {x} | {y} | {z} |" for x, y, z in rows]
    body += ["", "Sweep on the flowers, `retrain compare` output:", "", "```", cp.stdout.rstrip(), "```"]
    text = "# Reports, checks, TensorBoard, comparisons (issue 4)\n\n" + "\n".join(body) + "\n"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
