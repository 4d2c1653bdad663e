"""Real photos that are not flowers, for measuring "unknown" (benchmarks/bench_novelty.py).

    python benchmarks/outside_photos.py DEST [--wheel PATH.whl ...]

Nothing is downloaded: the photos come from Python packages' own sample data, read from the
installed package or from its wheel file (a zip) given with --wheel:

- scikit-image (skimage/data): astronaut, brick, camera, cell, chelsea (a cat), clock_motion,
  coffee, coins, grass, gravel, hubble_deep_field, ihc, moon, motorcycle_left/right, page,
  retina, rocket, text, and lfw_subset.npy (200 25x25 grey crops of Labeled Faces in the Wild:
  100 faces, 100 other);
- matplotlib (mpl-data/sample_data): grace_hopper;
- scikit-learn (datasets/images): china (its flower.jpg is a flower and is left out).

Drawings (logos, a colour wheel, a phantom, a horse silhouette, chessboards) are left out.
DEST gets three folders: photos/ (the whole photos, one each), crops/ (9 random crops of each,
35-70% of each side, seed 0: more, but not independent, pictures of the same scenes) and
faces/ (the LFW crops, upscaled to 100 px).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import zipfile
from pathlib import Path

import numpy as np

SKIMAGE = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
           "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png",
           "motorcycle_left.png", "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg", "text.png")
SOURCES = [("skimage/data/" + f) for f in SKIMAGE] + ["matplotlib/mpl-data/sample_data/grace_hopper.jpg",
                                                       "sklearn/datasets/images/china.jpg"]
FACES = "skimage/data/lfw_subset.npy"


def find(rel: str, wheels: list[Path]) -> bytes | None:
    """The bytes of package file `rel` (e.g. skimage/data/coffee.png): installed, or in a wheel."""
    pkg, rest = rel.split("/", 1)
    spec = importlib.util.find_spec(pkg)
    if spec and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / rest
        if p.is_file():
            return p.read_bytes()
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            if rel in z.namelist():
                return z.read(rel)
    return None


def main() -> None:
    from PIL import Image

    ap = argparse.ArgumentParser()
    ap.add_argument("dest", type=Path)
    ap.add_argument("--wheel", type=Path, action="append", default=[], help="a package's wheel file to read from")
    args = ap.parse_args()
    for d in ("photos", "crops", "faces"):
        (args.dest / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    found = []
    for rel in SOURCES:
        data = find(rel, args.wheel)
        if data is None:
            print(f"not found: {rel}")
            continue
        im = Image.open(io.BytesIO(data)).convert("RGB")
        stem = Path(rel).stem
        im.save(args.dest / "photos" / f"{stem}.jpg", quality=92)
        w, h = im.size
        for i in range(9):
            f = rng.uniform(0.35, 0.7)
            cw, ch = int(w * f), int(h * f)
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            im.crop((x, y, x + cw, y + ch)).save(args.dest / "crops" / f"{stem}_{i}.jpg", quality=92)
        found.append(stem)
    faces = find(FACES, args.wheel)
    n_faces = 0
    if faces is not None:
        for i, a in enumerate(np.load(io.BytesIO(faces))):
            g = Image.fromarray((a * 255).round().astype(np.uint8)).convert("RGB")
            g.resize((100, 100), Image.BICUBIC).save(args.dest / "faces" / f"lfw_{i:03d}.png")
            n_faces += 1
    print(f"{len(found)} photos ({', '.join(found)}), {9 * len(found)} crops, {n_faces} faces -> {args.dest}")


if __name__ == "__main__":
    main()
