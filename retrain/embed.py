"""`retrain embed DIR --out STORE [--ray ADDRESS]`: every photo's bottleneck into a feature store.

In-process (the default) it is `retrain fit`'s machinery: the scan (one subfolder per class,
every file hashed), the decode/infer pipeline and the same feature engine (OpenVINO bf16 or
ONNX Runtime), writing Parquet shards (retrain.store) instead of the in-memory cache. With
`--ray ADDRESS` the same rows are computed by Ray Data across a cluster (retrain.distributed).
Either way rows already in the store are skipped: a rerun after any crash computes only what
is missing. `retrain fit --features STORE` then trains the head with no photos.
"""

from __future__ import annotations

import sys
import time

from retrain.config import DEFAULT_ARCHITECTURE
from retrain.errors import ConfigError
from retrain.progress import Log


def embed(image_dir, out, *, architecture: str = DEFAULT_ARCHITECTURE, precision: str = "auto",
          dtype: str = "float16", provider: str = "auto", batch_size: int = 8, workers: int | None = None,
          quiet: bool = True, log=None, rows_per_file: int | None = None) -> dict:
    """Bottlenecks of every photo in `image_dir` (class subfolders) into the store at `out`, in
    this process. Returns {"store", "photos", "computed", "already", "errors", "seconds", ...}."""
    from retrain.architectures import get_backbone
    from retrain.bottlenecks import choose_precision, feature_session
    from retrain.pipeline import run_pipeline
    from retrain.progress import in_background
    from retrain.scan import scan
    from retrain.store import FeatureStore

    log = log or Log.silent()
    t_start = time.perf_counter()
    bb = get_backbone(architecture)
    precision = choose_precision(precision, provider=provider)
    store = FeatureStore.create(out, bb, precision=precision, dtype=dtype, log=log)
    engine = in_background(feature_session, bb, provider=provider, precision=precision, batch=batch_size, log=log)
    s = scan(image_dir, quiet=quiet)
    done = store.done()
    todo = [it for it in s.items if (bytes.fromhex(it.digest), it.path) not in done]
    by_key: dict[str, list] = {}
    for it in todo:
        by_key.setdefault(it.digest, []).append(it)
    first = [group[0] for group in by_key.values()]
    log(f"Found {len(s.items)} images in {len(s.classes)} classes in {s.root}: {len(s.items) - len(todo)} "
        f"already in the store, {len(first)} to compute")
    size, crop = bb.image_size, bb.crop_fraction
    timing, t0 = {}, time.perf_counter()
    errors = {}
    with store.writer(**({"rows_per_file": rows_per_file} if rows_per_file else {})) as w:
        if first:
            from retrain import images

            def on_batch(idx, feats):
                feats = feats.reshape(len(idx), bb.feature_dim)
                rows = [(it, f) for j, f in zip(idx, feats) for it in by_key[first[j].digest]]
                w.add([bytes.fromhex(it.digest) for it, _ in rows], [it.path for it, _ in rows],
                      [it.label for it, _ in rows], [f for _, f in rows])

            fails, timing = run_pipeline(first, lambda it: images.load(it.path, size, crop), engine.result(),
                                         batch_size=batch_size, workers=workers, mean=bb.mean, std=bb.std,
                                         on_batch=on_batch, desc="Bottlenecks", quiet=quiet)
            import numpy as np

            for j, reason in fails.items():
                group = by_key[first[j].digest]
                errors.update({it.path: reason for it in group})
                w.add([bytes.fromhex(it.digest) for it in group], [it.path for it in group],
                      [it.label for it in group], np.full((len(group), bb.feature_dim), np.nan), [reason] * len(group))
    seconds = time.perf_counter() - t0
    removed = store.compact()
    if removed:
        log(f"Compacted {removed} small shards")
    return {"store": store.where(), "photos": len(s.items), "computed": len(first), "already": len(s.items) - len(todo),
            "errors": errors, "skipped": s.skipped, "seconds": round(seconds, 3),
            "images_per_second": round(len(first) / seconds, 1) if first and seconds > 0 else None,
            "precision": precision, "dtype": store.dtype, "rows": len(store), "timing": timing,
            "total_s": round(time.perf_counter() - t_start, 3)}


