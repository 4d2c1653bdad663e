"""Accuracy and wall time of `retrain fit` on the flowers: head only, head + distortions, fine-tuning.

Each configuration runs the real CLI in a subprocess with its own fresh bottleneck cache (so
the times are cold: every bottleneck, view and activation is computed), then reads the run's
report.json. The test split is only read at the end, as the report gives it; nothing is chosen
on it. Optionally (--tta) each model is also evaluated on its test images with test-time
augmentation through `retrain evaluate --tta`.

    python benchmarks/bench_accuracy.py [--data ../shared/data/flower_photos] [--only head,...]
        [--small 10,30 --draws 3] [--demo]

--small N,...: the small-data case: N photos per class drawn (seeded) from the flowers that are
not in the fixed split's test photos; each draw is fitted twice, as `retrain fit` does now
(k-fold cross-validation, head on every photo) and with the fixed split forced
(`--cross-validate-below 0`: chosen on validation, refitted on train + validation), and both models are evaluated on the 298 test photos, which
neither saw. --demo: the same for the 60 photos of examples/flowers, evaluated on the other
2,874 flowers.

Writes benchmarks/results/accuracy-run.md (and .json); --out names another file.
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


ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "flower_photos"

CONFIGS = {
    "head": [],
    "head+distortions": ["--flip_left_right", "--random_crop", "10", "--random_scale", "10",
                         "--random_brightness", "10", "--augment", "4"],
    "fine-tune": ["--fine-tune"],
}


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return dt


def tta_accuracy(run_dir: Path, data: Path, work: Path) -> dict:
    """`retrain evaluate --tta` and `--no-tta` on the run's own test images (a folder of links)."""
    split = json.loads((run_dir / "split.json").read_text())
    test = work / "test-images"
    shutil.rmtree(test, ignore_errors=True)
    for rel in split["files"]["test"]:
        dst = test / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(data / rel, dst)
    out = {}
    for flag in ("--no-tta", "--tta"):
        p = subprocess.run([sys.executable, "-m", "retrain", "evaluate", str(run_dir), str(test), "--json", "-q",
                            flag], capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"evaluate failed:\n{p.stderr[-2000:]}")
        out[flag.strip("-")] = json.loads(p.stdout)["accuracy"]
    return out


def fixed_test_split(data: Path) -> tuple[dict, set]:
    """{class: [paths not in the test split]}, {test paths}: the split `retrain fit` makes."""
    from retrain.scan import scan
    from retrain.split import split_items

    s = scan(str(data), quiet=True)
    assign = split_items(s.items, classes=s.classes)
    pool = {c: sorted(it.path for it in s.items if it.label == c and assign[it.path] != "test") for c in s.classes}
    return pool, {it.path for it in s.items if assign[it.path] == "test"}


