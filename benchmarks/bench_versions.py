"""A commit against the working tree: the same `retrain fit` commands, interleaved, same machine.

    python benchmarks/bench_versions.py --ref fe91f6e            # cold + warm fit of the flowers
    python benchmarks/bench_versions.py --ref HEAD~3 --rounds 5 --no-append
    python benchmarks/bench_versions.py --ref 6bae663 --rounds 1 --fit-args="--fine-tune" --kinds cold

The old code is checked out into a temporary git worktree and run with PYTHONPATH pointing at
it, in the same virtualenv; rounds alternate old/new so that machine load hits both alike.
Cold: an empty bottleneck cache (and a shared, already-exported backbone graph, so both time
the work, not the one-time ONNX export). Warm: the same command again on the filled cache.
--fit-args adds flags to every timed fit (the warm-up, which exports the graphs, runs them on
8 photos per class with --epochs 1). Prints medians, the ratio new/old and whether the test
accuracies agree; appends to BENCHMARKS.md unless --no-append.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FLOWERS, ROOT, append_markdown, machine  # noqa: E402


def fit_once(code: Path, data: Path, out: Path, cache: Path, backbones: Path, extra=()) -> tuple[float, float]:
    """(wall seconds, test accuracy) of one `retrain fit` run with the code in `code`."""
    env = dict(os.environ, PYTHONPATH=str(code), RETRAIN_CACHE=str(cache))
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / "backbones").exists():
        (cache / "backbones").symlink_to(backbones)
    t0 = time.perf_counter()
    # cwd: `python -m` puts the working folder first on sys.path, which would shadow PYTHONPATH.
    p = subprocess.run([sys.executable, "-m", "retrain", "fit", str(data), "-o", str(out), "-q",
                        "--cache-dir", str(cache / "bottlenecks"), *extra], capture_output=True, text=True, env=env,
                       cwd=str(cache.parent))
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"retrain fit failed with {code}:\n{p.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    version = subprocess.run([sys.executable, "-c", "import retrain, os; print(os.path.dirname(retrain.__file__))"],
                             capture_output=True, text=True, env=env, cwd=str(cache.parent)).stdout.strip()
    if not version.startswith(str(code)):
        raise SystemExit(f"ran the code in {version}, not {code}")
    return wall, report["metrics"]["test"]["accuracy"]


def few_photos(data: Path, out: Path, per_class: int = 8) -> Path:
    """A folder of links to the first photos of each class: a warm-up fit that exports the graphs."""
    for d in sorted(p for p in data.iterdir() if p.is_dir()):
        (out / d.name).mkdir(parents=True)
        for f in sorted(d.iterdir())[:per_class]:
            (out / d.name / f.name).symlink_to(f.resolve())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", required=True, help="the commit to compare with (e.g. fe91f6e)")
    ap.add_argument("--new", default=None, help="a second commit in place of this tree")
    ap.add_argument("--data", type=Path, default=FLOWERS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fit-args", default="", help='flags for every fit, e.g. --fit-args="--fine-tune"')
    ap.add_argument("--kinds", default="cold,warm", help="comma list of: cold, warm (default both)")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"no photos at {args.data}")
    extra, kinds = shlex.split(args.fit_args), args.kinds.split(",")
    if not kinds or set(kinds) - {"cold", "warm"}:
        raise SystemExit(f"--kinds takes cold and/or warm, got {args.kinds}")
    with tempfile.TemporaryDirectory(prefix="retrain-versions-") as tmpd:
        tmp = Path(tmpd)
        old = tmp / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.ref],
                       check=True, capture_output=True)
        new = ROOT
        if args.new:
            new = tmp / "new"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(new), args.new],
                           check=True, capture_output=True)
        try:
            backbones = tmp / "backbones"
            backbones.mkdir()
            # Export the backbone graph once, outside the timing (both versions share its file).
            warmup = tmp / "warmup"
            fit_once(ROOT, few_photos(args.data, warmup / "photos") if extra else args.data, warmup / "run",
                     warmup / "cache", backbones, [*extra, "--epochs", "1"] if extra else ())
            times = {"old": {k: [] for k in kinds}, "new": {k: [] for k in kinds}}
            acc = {}
            for r in range(args.rounds):
                for name, code in (("old", old), ("new", new)) if r % 2 == 0 else (("new", new), ("old", old)):
                    cache = tmp / f"{name}-{r}"
                    for kind in kinds:  # warm: the cache the cold fit filled
                        wall, a = fit_once(code, args.data, cache / "run", cache, backbones, extra)
                        times[name][kind].append(wall)
                        acc[name] = a
                        print(f"round {r + 1}: {name} {kind} fit {wall:.2f} s (test accuracy {a:.2%})", flush=True)
                    shutil.rmtree(cache, ignore_errors=True)
        finally:
            for wt in (old, tmp / "new"):
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(wt)], capture_output=True)
    med = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in times.items()}
    newname = args.new or "this tree"
    flags = (f' --fit-args="{args.fit_args}"' if extra else "") + (f" --kinds {args.kinds}" if kinds != ["cold", "warm"]
                                                                    else "")
    lines = [f"`python benchmarks/bench_versions.py --ref {args.ref}{' --new ' + args.new if args.new else ''} "
             f"--rounds {args.rounds}{flags}` on {machine()}, {args.data.name}:", "",
             f"| fit | {args.ref} (median) | {newname} (median) | new / old |", "|---|---:|---:|---:|"]
    for kind in kinds:
        o, n = med["old"][kind], med["new"][kind]
        lines.append(f"| {kind} | {o:.2f} s | {n:.2f} s | {n / o:.3f} |")
    lines += ["", f"Test accuracy: {args.ref} {acc['old']:.2%}, {newname} {acc['new']:.2%}."]
    print("\n".join(lines))
    if not args.no_append:
        append_markdown(ROOT / "BENCHMARKS.md", "Before and after (bench_versions.py)", "\n".join(lines))


if __name__ == "__main__":
    main()
