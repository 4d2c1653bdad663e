"""How the fine-tuning recipe was chosen: variants of `retrain fit --fine-tune`, judged on validation.

    python benchmarks/bench_finetune_recipes.py                  # every variant (7-9 min each)
    python benchmarks/bench_finetune_recipes.py --only default,previous
    python benchmarks/bench_finetune_recipes.py --only unfreeze-6,unfreeze-5 --seeds 0,1,2

Each variant is the real `retrain fit --fine-tune` in a fresh process with some of the recipe's
constants (retrain/finetune.py) set otherwise, and a fresh cache. It prints, per variant, the
best calibrated validation cross entropy (the selection score), validation accuracy at that
epoch, the epoch, the wall time and, for the record only, the test accuracy. The default was
chosen as the variant with the lowest validation score; the test split played no part.
With --seeds, each variant runs once per seed (`--seed N`), the seeds of a variant sharing its
cache: the first seed's wall time is cold (activations computed), the others' warm.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "flower_photos"

# name -> (constants of retrain.finetune to set, extra CLI flags)
STRONG = {"DEFAULT_DISTORTIONS": {"flip_left_right": True, "random_crop": 20.0, "random_scale": 30.0,
                                  "random_brightness": 15.0}, "DEFAULT_VIEWS": 6}
WEAK = {"DEFAULT_DISTORTIONS": {"flip_left_right": True, "random_crop": 10.0, "random_scale": 10.0,
                                "random_brightness": 10.0}, "DEFAULT_VIEWS": 2}
VARIANTS = {
    "previous": ({**WEAK, "MIXUP_ALPHA": 0.0, "DROPOUT": 0.0, "PATIENCE": 4}, ["--unfreeze", "6", "--epochs", "12"]),
    "6-views": ({**STRONG, "MIXUP_ALPHA": 0.0, "DROPOUT": 0.0, "PATIENCE": 4}, ["--unfreeze", "6", "--epochs", "12"]),
    "mixup-dropout": ({**STRONG, "MIXUP_ALPHA": 0.4, "DROPOUT": 0.2, "PATIENCE": 10},
                      ["--unfreeze", "6", "--epochs", "10"]),
    # Issue 15, part 4: what makes a fine-tune of the flowers fit in 5 minutes on 2 cores
    # (benchmarks/bench_finetune_speed.py times one training step of each lever).
    "unfreeze-6": ({}, ["--unfreeze", "6"]),
    "unfreeze-5": ({}, ["--unfreeze", "5"]),
    "unfreeze-6-3-views": ({"DEFAULT_VIEWS": 3}, ["--unfreeze", "6"]),
    "3-views-6-epochs": ({"DEFAULT_VIEWS": 3}, ["--epochs", "6"]),
    "3-views-5-epochs": ({"DEFAULT_VIEWS": 3}, ["--epochs", "5"]),
    "6-views-4-epochs": ({}, ["--epochs", "4"]),
    # Training views at a smaller side than the centre views (FixRes): every epoch costs less.
    # Each pins FULL_SIDE_EPOCHS, so that it keeps meaning what it measured when the default moves.
    "side-192": ({"TRAIN_SIDE_RATIO": 192 / 224, "FULL_SIDE_EPOCHS": 0}, []),
    "side-176": ({"TRAIN_SIDE_RATIO": 176 / 224, "FULL_SIDE_EPOCHS": 0}, []),
    "side-160": ({"TRAIN_SIDE_RATIO": 160 / 224, "FULL_SIDE_EPOCHS": 0}, []),
    "side-160-last-224": ({"TRAIN_SIDE_RATIO": 160 / 224, "FULL_SIDE_EPOCHS": 1}, []),
    "side-160-last-2-224": ({"TRAIN_SIDE_RATIO": 160 / 224, "FULL_SIDE_EPOCHS": 2}, []),
    "10-epochs": ({"FULL_SIDE_EPOCHS": 2}, ["--epochs", "10"]),  # 8 at 160 px, the last 2 at 224 px
    "side-160-last-3-224": ({"TRAIN_SIDE_RATIO": 160 / 224, "FULL_SIDE_EPOCHS": 3}, []),
    "9-epochs-last-3-224": ({"FULL_SIDE_EPOCHS": 3}, ["--epochs", "9"]),
    "side-160-last-4-224": ({"TRAIN_SIDE_RATIO": 160 / 224, "FULL_SIDE_EPOCHS": 4}, []),  # shipped since
    "side-160-last-5-224": ({"TRAIN_SIDE_RATIO": 160 / 224, "FULL_SIDE_EPOCHS": 5}, []),
    # As shipped: --unfreeze 8, 6 strong views, 8 epochs (4 at 160 px, 4 at 224 px), mixup 0.2, dropout 0.2.
    "default": ({}, []),
}

RUNNER = """
import json, sys
from retrain import finetune
for k, v in json.loads(sys.argv[1]).items():
    setattr(finetune, k, v)
