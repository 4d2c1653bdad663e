"""Issue 16 part 2 benchmark: does `retrain check --labels` find mislabelled photos?

    python benchmarks/bench_mislabels.py [--data DIR] [--cache-dir DIR] [--seeds 3] [--rate 0.02]
                                         [--out benchmarks/results/mislabels.md]

For each seed, a copy of the flowers (hard links where the file system allows, else copies: same
bytes, so the cached bottlenecks are reused) with `rate` of the photos moved into a random wrong
class folder; then the real CLI, `retrain check COPY --labels --json --no-near`, and the
precision and recall of its ranked suspects against the planted flips: of the top k (k = the
number planted) and of the whole list it flags. Then the same check of the unmodified flowers,
whose top suspects are listed (with thumbnails in the contact sheet written beside the results)
so a person can say which are real label errors. The top-k photos that were not planted are
looked up among the unmodified folder's suspects: errors the folder had before any planting.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FLOWERS, ROOT, machine, timed_cli  # noqa: E402


def link_tree(src: Path, dst: Path) -> None:
    """dst: the image folder src again, as hard links (copies across file systems)."""
    for d, _dirs, files in os.walk(src):
        out = dst / Path(d).relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        for f in files:
            try:
                os.link(Path(d) / f, out / f)
            except OSError:
                shutil.copy2(Path(d) / f, out / f)


def plant(root: Path, rate: float, seed: int) -> dict[str, str]:
    """Move `rate` of the photos of `root` into another class folder, chosen at random.
    Returns {new path: true class}."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    photos = sorted(p for c in classes for p in (root / c).iterdir() if p.is_file())
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(photos), round(rate * len(photos)), replace=False)
    planted = {}
    for i in sorted(chosen):
        p = photos[i]
        wrong = [c for c in classes if c != p.parent.name]
        to = root / wrong[int(rng.integers(len(wrong)))] / f"planted_{p.name}"
        p.rename(to)
        planted[os.path.realpath(to)] = p.parent.name
    return planted


