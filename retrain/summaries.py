"""TensorBoard event files for a run (`retrain fit --summaries_dir DIR`), no TensorFlow needed.

Layout, as in the codelab, so `tensorboard --logdir DIR` overlays train and validation:
  DIR/train/       scalars accuracy, cross_entropy (and learning_rate for sgd) per evaluation
                   step; histograms final_layer/weights and final_layer/biases; one PR curve per
                   class (pr_curve/<class>, on the test set, else validation); and the
                   embedding projector: bottlenecks (tensors.tsv), label + split + file
                   (metadata.tsv), thumbnails (sprite.jpg), projector_config.pbtxt (the projector
                   only looks in folders that hold event files, so it lives with the train run)
  DIR/validation/  scalars accuracy, cross_entropy per evaluation step
Event files are written with tensorboardX (protobuf only); the projector files are written
here with TensorBoard's own ProjectorConfig proto. Running again replaces what an earlier run
wrote into these two folders (and only that).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

EMBED_MAX = 5000  # points in the projector (a stratified sample beyond this)
SPRITE_THUMB = 48  # px per sprite cell: 5000 points -> 71 x 71 cells -> 3408 px (limit 8192)
PR_THRESHOLDS = 127


def _writer(folder: Path):
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(folder), flush_secs=3600)


def _clear_ours(folder: Path) -> None:
    """Remove event/projector files an earlier run wrote here; leave anything else alone."""
    if not folder.is_dir():
        return
    for f in folder.iterdir():
        if f.is_file() and (f.name.startswith("events.out.tfevents.") or f.name in (
                "projector_config.pbtxt", "tensors.tsv", "metadata.tsv", "sprite.jpg")):
            f.unlink()


def _sample(y: np.ndarray, n_max: int, seed: int = 0) -> np.ndarray:
    """Indices of at most n_max points, each class kept in proportion (sorted)."""
    if len(y) <= n_max:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        idx = np.nonzero(y == c)[0]
        k = max(1, int(round(n_max * len(idx) / len(y))))
        keep.append(rng.choice(idx, size=min(k, len(idx)), replace=False))
    return np.sort(np.concatenate(keep))[:n_max]


def _thumb(path: str, side: int) -> np.ndarray:
    """A square thumbnail (centre crop) of an image, grey when it cannot be read."""
    from retrain.errors import ImageError
    from retrain.images import center_crop_resize, open_image

    try:
        return center_crop_resize(open_image(path, draft_size=side), side, 1.0)
    except ImageError:
        return np.full((side, side, 3), 128, np.uint8)


def write_sprite(paths: list[str], out: Path, side: int = SPRITE_THUMB, workers: int = 0) -> tuple[int, int]:
    """Thumbnails in row-major order on a square canvas (TensorBoard's sprite rules)."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    n = len(paths)
    per_row = int(np.ceil(np.sqrt(n)))
    canvas = np.full((per_row * side, per_row * side, 3), 255, np.uint8)
    with ThreadPoolExecutor(workers or min(4, os.cpu_count() or 1)) as ex:
        for i, t in enumerate(ex.map(lambda p: _thumb(p, side), paths)):
            r, c = divmod(i, per_row)
            canvas[r * side:(r + 1) * side, c * side:(c + 1) * side] = t
    Image.fromarray(canvas).save(out, "JPEG", quality=85)  # photos: JPEG is ~10x smaller than PNG
    return canvas.shape[1], canvas.shape[0]


def write_projector(folder: Path, features: np.ndarray, labels: list[str], splits: list[str],
                    paths: list[str], *, root: str | None = None) -> Path:
    """tensors.tsv + metadata.tsv (+ sprite.jpg) + projector_config.pbtxt in `folder`."""
    from google.protobuf import text_format
    from tensorboard.plugins.projector import projector_config_pb2

    folder.mkdir(parents=True, exist_ok=True)
    # 4 significant digits: the projector runs PCA/t-SNE on these; full float repr doubles the file.
    np.savetxt(folder / "tensors.tsv", features, fmt="%.4g", delimiter="\t")

    def clean(s):
        return str(s).replace("\t", " ").replace("\n", " ")

    with open(folder / "metadata.tsv", "w", encoding="utf-8") as f:
        f.write("label\tsplit\tfile\n")
        for lab, sp, p in zip(labels, splits, paths):
            rel = os.path.relpath(p, root) if root else p
            f.write(f"{clean(lab)}\t{clean(sp)}\t{clean(rel)}\n")
    cfg = projector_config_pb2.ProjectorConfig()
    emb = cfg.embeddings.add()
    emb.tensor_name = "bottlenecks"
    emb.tensor_path = "tensors.tsv"
    emb.metadata_path = "metadata.tsv"
    write_sprite(paths, folder / "sprite.jpg")
    emb.sprite.image_path = "sprite.jpg"
    emb.sprite.single_image_dim.extend([SPRITE_THUMB, SPRITE_THUMB])
    (folder / "projector_config.pbtxt").write_text(text_format.MessageToString(cfg))
    return folder


def write_summaries(summaries_dir, report: dict, *, features: np.ndarray, y: np.ndarray, paths: list[str],
                    parts: dict, head=None) -> Path:
    """Write the run's TensorBoard events (see the module docstring). Returns the folder.

    features: (N, C) bottlenecks, y: (N,) class indices, paths: N image paths, parts: split name
    -> indices into them; head: the trained final layer (retrain.head.Head) for the weight
    histograms and PR curves (skipped when None).
    """
    root = Path(summaries_dir)
    root.mkdir(parents=True, exist_ok=True)
    labels = report["labels"]
    hist = report.get("history") or []
    last = hist[-1]["step"] if hist else 0

    tr_dir, va_dir = root / "train", root / "validation"
    for d in (tr_dir, va_dir):
        _clear_ours(d)
    tw, vw = _writer(tr_dir), _writer(va_dir)
    try:
        for h in hist:
            s = int(h["step"])
            tw.add_scalar("accuracy", h["train_accuracy"], s)
            tw.add_scalar("cross_entropy", h["cross_entropy"], s)
            if h.get("learning_rate") is not None:
                tw.add_scalar("learning_rate", h["learning_rate"], s)
            if h.get("validation_accuracy") is not None and h["validation_accuracy"] == h["validation_accuracy"]:
                vw.add_scalar("accuracy", h["validation_accuracy"], s)
                vw.add_scalar("cross_entropy", h["validation_cross_entropy"], s)
        if head is not None:
            W, b = head.folded()
            tw.add_histogram("final_layer/weights", W.astype(np.float64), last)
            tw.add_histogram("final_layer/biases", b.astype(np.float64), last)
            split = "test" if len(parts.get("test", ())) else "validation"
            idx = np.asarray(parts.get(split, ()), dtype=np.int64)
            if len(idx):
                P = head.probs(features[idx])  # (n, K)
                for k, name in enumerate(labels):
                    tw.add_pr_curve(f"pr_curve/{name}", (y[idx] == k).astype(np.int64), P[:, k].astype(np.float64),
                                    last, num_thresholds=PR_THRESHOLDS)
    finally:
        tw.close()
        vw.close()

    if len(y):
        keep = _sample(np.asarray(y), EMBED_MAX)
        split_of = np.empty(len(y), dtype=object)
        split_of[:] = "unused"
        for name, idx in parts.items():
            split_of[np.asarray(idx, dtype=np.int64)] = name
        write_projector(tr_dir, np.asarray(features)[keep], [labels[int(y[i])] for i in keep],
                        [split_of[i] for i in keep], [paths[i] for i in keep], root=report.get("image_dir"))
    return root
