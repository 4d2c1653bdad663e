"""Beyond one machine: `retrain embed DIR --out STORE --ray ADDRESS` on a Ray cluster (Ray Data).

The driver (the machine that runs the command) lists the photos (scan's walk, without reading
them), drops those whose path is already in the store, and hands Ray Data an explicit manifest
of paths: read_binary_files -> map_batches into a pool of actors, each holding one feature
session (OpenVINO bf16 or ONNX Runtime, threads = the actor's CPUs) that hashes, decodes and
embeds its photos, with a per-row error for a photo that cannot be read -> write_parquet into
the store's folder, files of at least --rows-per-file rows. A rerun after any crash (driver,
worker, node) computes only the rows that are not in the store; a file cut short by a kill is
found by its missing footer, deleted and its rows computed again.

Ray's own checkpointing is not used (its filter actor takes a whole CPU and deadlocked a resume
on 2 cores); read and write tasks take 0.25 CPU each and the actors leave CPUs free for them
(a dataset whose actors hold every CPU hangs: ray-project/ray#44687).

`retrain fit DIR --ray ADDRESS` (bottlenecks_ray): fit's scan and plan as without --ray, then the
photos missing from the bottleneck cache go through the same read -> actors pipeline, each actor
running the driver's own features graph (sent with it: same backbone fingerprint, same
precision), and their features come back to the driver, straight into the cache, so that a
later fit without --ray finds them there. The rest of fit runs on the driver.

A Ray cluster has no authentication and its head listens on every interface: it belongs on a
private network (README, "More than one machine").
"""

from __future__ import annotations

import ipaddress
import os
import time

import numpy as np

from retrain.config import DEFAULT_ARCHITECTURE
from retrain.errors import ConfigError, DataError, MissingDependency

RAY_VERSION = "2.60"  # retrain[ray] pins this minor release: Ray Data's API moves between releases
IO_CPUS = 0.25  # CPUs of each read and write task
ROWS_PER_FILE = 16_384
JOB_RERUNS = 2  # jobs again for rows that did not reach the store (a lost worker's block)


def _until_stored(job, rows: list, where: str, log) -> None:
    """Run `job(rows)` (a Ray job that writes rows and returns those not found written) until all
    are there. Ray Data can finish a job without the rows of a block whose actor died (seen with
    kill -9 of a worker), so what is missing is computed again, as a rerun would, JOB_RERUNS
    times at most; then one line saying to run the command again."""
    for attempt in range(1 + JOB_RERUNS):
        rows = job(rows)
        if not rows:
            return
        if attempt < JOB_RERUNS:
            log(f"note: {len(rows)} photos did not reach {where} (a worker lost mid-run?): computing them again")
    raise DataError(f"{len(rows)} photos did not reach {where} after {1 + JOB_RERUNS} Ray jobs (workers lost?); "
                    "run the same command again: it computes only those")


def need_ray():
    """`ray` (with ray.data), or one line saying what to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise MissingDependency(f"--ray needs Ray {RAY_VERSION}: pip install 'retrain[ray]' (or pip install "
                                f"'ray[data]=={RAY_VERSION}.*'), then start a cluster (ray start --head)") from None
    return ray


def check_address(address: str) -> None:
    """Fail now, in one line, where nothing answers at the cluster's address (ray.init would wait
    minutes for it): a TCP connection to the head's port, nothing sent. `auto` is looked up as
    Ray does (RAY_ADDRESS, then the cluster this machine started last); ray:// is left to Ray."""
    import socket

    need_ray()
    if "://" in address:
        return
    try:
        from ray._private.services import canonicalize_bootstrap_address

        where = canonicalize_bootstrap_address(address)
    except ConnectionError:
        raise ConfigError(f"no Ray cluster found for --ray {address}: start one with ray start --head, or give "
                          f"its head's address (HOST:PORT)") from None
    except ValueError:
        raise ConfigError(f"--ray expects the Ray head's HOST:PORT (e.g. 10.0.0.5:6379) or auto, got "
                          f"'{address}'") from None
    except Exception:  # noqa: BLE001 - Ray's private helper moved: ray.init says what is wrong
        return
    if not where or ":" not in where:
        return
    host, port = where.rsplit(":", 1)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=10):
            pass
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise ConfigError(f"no Ray cluster at {address}: nothing answers at {where} ({why}); start one with "
                          f"ray start --head, or give its head's address") from None