def contact_sheet(suspects: list[dict], root: str, path: Path, n: int = 24) -> None:
    """A JPEG of the top `n` suspects with their folder, suggested label and score."""
    from PIL import Image, ImageDraw, ImageOps

    W, H, cols = 300, 262, 4
    rows = (min(n, len(suspects)) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * W, max(1, rows) * H), "white")
    d = ImageDraw.Draw(sheet)
    for i, s in enumerate(suspects[:n]):
        with Image.open(s["path"]) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((W - 10, H - 42))
            x, y = (i % cols) * W, (i // cols) * H
            sheet.paste(im, (x + 5, y + 5))
        d.text((x + 5, y + H - 34), f"#{i + 1} in {s['label']}, looks like {s['suggested']} ({s['score']:.3f})",
               fill="black")
        d.text((x + 5, y + H - 20), os.path.relpath(s["path"], root), fill="black")
    sheet.save(path, quality=85)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(FLOWERS))
    p.add_argument("--cache-dir", default=None, help="bottleneck cache (default: the user's, as retrain fit)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rate", type=float, default=0.02)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mislabels.md"))
    a = p.parse_args()
    if not Path(a.data).is_dir():
        raise SystemExit(f"no image folder at {a.data}")
    cache = ["--cache-dir", a.cache_dir] if a.cache_dir else []
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    # The unmodified flowers first (this also fills the bottleneck cache on a first run).
    t_first, _, cp = timed_cli("check", a.data, "--labels", "--json", "--no-near", *cache)
    t_clean, rss, cp = timed_cli("check", a.data, "--labels", "--json", "--no-near", *cache)
    clean = json.loads(cp.stdout)["label_issues"]
    clean_suspects = {os.path.relpath(s["path"], a.data) for s in clean["suspects"]}

    rows, per_seed = [], []
    for seed in range(a.seeds):
        work = Path(tempfile.mkdtemp(prefix=f"bench-mislabels-{seed}-"))
        try:
            root = work / Path(a.data).name
            link_tree(Path(a.data), root)
            planted = plant(root, a.rate, seed)
            t, _, cp = timed_cli("check", root, "--labels", "--json", "--no-near", *cache)
            li = json.loads(cp.stdout)["label_issues"]
        finally:
            shutil.rmtree(work, ignore_errors=True)
        sus = [os.path.realpath(s["path"]) for s in li["suspects"]]
        k = len(planted)
        hits_k = sum(s in planted for s in sus[:k])
        hits = sum(s in planted for s in sus)
        right = sum(li["suspects"][i]["suggested"] == planted[s] for i, s in enumerate(sus) if s in planted)
        # the top-k that were not planted: photos the unmodified folder already had as suspects?
        others = [os.path.relpath(s, os.path.realpath(root)) for s in sus[:k] if s not in planted]
        already = sum(o in clean_suspects for o in others)
        r = {"seed": seed, "planted": k, "flagged": len(sus), "top_k_hits": hits_k, "hits": hits,
             "suggested_right": right, "top_k_others_already_suspect": already, "wall_s": round(t, 1),
             "label_check_s": li["seconds"], "out_of_fold_accuracy": li["out_of_fold_accuracy"]}
        per_seed.append(r)
        rows.append(f"| {seed} | {k} | {hits_k / k:.0%} ({hits_k}/{k}) | {len(sus)} | {hits / max(len(sus), 1):.0%} | "
                    f"{hits / k:.0%} ({hits}/{k}) | {right}/{hits} | {already}/{len(others)} | "
                    f"{li['seconds']:.1f} s | {t:.1f} s |")
        print(rows[-1], flush=True)

    def mean(key):
        return sum(r[key] for r in per_seed) / len(per_seed)

    k_all = sum(r["planted"] for r in per_seed)
    pk = sum(r["top_k_hits"] for r in per_seed) / k_all
    pk_known = sum(r["top_k_hits"] + r["top_k_others_already_suspect"] for r in per_seed) / k_all
    prec = sum(r["hits"] for r in per_seed) / max(1, sum(r["flagged"] for r in per_seed))
    rec = sum(r["hits"] for r in per_seed) / sum(r["planted"] for r in per_seed)
    sheet = out.with_name(out.stem + "-top24.jpg")
    contact_sheet(clean["suspects"], a.data, sheet)
    top = [f"| {i + 1} | `{os.path.relpath(s['path'], a.data)}` | {s['label']} | {s['suggested']} | {s['score']:.3f} |"
           for i, s in enumerate(clean["suspects"][:24])]
    pairs = ", ".join(f"{p['labelled']} -> {p['looks_like']} {p['count']}" for p in clean["confused_pairs"][:5])
    body = [f"Machine: {machine()}", "",
            f"Command: `python benchmarks/bench_mislabels.py --data {a.data} --seeds {a.seeds} --rate {a.rate}` "
            f"({time.strftime('%Y-%m-%d')})", "",
            f"Each seed moves {a.rate:.0%} of the {clean['n']} photos into a random wrong class folder, then runs "
            f"`retrain check COPY --labels --json --no-near` ({clean['folds']}-fold out-of-fold heads at L2 "
            f"{clean['l2']:g} on the cached bottlenecks, {clean['method']}). k = photos planted; top-k precision = "
            "recall at k.", "",
            "| seed | planted k | top-k precision (= recall) | flagged | precision of all flagged | recall of all "
            "flagged | suggested = true class | top-k non-planted already suspects unmodified | label check | "
            "CLI wall |", "|---|---|---|---|---|---|---|---|---|---|", *rows, "",
            f"Over {a.seeds} seeds: top-k precision {pk:.1%} ({pk_known:.1%} counting the photos that the unmodified "
            f"folder already had as suspects); all flagged: precision {prec:.1%}, recall {rec:.1%}; "
            f"label check {mean('label_check_s'):.1f} s, whole CLI (scan + decode check + cached bottlenecks + "
            f"label check) {mean('wall_s'):.1f} s.", "",
            f"Unmodified flowers: {len(clean['suspects'])} suspects of {clean['n']} (out-of-fold accuracy "
            f"{clean['out_of_fold_accuracy']:.1%}), CLI {t_clean:.1f} s warm ({t_first:.1f} s first, peak {rss} MiB); "
            f"most confused: {pairs}. Top 24 (contact sheet: {sheet.name}):", "",
            "| # | photo | folder | looks like | score |", "|---|---|---|---|---|", *top]
    text = "# Mislabelled photos: planted flips found by `retrain check --labels`\n\n" + "\n".join(body) + "\n"
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"per_seed": per_seed, "clean": clean}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