from retrain.cli import main
sys.exit(main(sys.argv[2:]))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--only", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    ap.add_argument("--seeds", default="0", help="comma list of seeds, each a run of every variant (default 0)")
    a = ap.parse_args()
    seeds = [int(x) for x in a.seeds.split(",")]
    if not a.data.is_dir():
        sys.exit(f"data not found: {a.data}")
    print("| variant | constants | flags | seed | best val. calibrated CE | val. accuracy there | best epoch | "
          "epochs run | final layer: kept, val. calibrated CE | val. accuracy (selection head) | activations | "
          "epoch (mean) | wall | test accuracy (not used) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="bench-recipes-") as tmp:
        for name, seed in [(n, sd) for n in a.only.split(",") for sd in seeds]:
            consts, flags = VARIANTS[name]
            run_dir, cache = Path(tmp) / name / f"run-{seed}", Path(tmp) / name / "cache"
            cmd = [sys.executable, "-c", RUNNER, json.dumps(consts), "fit", str(a.data), "-o", str(run_dir),
                   "--cache-dir", str(cache), "-q", "--fine-tune", "--seed", str(seed), *flags]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if p.returncode != 0:
                sys.exit(f"{name} failed:\n{p.stderr[-3000:]}")
            rep = json.loads((run_dir / "report.json").read_text())
            ft = rep["train"]["fine_tune"]
            best = min(ft["history"], key=lambda h: h["validation_calibrated_cross_entropy"])
            shown = ", ".join(f"{k}={v}" for k, v in consts.items() if k != "DEFAULT_DISTORTIONS")
            if "DEFAULT_DISTORTIONS" in consts:
                d = consts["DEFAULT_DISTORTIONS"]
                shown += f", crop/scale/brightness {d['random_crop']:g}/{d['random_scale']:g}/{d['random_brightness']:g}"
            epoch_s = sum(h["seconds"] for h in ft["history"]) / max(1, len(ft["history"]))
            fl = ft.get("final_layer", {})  # the head fit keeps after fine-tuning (retrain.final_layer)
            kept = (f"{fl['chosen']}, {fl[fl['chosen']]['validation_calibrated_cross_entropy']:.4f}"
                    if fl else "(fine-tuned)")
            act_s = ft.get("activations", {}).get("seconds", 0.0)
            print(f"| {name} | {shown or '(as shipped)'} | `{' '.join(flags) or '(none)'}` | {seed} | "
                  f"{best['validation_calibrated_cross_entropy']:.4f} | {best['validation_accuracy']:.2%} | "
                  f"{best['epoch']} | {ft['epochs_run']} | {kept} | {rep['metrics']['validation']['accuracy']:.2%} | "
                  f"{act_s:.0f} s | {epoch_s:.1f} s | {wall:.0f} s | "
                  f"{rep['metrics']['test']['accuracy']:.2%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
