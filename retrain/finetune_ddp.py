"""`retrain fit --fine-tune --nproc N`: the epochs of a fine-tune in N processes (PyTorch DDP).

The parent (`retrain fit`) does what one process does up to the epochs (retrain.finetune's
fine_tune: the frozen part's activations, computed once and cached, the net, the Loop), then,
in place of running train_epochs itself, writes what the epochs read into a temporary folder
of the cache: the activations (ActivationData) as .npy, the initial head, the settings as
JSON (never a pickle). It starts torchrun (torch.distributed.run) in a driver process of its
own, which starts the N ranks of this module. Each rank memory-maps the activations, builds
the same net, wraps it in DistributedDataParallel (gloo on CPU; NCCL when every rank has a GPU
of its own) and runs retrain.finetune's train_epochs: the same loop as one process, each rank
training on its share of every batch of 64 photos (the same order, views and mixing on every
rank), with the gradients averaged, validation scored by all and decided by rank 0. Rank 0
writes the checkpoint after each epoch, the epoch bar and messages, and at the end the best
epoch's weights (torch.save of tensors only), which the parent loads (weights_only=True) and
exports as with one process. Each rank gets cores / N threads (at least 1).

Loopback only, and no TCP listener at all for the rendezvous: torchrun's --standalone (and
its c10d TCPStore even when given 127.0.0.1) listens on every interface (::), so the
rendezvous and the ranks' process group use FileStores in the temporary folder, and gloo's
(or NCCL's) connections between ranks are bound to the loopback interface.

Failures are one line: a rank that dies (kill -9, out of memory) makes torchrun stop the
others at once, and the parent says which one and how, and that --resume continues from rank
0's last checkpoint. Ctrl-C in the parent stops the driver, which stops every rank; a rank
whose parent is gone (kill -9 of `retrain fit`) sees its input pipe close and exits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from retrain.backbone_split import load_torch
from retrain.errors import FineTuneProcessError, RetrainError

STOP_WAIT_S = 30  # after Ctrl-C: how long the driver may take to stop the ranks before it is killed


def fine_tune(cfg, bb, items, y, parts, *, W0, b0, views=0, distortions=None, cache_dir, checkpoint: Path,
              log=None):
    """retrain.finetune.fine_tune, with its epochs in cfg.nproc processes when that is above 1."""
    from functools import partial

    from retrain import finetune

    nproc = int(getattr(cfg, "nproc", 1) or 1)
    stats: dict = {}
    run_epochs = partial(launch, nproc=nproc, tmp_root=Path(cache_dir), stats=stats) if nproc > 1 else None
    ft = finetune.fine_tune(cfg, bb, items, y, parts, W0=W0, b0=b0, views=views, distortions=distortions,
                            cache_dir=cache_dir, checkpoint=checkpoint, log=log, run_epochs=run_epochs)
    ft.info["processes"] = nproc
    if nproc > 1:
        ft.info["threads_per_process"] = threads_per_rank(nproc)
        ft.info["processes_wall_s"] = stats.get("wall_s")  # torchrun: start, every epoch, end
    return ft


def threads_per_rank(nproc: int) -> int:
    return max(1, (os.cpu_count() or 1) // nproc)


# ------------------------------------------------------------------------ the parent

def launch(loop, *, nproc: int, tmp_root: Path, stats: dict | None = None) -> tuple[dict, list]:
    """Run train_epochs(loop) in `nproc` processes; returns rank 0's (best, history).
    stats["wall_s"]: how long the processes ran, from torchrun's start to rank 0's result."""
    import shutil

    from retrain.errors import MissingDependency
    from retrain.finetune import resume

    torch = load_torch()
    if not torch.distributed.is_available():
        raise MissingDependency("--nproc needs torch.distributed, which this build of PyTorch lacks; "
                                "run with --nproc 1")
    threads = threads_per_rank(nproc)
    if nproc > (os.cpu_count() or 1) and loop.device == "cpu":
        loop.log.warn(f"--nproc {nproc} on {os.cpu_count()} cores: the processes share cores, which is slower "
                      "than one process per core or fewer")
    tmp_root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".fine-tune-ranks-", dir=tmp_root))
    keep = False
    try:
        write_inputs(folder, loop, threads)
        if loop.cfg.resume:  # a missing or foreign checkpoint: one line here, before any process starts
            resume(loop.checkpoint, loop.sig, loop.net, loop.opt, loop.device)
        loop.log(f"  on {nproc} processes (PyTorch DDP, {'NCCL' if _nccl(loop.device, nproc) else 'gloo'}), "
                 f"{threads} thread{'s' if threads > 1 else ''} each")
        t0 = time.perf_counter()
        rc = run_driver(folder, nproc, threads)
        if stats is not None:
            stats["wall_s"] = round(time.perf_counter() - t0, 2)
        result = folder / "result.pt"
        if rc == 0 and result.is_file():
            r = torch.load(result, map_location="cpu", weights_only=True)
            return r["best"], r["history"]
        keep = bool(os.environ.get("RETRAIN_DEBUG"))
        raise failure(folder, nproc, rc, loop)
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def _nccl(device: str, nproc: int) -> bool:
    torch = load_torch()
    return device == "cuda" and torch.distributed.is_nccl_available() and nproc <= torch.cuda.device_count()


def write_inputs(folder: Path, loop, threads: int) -> None:
    """What every rank reads: the activations (.npy), the initial head, the settings (JSON)."""
    torch = load_torch()
    fields = {}
    for f in dataclasses.fields(loop.data):
        v = getattr(loop.data, f.name)
        if isinstance(v, np.ndarray) or torch.is_tensor(v):
            a = v if isinstance(v, np.ndarray) else v.detach().cpu().contiguous().numpy()
            np.save(folder / f"{f.name}.npy", a, allow_pickle=False)
            fields[f.name] = "numpy" if isinstance(v, np.ndarray) else "torch"
        else:
            fields[f.name] = {"value": list(v) if isinstance(v, tuple) else v}
    head = loop.net.head
    np.save(folder / "W0.npy", head.weight.detach().cpu().numpy().T.copy(), allow_pickle=False)
    np.save(folder / "b0.npy", head.bias.detach().cpu().numpy().copy(), allow_pickle=False)
    spec = {"config": loop.cfg.to_dict(), "signature": loop.sig, "checkpoint": str(Path(loop.checkpoint).absolute()),
            "threads": threads, "data": fields, "watch_stdin": True}
    (folder / "spec.json").write_text(json.dumps(spec))


def run_driver(folder: Path, nproc: int, threads: int) -> int:
    """The driver (torchrun) in a session of its own; returns its exit status. Ctrl-C stops it
    (and so every rank) before KeyboardInterrupt goes on."""
    import retrain

    lo = loopback_interface()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), GLOO_SOCKET_IFNAME=lo, NCCL_SOCKET_IFNAME=lo,
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")  # no TCPStore for the ranks: they use a FileStore
    src = str(Path(retrain.__file__).resolve().parents[1])  # `-m retrain.finetune_ddp` from a checkout too
    env["PYTHONPATH"] = os.pathsep.join([src] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    with open(folder / "driver.log", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "retrain.finetune_ddp", "torchrun", str(folder), str(nproc)],
                                stdin=subprocess.PIPE, stdout=out, env=env, start_new_session=True)
    try:
        while True:
            try:
                return proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
    except BaseException:  # Ctrl-C (or any error here): stop every rank, then go on
        _stop(proc)
        raise
    finally:
        proc.stdin.close()  # a rank still there sees its input close and exits


def _stop(proc) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)  # torchrun stops its ranks, then exits
        proc.wait(timeout=STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except ProcessLookupError:
        pass


def loopback_interface() -> str:
    import socket

    try:
        names = [n for _, n in socket.if_nameindex()]
    except (OSError, AttributeError):
        names = []
    for n in ("lo", "lo0"):
        if n in names:
            return n
    return next((n for n in names if n.startswith("lo")), "lo")


def failure(folder: Path, nproc: int, rc: int, loop) -> RetrainError:
    """The one-line error of a failed run of the ranks, the cause before its consequences: a
    rank's own retrain error (bad input, ...), else a rank killed by a signal (the others then
    fail in their collectives: "connection reset by peer"), else the first rank's error, else
    which rank exited and how; and what --resume will continue from."""
    from retrain import errors

    def retrain_error(e: dict):
        cls = getattr(errors, e.get("type", ""), None)
        return cls if isinstance(cls, type) and issubclass(cls, RetrainError) else None

    hint = _resume_hint(Path(loop.checkpoint), loop.cfg.resume)
    errs = [json.loads(p.read_text()) for p in sorted(folder.glob("error-rank*.json"), key=lambda p: p.stat().st_mtime)]
    own = [e for e in errs if retrain_error(e)]
    f = {}
    if (folder / "failure.json").is_file():
        f = json.loads((folder / "failure.json").read_text())
    killed = f.get("rank") is not None and f.get("signal")
    if own or (errs and not killed):
        e = (own or errs)[0]
        return (retrain_error(e) or FineTuneProcessError)(f"{e['message']} (fine-tuning process {e['rank']} of "
                                                          f"{nproc}){hint}")
    if f.get("rank") is None:
        return FineTuneProcessError(f"the {nproc} fine-tuning processes stopped (exit status {rc}) without a "
                                    f"result{hint}")
    how = (f"was killed by {f['signal']}" if f.get("signal")
           else f"exited with status {f.get('exitcode')}")
    return FineTuneProcessError(f"fine-tuning process {f['rank']} of {nproc} (pid {f.get('pid')}) {how}, so the "
                                f"others were stopped{hint}")


def _resume_hint(checkpoint: Path, resumed: bool) -> str:
    again = "run the same command again" if resumed else "run the same command with --resume"
    if not checkpoint.is_file():
        return "; no epoch had finished: run the command again"
    try:
        epoch = int(load_torch().load(checkpoint, map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # noqa: BLE001 - the hint only
        return f"; {again} to continue from the last checkpoint"
    return f"; the checkpoint after epoch {epoch} is in {checkpoint}: {again} to continue from it"


# ------------------------------------------------------------------------ the driver: torchrun

def drive(folder: Path, nproc: int) -> int:
    """torchrun, with its messages in driver.log (the user's stderr stays rank 0's) and its
    failure as failure.json. Where the parent is gone at the end (kill -9), removes the folder."""
    parent = os.getppid()
    try:
        return _torchrun(folder, nproc)
    finally:
        if os.getppid() != parent:  # orphaned: nobody else will remove the activations
            import shutil

            shutil.rmtree(folder, ignore_errors=True)


def _torchrun(folder: Path, nproc: int) -> int:
    log = open(folder / "driver.log", "a", buffering=1)  # noqa: SIM115 - for the life of the process
    sys.stdout = sys.stderr = log
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = ["--nnodes", "1", "--nproc-per-node", str(nproc), "--max-restarts", "0",
            "--rdzv-backend", "c10d", "--rdzv-conf", "store_type=file",
            "--rdzv-endpoint", str(folder / "rendezvous"), "--rdzv-id", folder.name, "--local-addr", "127.0.0.1",
            "--log-dir", str(folder / "torchrun"),  # else a torchelastic_* folder left in the user's /tmp per run
            "-m", "retrain.finetune_ddp", "rank", str(folder)]
    try:
        run.main(args)
    except ChildFailedError as e:
        rank, f = e.get_first_failure()
        sig = f.signal_name() if f.exitcode < 0 else ""
        (folder / "failure.json").write_text(json.dumps({"rank": rank, "exitcode": f.exitcode, "pid": f.pid,
                                                         "signal": sig if sig != "<N/A>" else ""}))
        return 1
    except (SignalException, KeyboardInterrupt):
        return 130
    return 0


# ------------------------------------------------------------------------ a rank

def rank_main(folder: Path) -> int:
    """One rank (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK): train_epochs on its share;
    rank 0 writes result.pt. Rank 0 keeps the user's stderr (bar and messages); the others
    write to rank<N>.log. An error is one line in error-rank<N>.json."""
    import traceback

    rank = int(os.environ["RANK"])
    spec = json.loads((folder / "spec.json").read_text())
    fd = os.open(folder / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    if rank:
        os.dup2(fd, 2)
    if spec.get("watch_stdin"):
        _exit_with_parent()
    try:
        best, history = train_rank(folder, spec, rank, int(os.environ["WORLD_SIZE"]),
                                   int(os.environ.get("LOCAL_RANK", rank)))
        if rank == 0:
            torch = load_torch()
            tmp = folder / "result.pt.part"
            torch.save({"best": best, "history": history}, tmp)
            os.replace(tmp, folder / "result.pt")
        return 0
    except KeyboardInterrupt:
        return 130
    except RetrainError as e:
        _write_error(folder, rank, type(e).__name__, str(e))
        return 2
    except Exception as e:  # noqa: BLE001 - a bug: one line for the parent, the traceback in the log
        with open(fd, "a", closefd=False) as f:
            traceback.print_exc(file=f)
        _write_error(folder, rank, "", f"internal error ({type(e).__name__}: {str(e)[:200]})")
        return 1


def train_rank(folder: Path, spec: dict, rank: int, world: int, local_rank: int):
    import inspect

    torch = load_torch()
    import torch.distributed as dist

    from retrain.bottlenecks import plan_backbone
    from retrain.config import FitConfig
    from retrain.finetune import build_net, make_loop, pick_device, train_epochs
    from retrain.progress import Log

    cfg = FitConfig(**spec["config"])
    torch.set_num_threads(int(spec["threads"]))
    device, backend, device_ids = pick_device(cfg.provider), "gloo", None
    if device == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        if _nccl(device, world):
            backend, device_ids = "nccl", [local_rank]
    dist.init_process_group(backend, store=dist.FileStore(str(folder / "store"), world), rank=rank,
                            world_size=world)
    bb = plan_backbone(cfg, "fp32", log=Log.silent())[0].tuned_network
    W0 = np.load(folder / "W0.npy", allow_pickle=False)
    b0 = np.load(folder / "b0.npy", allow_pickle=False)
    net, _start, _n = build_net(bb, cfg.unfreeze, W0, b0, device)
    data = read_data(folder, spec["data"], device)
    # Batch norm statistics are frozen in the tail (its train() keeps them in eval mode), so no
    # SyncBatchNorm: only the gradients need averaging, not the buffers (the same on every rank).
    ddp = torch.nn.parallel.DistributedDataParallel
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
               else {"broadcast_buffers": False})  # the first name is torch 2.13's, the second older ones'
    net.ddp = ddp(torch.nn.Sequential(net.tail, net.drop, net.head), device_ids=device_ids, **no_sync)
    log = Log(cfg.quiet) if rank == 0 else Log.silent()
    # Dropout and stochastic depth: other masks on each rank; seeded where one process seeds
    # (retrain.finetune.fine_tune), after the networks are built, so rank 0 draws as it would.
    torch.manual_seed(cfg.seed + 1_000_003 * rank)
    loop = make_loop(cfg, net, data, spec["signature"], Path(spec["checkpoint"]), device, log, rank=rank,
                     world=world)
    best, history = train_epochs(loop)
    dist.destroy_process_group()
    return best, history


def read_data(folder: Path, fields: dict, device: str):
    """The ActivationData that write_inputs wrote: numpy arrays memory-mapped, tensors on `device`."""
    torch = load_torch()
    from retrain.finetune import ActivationData

    kw = {}
    for name, kind in fields.items():
        if kind == "numpy":
            kw[name] = np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        elif kind == "torch":
            t = torch.from_numpy(np.load(folder / f"{name}.npy", allow_pickle=False)).to(device)
            kw[name] = t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
        else:
            v = kind["value"]
            kw[name] = tuple(v) if isinstance(v, list) else v
    return ActivationData(**kw)


def _write_error(folder: Path, rank: int, kind: str, message: str) -> None:
    tmp = folder / f"error-rank{rank}.json.part"
    tmp.write_text(json.dumps({"rank": rank, "type": kind, "message": message.strip().splitlines()[0][:500]
                               if message.strip() else kind}))
    os.replace(tmp, folder / f"error-rank{rank}.json")


def _exit_with_parent() -> None:
    """Exit when stdin, a pipe whose other end only `retrain fit` holds, closes: the parent
    ended (even by kill -9) or gave up on the ranks."""
    import threading

    def watch():
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        os._exit(1)

    threading.Thread(target=watch, name="retrain-parent-watch", daemon=True).start()


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "torchrun":
        return drive(Path(argv[1]), int(argv[2]))
    if len(argv) == 2 and argv[0] == "rank":
        return rank_main(Path(argv[1]))
    print("usage: python -m retrain.finetune_ddp (torchrun FOLDER N | rank FOLDER); run by retrain fit --nproc",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
