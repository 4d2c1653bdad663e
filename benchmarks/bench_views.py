"""What computing only the drawn views saves in `--fine-tune`'s activation stage: every cached view
of each training photo (how it worked before) against only those that its epochs draw
(retrain.finetune.view_draws), the rest of the stage the same, in one process.

    python benchmarks/bench_views.py [--data ../shared/data/flower_photos] [--rounds 1] [--seed 0]

Each variant runs retrain.backbone_split.prefix_activations as `retrain fit --fine-tune` does
(the fit's split, the shipped recipe's 6 distorted views at 160 px, and every photo's centre
view at 224 px) into a fresh cache of its own, so that every view is computed; the rounds
alternate the two. Nothing is trained: the epochs read the same rows either way.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import FLOWERS, machine  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=FLOWERS)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if not a.data.is_dir():
        raise SystemExit(f"no photos at {a.data}: pass --data FOLDER")
    from retrain import augment, finetune
    from retrain.backbone_split import prefix_activations, split_point
    from retrain.bottlenecks import plan_backbone
    from retrain.config import FitConfig
    from retrain.progress import Log
    from retrain.scan import scan
    from retrain.split import split_parts

    cfg = FitConfig(image_dir=str(a.data), fine_tune=True, seed=a.seed)
    bb = plan_backbone(cfg, "fp32", log=Log.silent())[0].tuned_network  # Lite0 of the default pair, as fit has it
    s = scan(a.data, quiet=True)
    _, parts = split_parts(s.items, s.classes, cfg, Log.silent())
    n, views, d = len(parts["train"]), finetune.DEFAULT_VIEWS, augment.Distortions(**finetune.DEFAULT_DISTORTIONS)
    side = finetune.train_side(bb)
    draws = finetune.view_draws(cfg.seed, n, views, cfg.epochs)
    slots = {"every view (before)": None,
             "the drawn views (now)": finetune.drawn_slots(draws, cfg.epochs - finetune.FULL_SIDE_EPOCHS, views)}
    times, counts = {k: [] for k in slots}, {}
    with tempfile.TemporaryDirectory(prefix="bench-views-") as tmp:
        for rnd in range(a.rounds):
            for name, sl in slots.items():
                t0 = time.perf_counter()
                acts = prefix_activations(s.items, bb, split_point(_model(bb), cfg.unfreeze),
                                          Path(tmp) / f"{rnd}-{len(times[name])}-{name[:5]}", views=views,
                                          distortions=d, view_items=parts["train"], slots=sl, train_side=side,
                                          provider=cfg.provider, batch_size=cfg.batch_size, quiet=True)
                times[name].append(time.perf_counter() - t0)
                counts[name] = (len(acts.pool), acts.timing["computed"])
    print(f"Machine: {machine()}; {len(s.items)} photos, {n} training photos with {views} views at {side} px "
          f"and the centre one, seed {cfg.seed}, {a.rounds} round(s)\n")
    print("| views computed | pool rows (training photos' views) | computed in all (with the centre views at "
          f"{bb.image_size} px) | seconds (median) | / before |")
    print("|---|---:|---:|---:|---:|")
    base = statistics.median(times["every view (before)"])
    for name, ts in times.items():
        rows, computed = counts[name]
        print(f"| {name} | {rows} ({rows / n:.2f} a photo) | {computed} | {statistics.median(ts):.1f} | "
              f"{statistics.median(ts) / base:.2f} |")
    return 0


def _model(bb):
    from retrain.features import build_torch

    return build_torch(bb)


if __name__ == "__main__":
    sys.exit(main())