def link_folder(paths, root: Path, folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    for p in paths:
        rel = Path(p).resolve().relative_to(root) if Path(p).resolve().is_relative_to(root) else \
            Path(Path(p).parent.name) / Path(p).name
        dst = folder / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(Path(p).resolve(), dst)
    return folder


def evaluate_on(run_dir: Path, folder: Path) -> dict:
    p = subprocess.run([sys.executable, "-m", "retrain", "evaluate", str(run_dir), str(folder), "--json", "-q"],
                       capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"evaluate failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout)


def small_data_rows(train_dir: Path, held: Path, tmp: Path, cache: Path, label: str) -> list[dict]:
    """Fit `train_dir` as now (small-data regime) and with the fixed split forced; score both on `held`."""
    rows = []
    for regime, extra in (("cross-validation (now)", []), ("fixed split forced", ["--cross-validate-below", "0"])):
        run_dir = tmp / f"{label}-{len(rows)}"
        cmd = [sys.executable, "-m", "retrain", "fit", str(train_dir), "-o", str(run_dir), "--cache-dir", str(cache),
               "-q", *extra]
        wall = run(cmd)
        rep = json.loads((run_dir / "report.json").read_text())
        ev = evaluate_on(run_dir, held)
        cv = rep["metrics"].get("cross_validation")
        rows.append({"case": label, "regime": regime, "flags": " ".join(extra), "wall_s": round(wall, 1),
                     "reported": (f"cross-validated {cv['accuracy']:.1%} ({cv['interval_95'][0]:.1%}-"
                                  f"{cv['interval_95'][1]:.1%}, n={cv['n']})") if cv else
                     (f"test {rep['metrics']['test']['accuracy']:.1%} (n={rep['metrics']['test']['n']}), "
                      f"validation {rep['metrics']['validation']['accuracy']:.1%} "
                      f"(n={rep['metrics']['validation']['n']})"),
                     "held_out_accuracy": ev["accuracy"], "held_out_n": ev["n"], "l2": rep["train"]["l2"],
                     "temperature": rep["calibration"]["temperature"]})
        print(f"  {label}, {regime}: {rows[-1]['reported']}; on {ev['n']} photos it never saw "
              f"{ev['accuracy']:.2%}", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--only", default=",".join(CONFIGS), help="comma list of: " + ", ".join(CONFIGS))
    ap.add_argument("--tta", action="store_true", help="also evaluate each model with test-time augmentation")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each configuration this many times (fine-tuning is not bit-for-bit repeatable: "
                         "report the spread)")
    ap.add_argument("--seeds", default="0",
                    help="comma list of --seed values, each configuration run once per seed: how much the "
                         "result moves with the random choices (shuffling, distortions, mixup)")
    ap.add_argument("--small", default="", help="comma list of photos per class for the small-data case (e.g. 10,30)")
    ap.add_argument("--draws", type=int, default=3, help="random draws per --small size")
    ap.add_argument("--demo", action="store_true", help="also the 60 demo photos (examples/flowers)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "accuracy-run.md")
    a = ap.parse_args()
    if not a.data.is_dir():
        sys.exit(f"data not found: {a.data}")
    rows, small = [], []
    with tempfile.TemporaryDirectory(prefix="bench-accuracy-") as tmp:
        tmp = Path(tmp)
        seeds = [int(x) for x in a.seeds.split(",")]
        if a.small or a.demo:
            root = a.data.resolve()
            pool, test = fixed_test_split(a.data)
            held = link_folder(sorted(test), root, tmp / "held-test")
            cache = tmp / "small-cache"  # shared by the small-data fits: their times are warm after the first
            for n in [int(x) for x in a.small.split(",") if x]:
                for draw in range(a.draws):
                    rng = np.random.default_rng(1000 * n + draw)
                    pick = [p for c in sorted(pool) for p in rng.choice(pool[c], n, replace=False)]
                    folder = link_folder(pick, root, tmp / f"small-{n}-{draw}")
                    small += small_data_rows(folder, held, tmp, cache, f"{n} per class (draw {draw + 1})")
            if a.demo:
                demo = ROOT / "examples" / "flowers"
                names = {(p.parent.name, p.name) for p in demo.glob("*/*.jpg")}
                others = [p for p in sorted(root.glob("*/*")) if (p.parent.name, p.name) not in names]
                small += small_data_rows(demo, link_folder(others, root, tmp / "held-demo"), tmp, cache,
                                         "demo: examples/flowers, 12 per class")
        for name, seed, rep_i in [(n, sd, i) for n in a.only.split(",") if n for sd in seeds for i in range(a.repeat)]:
            extra = CONFIGS[name] + (["--seed", str(seed)] if seed else [])
            run_dir, cache = tmp / name / f"run{seed}-{rep_i}", tmp / name / f"cache{seed}-{rep_i}"
            cmd = [sys.executable, "-m", "retrain", "fit", str(a.data), "-o", str(run_dir), "--cache-dir",
                   str(cache), "-q", *extra]
            print(f"{name}: {' '.join(['retrain', *cmd[3:]])}", flush=True)
            wall = run(cmd)
            rep = json.loads((run_dir / "report.json").read_text())
            te, va = rep["metrics"]["test"], rep["metrics"]["validation"]
            cal = rep["calibration"]
            tag = ", ".join(t for t in ((f"seed {seed}" if len(seeds) > 1 else ""),
                                        (f"run {rep_i + 1}" if a.repeat > 1 else "")) if t)
            row = {"config": name + (f" ({tag})" if tag else ""), "flags": " ".join(extra),
                   "wall_s": round(wall, 1),
                   "test_accuracy": te["accuracy"], "test_n": te["n"], "validation_accuracy": va["accuracy"],
                   "test_per_class_recall": te["per_class_recall"], "temperature": cal["temperature"],
                   "ece_validation": [cal.get("ece_validation_before"), cal.get("ece_validation_after")],
                   "ece_test": [cal.get("ece_test_before"), cal.get("ece_test_after")],
                   "train": {k: v for k, v in rep["train"].items() if k not in ("grid",)},
                   "timings": {k: v for k, v in rep["timings"].items() if k.endswith("_s")}}
            if a.tta:
                row["tta"] = tta_accuracy(run_dir, a.data.resolve(), tmp / name)
            print(f"  test accuracy {te['accuracy']:.2%} (n={te['n']}), {wall:.0f} s", flush=True)
            rows.append(row)
    from common import machine as describe_machine

    machine = f"{describe_machine()}; {'bf16' if _bf16() else 'fp32'} bottlenecks, no GPU"
    lines = ["# Accuracy on the flowers (`benchmarks/bench_accuracy.py`)", "", f"Machine: {machine}.", ""]
    if rows:
        lines += [f"Data: {a.data.name} ({rows[0]['test_n']} test images, the run's own split; choices made on "
                  "validation only, then the head refitted on train + validation; validation accuracy is the "
                  "selection head's, trained on the training split only). Cold runs: fresh bottleneck cache each.",
                  "", "| configuration | flags | test accuracy | validation accuracy | wall time | ECE val before -> "
                  "after | ECE test before -> after |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | `{r['flags'] or '(default)'}` | {r['test_accuracy']:.2%} | "
                     f"{r['validation_accuracy']:.2%} | {r['wall_s']:.0f} s | "
                     f"{r['ece_validation'][0]:.3f} -> {r['ece_validation'][1]:.3f} | "
                     f"{r['ece_test'][0]:.3f} -> {r['ece_test'][1]:.3f} |")
    runs = a.repeat * len(seeds)
    if runs > 1:
        lines += ["", f"Spread over {runs} runs of each configuration (test accuracy; validation accuracy):", ""]
        for name in a.only.split(","):
            mine = [r for r in rows if r["config"].startswith(name + " (")]
            accs, vals = [r["test_accuracy"] for r in mine], [r["validation_accuracy"] for r in mine]
            lines.append(f"- {name}: test mean {np.mean(accs):.2%}, min {min(accs):.2%}, max {max(accs):.2%}; "
                         f"validation mean {np.mean(vals):.2%}, min {min(vals):.2%}, max {max(vals):.2%}")
    if small:
        lines += ["", "Small data: photos per class drawn from the flowers outside the fixed split's test photos; "
                  "each draw fitted as now and with the fixed split forced; both models evaluated on photos neither "
                  "saw (the 298 test photos; for the demo, the 2,874 flowers that are not demo photos).", "",
                  "| case | regime | what fit reports | accuracy on photos it never saw | L2 | temperature |",
                  "|---|---|---|---:|---:|---:|"]
        for r in small:
            lines.append(f"| {r['case']} | {r['regime']} | {r['reported']} | {r['held_out_accuracy']:.2%} "
                         f"(n={r['held_out_n']}) | {r['l2']:g} | {r['temperature']:g} |")
        lines.append("")
        for regime in ("cross-validation (now)", "fixed split forced"):
            for size in sorted({r["case"].split(" (")[0] for r in small if "draw" in r["case"]}):
                acc = [r["held_out_accuracy"] for r in small if r["regime"] == regime and r["case"].startswith(size)]
                lines.append(f"- {size}, {regime}: mean {np.mean(acc):.2%} over {len(acc)} draws "
                             f"(min {min(acc):.2%}, max {max(acc):.2%})")
    chosen = [r for r in rows if r["train"].get("fine_tune", {}).get("final_layer")]
    if chosen:
        lines += ["", "Final layer after fine-tuning (the lowest calibrated validation cross entropy is kept; an "
                  "L-BFGS one is refitted on train + validation, alone or in a weighted sum):", ""]
        for r in chosen:
            fl = r["train"]["fine_tune"]["final_layer"]
            cands = "; ".join(f"{name} {s['validation_calibrated_cross_entropy']:.4f} ({s['validation_accuracy']:.2%})"
                              for name, s in fl.items() if name != "chosen")
            lines.append(f"- {r['config']}: {fl['chosen']}; calibrated validation cross entropy (accuracy): {cands}; "
                         f"L-BFGS at L2 {fl['lbfgs']['l2']:g}")
    lines += ["", "Per-class test recall:", ""]
    for r in rows:
        lines.append(f"- {r['config']}: " + ", ".join(f"{c} {v:.1%}" for c, v in r["test_per_class_recall"].items()))
    if a.tta:
        lines += ["", "Test accuracy without / with test-time augmentation (`retrain evaluate --no-tta/--tta`):", ""]
        for r in rows:
            lines.append(f"- {r['config']}: {r['tta']['no-tta']:.2%} / {r['tta']['tta']:.2%}")
    lines += ["", "Commands (each with `--cache-dir <fresh folder> -q`):", ""]
    for r in rows:
        lines.append(f"- {r['config']}: `retrain fit {a.data} -o RUN {r['flags']}`".rstrip())
    lines += ["", f"Reproduce: `python benchmarks/bench_accuracy.py --only {a.only}{' --tta' if a.tta else ''}"
                  f"{f' --repeat {a.repeat}' if a.repeat > 1 else ''}{f' --seeds {a.seeds}' if len(seeds) > 1 else ''}"
                  f"{f' --small {a.small} --draws {a.draws}' if a.small else ''}{' --demo' if a.demo else ''}`",
              ""]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines))
    a.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "rows": rows, "small_data": small},
                                                     indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


def _bf16() -> bool:
    from retrain.bottlenecks import choose_precision

    return choose_precision("auto") == "bf16"


if __name__ == "__main__":
    sys.exit(main())