def connect(address: str, *, log=None):
    """ray.init on an existing cluster. A loopback address (tests: 127.0.0.2) makes the driver use
    that address as its own too, so every byte stays on loopback."""
    ray = need_ray()
    if ray.is_initialized():
        return ray
    check_address(address)
    host = address.rsplit(":", 1)[0] if ":" in address else address
    kw = {}
    try:
        if ipaddress.ip_address(host).is_loopback:
            kw["_node_ip_address"] = host
    except ValueError:
        pass
    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR", configure_logging=True, **kw)
    except ConnectionError as e:
        raise ConfigError(f"no Ray cluster at {address} ({str(e).splitlines()[0][:160]}): start one with "
                          f"ray start --head, or give its head's address") from None
    return ray


def list_photos(image_dir) -> tuple[str, list[tuple[str, str]], list[dict]]:
    """(root, [(path, label)], skipped) of every photo under DIR's class folders, without reading
    them: scan's walk (symlink loops, special files and the rest left out with their reason), but
    no hashing: that is the workers' job in a distributed run."""
    from retrain import scan as scan_mod

    root = scan_mod._check_root(image_dir)
    walk = scan_mod._Walk()
    per_class = scan_mod._images_by_class(root, walk)
    scan_mod._check_shape(root, per_class, None)
    rows = [(p, c) for c in sorted(per_class) for p in per_class[c]]
    return str(root), rows, walk.skipped