def add_arguments(p) -> None:
    from retrain.config import bounded

    p.add_argument("image_dir", nargs="?", metavar="DIR", help="folder with one subfolder of photos per class")
    p.add_argument("--out", "-o", metavar="STORE", help="feature store folder (a local path or a URI pyarrow "
                   "reaches, e.g. s3://bucket/features)")
    p.add_argument("--ray", metavar="ADDRESS", help="compute on a Ray cluster (its head's address, e.g. "
                   "10.0.0.5:6379; 'auto' for the cluster this machine belongs to); needs retrain[ray]")
    p.add_argument("--architecture", default=DEFAULT_ARCHITECTURE, help="frozen ImageNet backbone (default %(default)s, as retrain fit's)")
    p.add_argument("--bottleneck-precision", "--bottleneck_precision", default="auto",
                   choices=("auto", "fp32", "bf16", "int8"), help="as retrain fit's (default auto)")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"),
                   help="how features are stored (default float16: half the size; the head trains as well)")
    p.add_argument("--batch-size", "--batch_size", type=bounded(int, 1, 1024, "--batch-size"), default=8,
                   help="images per backbone batch (default 8)")
    p.add_argument("--workers", type=bounded(int, 0, 256, "--workers"), default=0,
                   help="decoding threads (0: one per core, at most 4)")
    p.add_argument("--provider", default="auto", choices=("auto", "cpu", "cuda", "tensorrt"))
    p.add_argument("--actors", type=bounded(int, 1, 100_000, "--actors"), default=None,
                   help="with --ray: embedding actors (default: one per node's spare CPUs)")
    p.add_argument("--actor-cpus", "--actor_cpus", type=bounded(float, 0.25, 512, "--actor-cpus"), default=1.0,
                   help="with --ray: CPUs each actor takes (its engine's threads; default 1)")
    p.add_argument("--rows-per-file", "--rows_per_file", type=bounded(int, 1, 10_000_000, "--rows-per-file"),
                   default=None, help="rows per Parquet file of the store (default 65536 in-process, 16384 per "
                   "file with --ray): fewer, larger files; a kill loses at most the rows not yet in a file")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or messages")


def main(args) -> int:
    from retrain.progress import print_json

    if not args.image_dir:
        raise ConfigError("no image folder given: retrain embed DIR --out STORE")
    if not args.out:
        raise ConfigError("no store given: retrain embed DIR --out STORE (a folder, made if missing)")
    log = Log(args.quiet or args.json)
    if args.ray:
        from retrain.distributed import embed_ray

        r = embed_ray(args.image_dir, args.out, address=args.ray, architecture=args.architecture,
                      precision=args.bottleneck_precision, dtype=args.dtype, batch_size=args.batch_size,
                      actors=args.actors, actor_cpus=args.actor_cpus, quiet=args.quiet or args.json, log=log,
                      **({"rows_per_file": args.rows_per_file} if args.rows_per_file else {}))
    else:
        r = embed(args.image_dir, args.out, architecture=args.architecture, precision=args.bottleneck_precision,
                  dtype=args.dtype, provider=args.provider, batch_size=args.batch_size, workers=args.workers or None,
                  quiet=args.quiet or args.json, log=log, rows_per_file=args.rows_per_file)
    if args.json:
        print_json(r)
        return 0
    for sk in r.get("skipped", [])[:20]:
        log(f"skipped {sk['path']}: {sk['reason']}")
    for path, reason in list(r["errors"].items())[:20]:
        log(f"skipped {path}: {reason}")
    rate = f" ({r['images_per_second']:.0f} images/s)" if r.get("images_per_second") else ""
    print(f"retrain embed: {r['photos']} photos, {r['computed']} computed in {r['seconds']:.1f} s{rate}, "
          f"{r['already']} already in the store, {len(r['errors'])} unreadable -> {r['store']} "
          f"({r['rows']} rows)", file=sys.stdout)
    return 0 if r["photos"] and len(r["errors"]) < r["photos"] else 1