def _pool_size(ray, actors: int | None, actor_cpus: float) -> tuple[int, float, int]:
    """(actors, cluster CPUs, nodes): `actors`, or as many as fit while leaving at least IO_CPUS
    per node for reading and writing (ray-project/ray#44687)."""
    cpus = ray.cluster_resources().get("CPU", 1)
    nodes = max(1, sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU")))
    return actors or max(1, int((cpus - nodes * 2 * IO_CPUS) // actor_cpus)), cpus, nodes


def _engine(bb, path, precision: str, batch: int, threads: int):
    """An actor's feature engine, as retrain.bottlenecks.feature_session makes it on one machine."""
    from retrain.runtime import OnnxEngine, make_session, openvino_session

    if precision == "bf16":
        return openvino_session(path, precision="bf16", size=bb.image_size, mean=bb.mean, std=bb.std,
                                batch=batch, threads=threads)
    return OnnxEngine(make_session(path, provider="cpu", threads=threads))


class Embedder:
    """A Ray Data actor: one feature session, called on batches of {bytes, path} rows; returns the
    store's rows (pyarrow), with an error instead of features for a photo that cannot be read."""

    def __init__(self, architecture: str, precision: str, dtype: str, root: str, batch: int, cpus: float):
        from retrain.architectures import get_backbone
        from retrain.features import features_onnx

        self.bb = get_backbone(architecture)
        self.dtype, self.root, self.batch = dtype, root, batch
        self.threads = max(1, int(cpus))
        self.engine = _engine(self.bb, features_onnx(self.bb, precision=precision), precision, batch, self.threads)

    def label_of(self, path: str) -> str:
        rel = os.path.relpath(path, self.root)
        return rel.split(os.sep, 1)[0]

    def __call__(self, batch):
        from retrain import images
        from retrain.pipeline import run_pipeline
        from retrain.store_format import digest_bytes, rows_table

        data, paths = list(batch["bytes"]), [str(p) for p in batch["path"]]
        paths = [p if p.startswith("/") or "://" in p else "/" + p for p in paths]
        keys = [digest_bytes(bytes(d)) for d in data]
        feats = np.full((len(data), self.bb.feature_dim), np.nan, np.float32)

        def on_batch(idx, out):
            feats[idx] = out.reshape(len(idx), self.bb.feature_dim)

        size, crop = self.bb.image_size, self.bb.crop_fraction
        fails, _ = run_pipeline(list(range(len(data))), lambda i: images.load(bytes(data[i]), size, crop), self.engine,
                                batch_size=self.batch, workers=self.threads, mean=self.bb.mean, std=self.bb.std,
                                on_batch=on_batch, quiet=True)
        errors = [fails.get(i) for i in range(len(data))]
        return rows_table(self.bb.feature_dim, self.dtype, keys, paths, [self.label_of(p) for p in paths], feats,
                          errors)


def embed_ray(image_dir, out, *, address: str, architecture: str = DEFAULT_ARCHITECTURE, precision: str = "auto",
              dtype: str = "float16", batch_size: int = 8, actors: int | None = None, actor_cpus: float = 1.0,
              rows_per_file: int = ROWS_PER_FILE, quiet: bool = True, log=None) -> dict:
    """`retrain embed --ray`: the rows missing from the store computed on the cluster at `address`.
    Returns the same dict as retrain.embed.embed."""
    from retrain.architectures import get_backbone
    from retrain.bottlenecks import choose_precision
    from retrain.progress import Log
    from retrain.store import FeatureStore
    from retrain.store_format import WRITE_OPTIONS

    log = log or Log.silent()
    t_start = time.perf_counter()
    ray = need_ray()  # before any work: one line if it is missing
    bb = get_backbone(architecture)
    precision = choose_precision(precision, provider="cpu")
    store = FeatureStore.create(out, bb, precision=precision, dtype=dtype, log=log)
    root, rows, skipped = list_photos(image_dir)
    done = store.done_paths()
    todo = [(p, c) for p, c in rows if p not in done]
    log(f"Found {len(rows)} images in {len({c for _, c in rows})} classes in {root}: {len(rows) - len(todo)} already "
        f"in the store, {len(todo)} to compute on the Ray cluster at {address}")
    errors: dict = {}
    seconds = 0.0
    if todo:
        connect(address, log=log)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = not quiet
        ctx.verbose_progress = False
        n_actors, cpus, nodes = _pool_size(ray, actors, actor_cpus)
        t0 = time.perf_counter()

        def job(rows):
            per_block = max(8, min(256, len(rows) // max(1, 4 * n_actors)))
            ds = ray.data.read_binary_files([p for p, _ in rows], include_paths=True, num_cpus=IO_CPUS,
                                            override_num_blocks=max(1, -(-len(rows) // per_block)))
            ds = ds.map_batches(Embedder, batch_size=per_block, batch_format="numpy", num_cpus=actor_cpus,
                                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=n_actors),
                                fn_constructor_kwargs={"architecture": bb.name, "precision": precision,
                                                       "dtype": dtype, "root": root, "batch": batch_size,
                                                       "cpus": actor_cpus})
            log(f"Embedding {len(rows)} photos on {n_actors} actor{'s' if n_actors > 1 else ''} of {actor_cpus:g} "
                f"CPU ({cpus:g} CPUs on {nodes} node{'s' if nodes > 1 else ''})")
            ds.write_parquet(store.path, filesystem=store.fs, min_rows_per_file=rows_per_file,
                             ray_remote_args={"num_cpus": IO_CPUS}, **WRITE_OPTIONS)
            store.refresh()
            done = store.done_paths()
            return [(p, c) for p, c in rows if p not in done]

        _until_stored(job, todo, store.where(), log)
        seconds = time.perf_counter() - t0
        wanted = {p for p, _ in todo}
        for t in store.iter_tables(["path", "error"], with_errors=True):
            for p, e in zip(t.column("path").to_pylist(), t.column("error").to_pylist()):
                if e is not None and p in wanted:
                    errors[p] = e
    return {"store": store.where(), "photos": len(rows), "computed": len(todo), "already": len(rows) - len(todo),
            "errors": errors, "skipped": skipped, "seconds": round(seconds, 3),
            "images_per_second": round(len(todo) / seconds, 1) if todo and seconds > 0 else None,
            "precision": precision, "dtype": store.dtype, "rows": len(store), "ray": address,
            "total_s": round(time.perf_counter() - t_start, 3)}


# ------------------------------------------------------------------------------ fit --ray

class FitEmbedder(Embedder):
    """fit --ray's actor: the driver's features graph (its bytes, sent with the actor: no node
    needs the backbone's weights, torch or the ONNX file it was cut from), run as
    retrain.bottlenecks.feature_session runs it; rows as Embedder's, in float32 like the cache.
    A node whose runtime would make other features than the driver's (another OpenVINO for bf16,
    another ONNX Runtime for int8, no bf16 units) is refused: its features would be cached under
    the driver's fingerprint."""

    def __init__(self, backbone, graph: bytes, precision: str, fingerprint: str, batch: int, cpus: float):
        import socket
        import tempfile

        from retrain.runtime import cpu_has_bf16

        try:
            import ray

            node = ray.util.get_node_ip_address()
        except Exception:  # noqa: BLE001 - only for the message
            node = socket.gethostname()
        if backbone.fingerprint(precision) != fingerprint:
            raise ConfigError(f"the Ray node {node} would compute other {precision} bottlenecks than this machine "
                              f"(another {'OpenVINO' if precision == 'bf16' else 'ONNX Runtime'}): install the "
                              "same versions on every node, or pass --bottleneck-precision fp32")
        if precision == "bf16" and not cpu_has_bf16():
            raise ConfigError(f"the Ray node {node} has no bf16 units (AMX, AVX-512 BF16), which this machine's "
                              "bf16 bottlenecks need: pass --bottleneck-precision fp32")
        self.bb, self.dtype, self.root, self.batch = backbone, "float32", "/", batch
        self.threads = max(1, int(cpus))
        # The graph's file is read once, by the engine: removed at once, as Ray ends an actor
        # by killing its process, where no finaliser would remove it.
        with tempfile.TemporaryDirectory(prefix="retrain-fit-") as tmp:
            path = os.path.join(tmp, "features.onnx")
            with open(path, "wb") as f:
                f.write(graph)
            self.engine = _engine(backbone, path, precision, batch, self.threads)


def bottlenecks_ray(items, backbone, cache, *, address: str, precision: str, batch_size: int = 8,
                    actors: int | None = None, actor_cpus: float = 1.0, quiet: bool = True,
                    log=None) -> tuple[dict[str, str], dict]:
    """`retrain fit DIR --ray ADDRESS`: the bottlenecks of `items` (scan's, hashed) that are not
    in `cache` computed on the cluster and added to the cache (flushed as they come, so a rerun
    after a crash computes only the rest). Identical files are computed once.

    Returns ({path: reason} for every item whose photo the cluster could not read, as the local
    pipeline words it; timing). A cluster that fails (a node cannot read the photos' paths) is a
    ConfigError in one line; what came back before is kept in the cache."""
    from retrain.cache import key_of, missing
    from retrain.progress import Log

    log = log or Log.silent()
    keys = [key_of(it.digest) for it in items]
    todo = missing(keys, cache)
    timing = {"address": address, "computed": 0, "cached": len(keys) - len(todo)}
    bad: dict[bytes, str] = {}  # the key of a photo that could not be read: why
    paths = []
    for j in todo:
        if os.path.isfile(items[j].path):
            paths.append(items[j].path)
        else:  # gone since the scan: skipped as without --ray (Ray Data would fail the whole job)
            bad[keys[j]] = "file not found"
    if paths:
        timing.update(_compute_on_cluster(paths, {items[j].path: keys[j] for j in todo}, backbone, cache, bad,
                                          address=address, precision=precision, batch_size=batch_size,
                                          actors=actors, actor_cpus=actor_cpus, quiet=quiet, log=log))
    timing["failed"] = len(bad)
    return {it.path: bad[k] for it, k in zip(items, keys) if k in bad}, timing


def _compute_on_cluster(paths, key_at, backbone, cache, bad, *, address, precision, batch_size, actors, actor_cpus,
                        quiet, log) -> dict:
    """bottlenecks_ray's Ray Data job: read -> FitEmbedder actors -> back to the driver, into
    `cache`; the reasons of photos that could not be read into `bad`. Returns its timing."""
    from retrain.features import features_onnx
    from retrain.progress import bar

    ray = connect(address, log=log)
    _mute_ray_console()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver's own bar counts what came back
    ctx.verbose_progress = False
    n_actors, cpus, nodes = _pool_size(ray, actors, actor_cpus)
    graph = features_onnx(backbone, precision=precision, log=log).read_bytes()
    per_block = max(8, min(256, len(paths) // max(1, 4 * n_actors)))
    log(f"Bottlenecks: {len(paths)} to compute on the Ray cluster at {address} ({n_actors} actor"
        f"{'s' if n_actors > 1 else ''} of {actor_cpus:g} CPU; {cpus:g} CPUs on {nodes} node"
        f"{'s' if nodes > 1 else ''})")
    t0 = time.perf_counter()
    try:
        ds = ray.data.read_binary_files(paths, include_paths=True, num_cpus=IO_CPUS,
                                        override_num_blocks=max(1, -(-len(paths) // per_block)))
        ds = ds.map_batches(FitEmbedder, batch_size=per_block, batch_format="numpy", num_cpus=actor_cpus,
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=n_actors),
                            fn_constructor_kwargs={"backbone": backbone, "graph": graph, "precision": precision,
                                                   "fingerprint": backbone.fingerprint(precision),
                                                   "batch": batch_size, "cpus": actor_cpus})
        with bar(total=len(paths), desc="Bottlenecks (Ray)", unit="img", quiet=quiet) as pbar:
            for t in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                got = _rows_back(t, cache.dim, key_at)
                cache.add(got["keys"], got["feats"])
                bad.update(got["bad"])
                pbar.update(t.num_rows)
    except Exception as e:  # noqa: BLE001 - a failed task or actor, or the cache (a full disk): one line
        raise ConfigError(_cluster_failed(address, e)) from None
    finally:
        cache.flush()  # what came back is kept, whatever stopped the run
    seconds = time.perf_counter() - t0
    log(f"Bottlenecks: {len(paths)} computed on the Ray cluster in {seconds:.1f} s "
        f"({len(paths) / max(seconds, 1e-9):.0f} images/s)")
    return {"computed": len(paths), "seconds": round(seconds, 3), "actors": n_actors, "nodes": nodes,
            "images_per_second": round(len(paths) / seconds, 1) if seconds > 0 else None}


def _mute_ray_console() -> None:
    """fit says what happened on the cluster in its own lines (and a failure in one): Ray's console
    messages are muted in this process (Ray Data's INFO lines, its tracebacks, the raylet's task
    errors it would print on stdout, where fit's summary line goes). Ray's log files keep them all."""
    import logging

    for h in logging.getLogger("ray.data").handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            h.setLevel(logging.CRITICAL)
    logging.getLogger("ray").setLevel(logging.CRITICAL)
    try:
        import ray._private.worker as ray_worker

        ray_worker._worker_logs_enabled = False  # also the switch of print_to_stdstream (Ray 2.60)
    except (ImportError, AttributeError):
        pass


def _rows_back(table, dim: int, key_at: dict) -> dict:
    """The features and errors of a batch of FitEmbedder's rows: keys and (n, dim) float32 of the
    rows that have features, and {the driver's key of the path: reason} for those that do not."""
    import pyarrow.compute as pc

    errors = table.column("error").to_pylist()
    bad = {}
    for p, e in zip(table.column("path").to_pylist(), errors):
        if e is not None and p in key_at:
            bad[key_at[p]] = e
    ok = table.filter(pc.is_null(table.column("error")))
    feats = ok.column("features").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return {"keys": [bytes(k) for k in ok.column("key").to_pylist()],
            "feats": np.asarray(feats, np.float32).reshape(ok.num_rows, dim), "bad": bad}


def _cluster_failed(address: str, e: Exception) -> str:
    """One line for a failed Ray job: a retrain error raised on a node (FitEmbedder's refusal)
    as it is, else the error under Ray's wrappers, with what to check."""
    from ray.exceptions import RayError

    from retrain.errors import RetrainError

    found, todo = [], [e]
    while todo and len(found) < 32:  # Ray keeps the original in .cause, in args, or as __cause__
        x = todo.pop(0)
        if any(x is f for f in found):
            continue
        found.append(x)
        todo += [c for c in (getattr(x, "cause", None), *getattr(x, "args", ()), x.__cause__, x.__context__)
                 if isinstance(c, BaseException)]
    for x in found:
        if isinstance(x, RetrainError) and not isinstance(x, RayError):
            return str(x)
    theirs = [x for x in found if not type(x).__module__.startswith("ray")]
    cause = theirs[0] if theirs else e
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    what = f"{type(cause).__name__}: {lines[-1] if lines else ''}".strip().rstrip(":")[:240]
    return (f"the Ray job on {address} failed ({what}): every node needs retrain installed and the photos at "
            "the same paths (a shared mount)")


# ------------------------------------------------------------------------------ label --out / --ray

def preds_schema():
    import pyarrow as pa

    pred = pa.struct([("label", pa.string()), ("score", pa.float32())])
    return pa.schema([("path", pa.string()), ("label", pa.string()), ("score", pa.float32()),
                      ("novelty", pa.float32()), ("unknown", pa.bool_()), ("top_k", pa.list_(pred)),
                      ("error", pa.string())])


def preds_table(paths, results):
    """classify()'s results as rows: path, label, top score, novelty (null for a model without
    it), unknown (the model's novelty or score threshold), top-k, error (null where read)."""
    import pyarrow as pa

    rows = {"path": [], "label": [], "score": [], "novelty": [], "unknown": [], "top_k": [], "error": []}
    for p, r in zip(paths, results):
        rows["path"].append(p)
        if "error" in r:
            for k, v in (("label", None), ("score", None), ("novelty", None), ("unknown", None), ("top_k", None),
                         ("error", r["error"])):
                rows[k].append(v)
            continue
        rows["label"].append(r["label"])
        rows["score"].append(r["predictions"][0]["score"])
        rows["novelty"].append(r.get("novelty"))
        rows["unknown"].append(bool(r.get("unknown", r["label"] == "unknown")))
        rows["top_k"].append(r["predictions"])
        rows["error"].append(None)
    return pa.Table.from_pydict(rows, schema=preds_schema())


class Labeller:
    """A Ray Data actor: the whole model.onnx (sent with the actor, so no node needs the run
    folder), called on batches of {bytes, path}."""

    def __init__(self, model_bytes: bytes, top_k: int, batch: int, cpus: float, tta):
        import tempfile

        from retrain.classifier import Classifier

        threads = max(1, int(cpus))
        with tempfile.TemporaryDirectory(prefix="retrain-label-") as tmp:  # read once (FitEmbedder)
            path = os.path.join(tmp, "model.onnx")
            with open(path, "wb") as f:
                f.write(model_bytes)
            self.clf = Classifier(path, provider="cpu", threads=threads, workers=threads)
        self.top_k, self.batch, self.tta = top_k, batch, tta

    def __call__(self, batch):
        paths = [str(p) for p in batch["path"]]
        paths = [p if p.startswith("/") or "://" in p else "/" + p for p in paths]
        results = self.clf.classify([bytes(b) for b in batch["bytes"]], top_k=self.top_k, batch_size=self.batch,
                                    tta=self.tta, quiet=True)
        return preds_table(paths, results)


def _preds_folder(out, model_path, top_k):
    """The predictions folder (made if missing) and the paths already in it. It belongs to one
    model: another model's folder is refused (give another --out)."""
    import json

    from retrain.files import sha256_file
    from retrain.store_format import filesystem, read_json, write_bytes

    fs, path = filesystem(out)
    import pyarrow.fs as pafs

    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise ConfigError(f"--out {out} is a file: give a folder for the predictions (Parquet)")
    meta = {"model_sha256": sha256_file(model_path), "top_k": top_k, "format": "retrain-predictions"}
    fs.create_dir(path, recursive=True)
    old = read_json(fs, f"{path}/_meta.json")
    if old is None:
        if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(path)):
            raise ConfigError(f"--out {out} is a folder retrain did not write: give a new or empty folder")
        write_bytes(fs, f"{path}/_meta.json", json.dumps(meta, indent=1).encode())
    elif old != meta:
        raise ConfigError(f"--out {out} holds predictions of another model or --top-k: give another --out")
    done = set()
    import pyarrow.parquet as pq

    for f in fs.get_file_info(pafs.FileSelector(path)):
        if f.base_name.endswith(".parquet") and not f.base_name.startswith("."):
            try:
                with fs.open_input_file(f.path) as fh:
                    done.update(pq.read_table(fh, columns=["path"]).column("path").to_pylist())
            except Exception:  # noqa: BLE001 - cut short by a kill: its rows are labelled again
                fs.delete_file(f.path)
    return fs, path, done


def label_to_store(model, paths: list[str], out, *, address: str | None = None, top_k: int = 5, batch_size: int = 8,
                   tta=None, actors: int | None = None, actor_cpus: float = 1.0, rows_per_file: int = 4096,
                   quiet: bool = True, log=None) -> dict:
    """`retrain label RUN DIR|MANIFEST --out PREDS [--ray ADDRESS]`: one row per photo in Parquet;
    photos already in PREDS are skipped (a rerun after a crash labels only the rest)."""
    from retrain.model import resolve_model_path
    from retrain.progress import Log

    log = log or Log.silent()
    if address:
        need_ray()
    model_path = resolve_model_path(model)
    fs, folder, done = _preds_folder(out, model_path, top_k)
    todo = [p for p in paths if p not in done]
    log(f"{len(paths)} photos: {len(paths) - len(todo)} already labelled in {out}, {len(todo)} to label"
        + (f" on the Ray cluster at {address}" if address and todo else ""))
    t0 = time.perf_counter()
    if todo and address:
        ray = connect(address, log=log)
        ray.data.DataContext.get_current().enable_progress_bars = not quiet
        n_actors, _, _ = _pool_size(ray, actors, actor_cpus)

        def job(rows):
            per_block = max(8, min(256, len(rows) // max(1, 4 * n_actors)))
            ds = ray.data.read_binary_files(rows, include_paths=True, num_cpus=IO_CPUS,
                                            override_num_blocks=max(1, -(-len(rows) // per_block)))
            ds = ds.map_batches(Labeller, batch_size=per_block, batch_format="numpy", num_cpus=actor_cpus,
                                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=n_actors),
                                fn_constructor_kwargs={"model_bytes": model_path.read_bytes(), "top_k": top_k,
                                                       "batch": batch_size, "cpus": actor_cpus, "tta": tta})
            ds.write_parquet(folder, filesystem=fs, min_rows_per_file=rows_per_file,
                             ray_remote_args={"num_cpus": IO_CPUS}, write_page_checksum=True)
            done = _preds_folder(out, model_path, top_k)[2]
            return [p for p in rows if p not in done]

        _until_stored(job, todo, str(out), log)
    elif todo:
        import uuid

        import pyarrow.parquet as pq

        from retrain.classifier import Classifier
        from retrain.progress import bar

        clf = Classifier(model_path, provider="auto")
        with bar(total=len(todo), desc="Labelling", unit="img", quiet=quiet) as pbar:
            for s in range(0, len(todo), rows_per_file):
                chunk = todo[s:s + rows_per_file]
                t = preds_table(chunk, clf.classify(chunk, top_k=top_k, batch_size=batch_size, tta=tta, quiet=True))
                name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
                tmp = f"{folder}/.tmp-{name}"
                with fs.open_output_stream(tmp) as f:
                    pq.write_table(t, f, write_page_checksum=True)
                fs.move(tmp, f"{folder}/{name}")
                pbar.update(len(chunk))
    seconds = time.perf_counter() - t0
    _, _, now = _preds_folder(out, model_path, top_k)
    return {"out": str(out), "photos": len(paths), "labelled": len(todo), "already": len(paths) - len(todo),
            "rows": len(now), "seconds": round(seconds, 3),
            "images_per_second": round(len(todo) / seconds, 1) if todo and seconds > 0 else None}
