"""`retrain fit --fine-tune`: unfreeze the last blocks of the backbone and train them with the head.

Why it is fast on a CPU: the frozen prefix (stem + the first blocks) is run once per image
and view with ONNX Runtime, and its activations are cached like bottlenecks (float16, keyed
by image digest, split point and view). Each epoch then runs only the unfrozen tail in
PyTorch (by default the last 8 blocks, at 10x10 and 5x5 on 160 px training views), in
float32 on a CPU (bf16 autocast with --fine-tune-bf16: no faster on 2 cores, and its rounding
differs between Intel AMX and AMD AVX-512 BF16 kernels; BENCHMARKS.md, issue 15), CUDA with
bf16 autocast when present.
The tail's batch norms, frozen, run folded into its convolutions (backbone_split.conv_bn).

Recipe (chosen on the flowers' validation split; BENCHMARKS.md): AdamW, the tail at half the
head's learning rate, linear warm-up then cosine decay, label smoothing, manifold mixup of the
cached activations, dropout before the head, batch norm statistics frozen (small batches),
stochastic depth as in the backbone, one random cached view per training image per epoch (6
distorted views and the centre one, drawn up front from the seed, so that only the views drawn
are computed: about 3.8 of the 7 a photo has over 4 epochs; view_draws), those views at 160/224 of the backbone's side (Lite0: 160
px, scored at 224 px: the distorted views zoom in, so objects keep their size, and an epoch
costs about 0.6x), 8 epochs, of which the last 4 on the centre views at 224 px, the side the
model is scored at ("FixRes"; BENCHMARKS.md, issue 15: what each lever of one training step
costs on 2 cores, the faster recipes tried, and the training side, seventh and eleventh passes). The epoch
with the best calibrated validation cross entropy is kept; in the second half of the schedule
training stops after PATIENCE epochs without improvement. A checkpoint (torch.save of tensors only) is written after each epoch;
`--resume` continues an interrupted fine-tune from it (loaded with weights_only=True).
It trains one network: of the default Lite0 + Lite1, Lite0 (Backbone.tuned_network), Lite1
staying frozen beside it. After it, fit keeps this head, an L-BFGS one on the fine-tuned
features beside the frozen networks' ones (refitted on train + validation), or a weighted sum of
the two, whichever validation prefers (retrain.final_layer.final_layer_on_fine_tuned), and the
model is one graph of all the networks.

The result is exported as the same self-contained ONNX model as a head-only fit: the whole
backbone with the fine-tuned weights, plus the head. The split of the backbone (prefix, tail,
the cached activations, the export) is retrain.backbone_split; fine_tune() and its stages are
here. Both import torch only when they run. `--nproc N` runs the same epoch loop (train_epochs)
in N processes, each on its share of every batch: retrain.finetune_ddp.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from retrain.backbone_split import load_torch as _torch
from retrain.backbone_split import make_tail, prefix_activations, split_point
from retrain.errors import ConfigError
from retrain.runtime import heap_kept

CHECKPOINT_SCHEMA = 1
# Recipe, chosen on the flowers' validation split (BENCHMARKS.md, issues 3 and 15): with no
# distortion flag, 6 cached views per training image, distorted more strongly than the head-only
# default. (3 views and 6 epochs fit in 5 minutes on 2 cores but lost about a point of
# validation accuracy over 3 seeds: issue 15, third pass.)
DEFAULT_VIEWS = 6
DEFAULT_DISTORTIONS = {"flip_left_right": True, "random_crop": 20.0, "random_scale": 30.0, "random_brightness": 15.0}
HEAD_LR = 6e-4
TAIL_LR_FACTOR = 0.5
WEIGHT_DECAY = 0.05
LABEL_SMOOTHING = 0.1
BATCH = 64
WARMUP_EPOCHS = 1
PATIENCE = 3  # epochs without a better validation score before stopping, counted in the second half
MIXUP_ALPHA = 0.2  # manifold mixup at the split point: Beta(alpha, alpha) mixing; 0 = off
DROPOUT = 0.2  # on the pooled features, before the head (as EfficientNet-Lite was trained)
# The training views' side as a share of the backbone's (1.0: the same side). The distorted views
# zoom in (a box of 0.64-0.83 of the centre crop), so at a smaller side the objects are the size
# they are at test time ("FixRes", Touvron et al. 2019), and every epoch costs less.
TRAIN_SIDE_RATIO = 160 / 224
# The last epochs train on the training photos' centre views at the scoring side instead (with a
# smaller TRAIN_SIDE_RATIO only): the tail then ends on the resolution it is scored at (FixRes).
# Chosen on validation over 3 seeds (BENCHMARKS.md, issue 15, seventh and eleventh passes): 160 px
# alone lost 7% of the calibrated cross entropy; of the last 2, 3, 4 or 5 of 8 epochs at 224 px,
# 4 scored the lowest (mean 0.1235; 2: 0.1366, 3: 0.1294, 5: 0.1296).
FULL_SIDE_EPOCHS = 4


def train_side(bb) -> int:
    """The side of the fine-tune's training views: TRAIN_SIDE_RATIO of bb's, a multiple of 16."""
    if TRAIN_SIDE_RATIO == 1.0:
        return bb.image_size
    return int(TRAIN_SIDE_RATIO * bb.image_size / 16 + 0.5) * 16


def view_draws(seed: int, n_train: int, views: int, epochs: int) -> np.ndarray:
    """Which cached view each training photo trains on in each epoch: (epochs, n_train) slots, 0
    its centre view and 1..views its distorted ones, uniform with replacement. Drawn from the seed
    alone, before any activation is computed, so that only the drawn views are (prefix_activations'
    slots); a stream of its own, apart from the order and mixing of the batches."""
    rng = np.random.default_rng([seed, 0x76696577])  # "view"
    return rng.integers(0, views + 1, size=(epochs, n_train)).astype(np.int16)


def drawn_slots(draws: np.ndarray, epochs: int, views: int) -> np.ndarray:
    """(n_train, 1 + views) bool: the views that the first `epochs` rows of `draws` train on, and
    every centre view."""
    n = draws.shape[1]
    slots = np.zeros((n, 1 + views), bool)
    slots[:, 0] = True
    for e in range(min(epochs, len(draws))):
        slots[np.arange(n), draws[e]] = True
    return slots


def pick_device(provider: str = "auto") -> str:
    torch = _torch()
    if provider in ("auto", "cuda", "tensorrt") and torch.cuda.is_available():
        return "cuda"
    return "cpu"


# ------------------------------------------------------------------------ training

@dataclasses.dataclass
class FineTuneResult:
    tail_state: dict  # torch state dict of the tail
    W: np.ndarray  # (C, K) head on raw features
    b: np.ndarray  # (K,)
    features: np.ndarray  # (n, C) pooled features of every item's centre view, fine-tuned
    start: int
    history: list
    info: dict


def _signature(cfg, start, k, n_train, views, distortions, side) -> str:
    d = {"schema": CHECKPOINT_SCHEMA, "architecture": cfg.architecture, "start": start, "k": k,
         "n_train": n_train, "views": views, "train_side": side,
         "distortions": distortions.tag() if distortions else "",
         "epochs": cfg.epochs, "lr": cfg.learning_rate, "seed": cfg.seed,
         "class_weights": cfg.class_weights, "bf16": cfg.fine_tune_bf16, "image_dir": os.path.abspath(cfg.image_dir or "")}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def lr_at(step: int, total: int, warmup: int) -> float:
    """Multiplier of the base learning rate: linear warm-up, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def fine_tune(cfg, bb, items, y, parts, *, W0, b0, views=0, distortions=None, cache_dir,
              checkpoint: Path, log=None, run_epochs=None) -> FineTuneResult:
    """Fine-tune the last `cfg.unfreeze` blocks and the head (initialised at W0, b0) on the
    cached activations of the frozen part; keep the best epoch on validation.

    run_epochs: what runs the epoch loop on the Loop and returns (best, history): train_epochs
    here (the default), or retrain.finetune_ddp's launcher, which runs the same train_epochs
    in --nproc processes."""
    from retrain.progress import Log

    log = log or Log.silent()
    if not getattr(bb, "can_fine_tune", True):
        raise bb.fine_tune_error()  # a foreign ONNX backbone: head-only
    torch = _torch()

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    device = pick_device(cfg.provider)
    net, start, n_blocks = build_net(bb, cfg.unfreeze, W0, b0, device)
    # Epochs only at the scoring side (--epochs FULL_SIDE_EPOCHS or fewer): no smaller pool.
    side = train_side(bb) if cfg.epochs > FULL_SIDE_EPOCHS else bb.image_size
    at = "" if side == bb.image_size else f", trained on views at {side} px (scored at {bb.image_size} px)"
    log(f"Fine-tuning: blocks {start}-{n_blocks - 1} and the head unfrozen, on {device}{at}")
    # The epochs on the pool: all of them, or those before the last FULL_SIDE_EPOCHS at the scoring side.
    pool_epochs = cfg.epochs - FULL_SIDE_EPOCHS if side != bb.image_size else cfg.epochs
    draws = view_draws(cfg.seed, len(parts["train"]), views, cfg.epochs)
    acts = prefix_activations(
        items, bb, start, cache_dir, views=views, distortions=distortions, view_items=parts["train"],
        slots=drawn_slots(draws, pool_epochs, views), train_side=side, provider=cfg.provider,
        batch_size=cfg.batch_size, workers=cfg.workers or None, quiet=cfg.quiet, log=log)
    t_act = acts.timing
    if t_act.get("computed"):
        log(f"Frozen-part activations: {t_act['computed']} computed in {t_act.get('seconds', 0):.1f} s, "
            f"{t_act['cached']} from cache")
    data = ActivationData.build(acts, draws, y, parts, device)
    k = int(W0.shape[1])
    sig = _signature(cfg, start, k, len(parts["train"]), views, distortions, side)
    # Seeded again here: building a network (to export the frozen part, or to learn its shape)
    # draws from torch's generator, so without this the dropout and stochastic-depth masks, and so
    # the model, would depend on what the cache already held.
    torch.manual_seed(cfg.seed)
    loop = make_loop(cfg, net, data, sig, checkpoint, device, log)
    best, history = (run_epochs or train_epochs)(loop)

    # The best epoch on validation, in fp32, gives the features of every image.
    net.tail.load_state_dict(best["tail"])
    net.head.load_state_dict(best["head"])
    with heap_kept():
        feats = pooled_features(net, acts.centre, acts.shape, W0.shape[0])
    W = net.head.weight.detach().cpu().numpy().T.astype(np.float32)
    b = net.head.bias.detach().cpu().numpy().astype(np.float32)
    info = {"unfreeze": cfg.unfreeze, "first_unfrozen_block": start, "device": device,
            "precision": "bf16 autocast" if loop.bf16 else "fp32", "epochs_run": len(history),
            "best_epoch": best["epoch"], "head_learning_rate": loop.head_lr,
            "tail_learning_rate": loop.head_lr * TAIL_LR_FACTOR, "weight_decay": WEIGHT_DECAY,
            "label_smoothing": LABEL_SMOOTHING, "mixup_alpha": MIXUP_ALPHA, "dropout": DROPOUT,
            "batch_size": BATCH, "patience": PATIENCE,
            "activations": t_act, "views_per_image": views, "views_computed": int(len(acts.pool)),
            "training_side": side, "side": bb.image_size}
    return FineTuneResult({n: t.cpu() for n, t in best["tail"].items()}, W, b, feats, start, history, info)


@dataclasses.dataclass
class Loop:
    """What the epoch loop (train_epochs) works on: in this process, or in one of the --nproc
    processes (retrain.finetune_ddp), where `rank` of `world` says which, net.ddp averages the
    gradients, and each process trains on its share of the rows of every batch."""

    cfg: object
    net: Trainable
    data: ActivationData
    opt: object
    loss_fn: object
    amp: object  # the autocast context factory
    sched: Schedule
    sig: str  # the checkpoint's signature (data and settings)
    checkpoint: Path
    device: str
    log: object
    bf16: bool
    head_lr: float
    rank: int = 0
    world: int = 1


def make_loop(cfg, net, data, sig: str, checkpoint: Path, device: str, log, *, rank: int = 0,
              world: int = 1) -> Loop:
    """The optimizer, loss, schedule and precision of a fine-tune of `net` on `data`."""
    use_bf16 = device == "cpu" and cfg.fine_tune_bf16 and _cpu_has_bf16()
    opt, head_lr = make_optimizer(net, cfg)
    loss_fn = make_loss(cfg, data.ytr.cpu().numpy(), int(net.head.out_features), device)
    sched = Schedule.of(cfg.epochs, len(data.rows))
    return Loop(cfg, net, data, opt, loss_fn, autocast(device, use_bf16), sched, sig, Path(checkpoint), device,
                log, use_bf16, head_lr, rank, world)


def train_epochs(loop: Loop) -> tuple[dict, list]:
    """The epoch loop: train, validate, keep the best epoch, stop early, write the checkpoint
    (rank 0), or resume from it. The same in every process of --nproc: the validation scores
    are rank 0's, so every process takes the same decisions. Returns (best, history)."""
    torch = _torch()
    cfg, net, data, log, amp = loop.cfg, loop.net, loop.data, loop.log, loop.amp
    ranks = {"rank": loop.rank, "world": loop.world}
    rng = np.random.default_rng(cfg.seed)  # the same on every rank: one shared order of the photos
    acc0, ce0 = validate(net, data, amp, **ranks)
    best, history, epoch0 = snapshot(net, 0, acc0, ce0), [], 0
    log(f"  before fine-tuning: validation accuracy {acc0:.1%} (calibrated cross entropy {ce0:.4f})")
    if cfg.resume:
        best, history, epoch0 = resume(loop.checkpoint, loop.sig, net, loop.opt, loop.device)
        rng = np.random.default_rng([cfg.seed, epoch0])
        torch.manual_seed(cfg.seed + epoch0 + 1_000_003 * loop.rank)  # dropout: other masks on each rank
        log(f"  resumed after epoch {epoch0} from {loop.checkpoint}")

    # Early stopping counts only in the second half: warm-up, mixup and dropout make the first
    # epochs look worse than the initial head on validation (measured on the flowers).
    first_counted = cfg.epochs // 2 + 1
    stale = sum(1 for h in history[::-1][:PATIENCE] if h["epoch"] > best["epoch"] and h["epoch"] >= first_counted)
    with heap_kept():  # a step's activation maps reuse freed memory, not fresh pages (retrain.runtime)
        for epoch in range(epoch0 + 1, cfg.epochs + 1):
            if stale >= PATIENCE:
                log(f"  stopping early: no better calibrated validation cross entropy for {PATIENCE} epochs")
                break
            t0 = time.perf_counter()
            train_loss = train_one_epoch(net, data, loop.opt, loop.loss_fn, amp, loop.sched, epoch, rng,
                                         quiet=cfg.quiet or loop.rank > 0, **ranks)
            acc, ce = validate(net, data, amp, **ranks)
            h = {"epoch": epoch, "train_loss": round(train_loss, 5), "validation_accuracy": acc,
                 "validation_calibrated_cross_entropy": ce, "seconds": round(time.perf_counter() - t0, 2)}
            history.append(h)
            log(f"  epoch {epoch}: train loss {h['train_loss']:.4f}, validation accuracy {acc:.1%} "
                f"(calibrated cross entropy {ce:.4f}), {h['seconds']:.1f} s")
            if ce < best["validation_calibrated_cross_entropy"]:
                best, stale = snapshot(net, epoch, acc, ce), 0
            elif epoch >= first_counted:
                stale += 1
            if loop.rank == 0:
                save_checkpoint(loop.checkpoint, sig=loop.sig, epoch=epoch, net=net, opt=loop.opt, best=best,
                                history=history)
    return best, history


# ------------------------------------------------------------------------ the stages of fine_tune

def _cpu_has_bf16() -> bool:
    from retrain.runtime import cpu_has_bf16

    return cpu_has_bf16()


@dataclasses.dataclass
class Trainable:
    """The parts that learn: the unfrozen tail, dropout, the head."""

    tail: object
    drop: object
    head: object
    device: str
    ddp: object = None  # in a process of --nproc: the three in DistributedDataParallel (retrain.finetune_ddp)

    def __call__(self, x):
        """The training forward pass (through DDP, which averages the gradients, under --nproc)."""
        return self.ddp(x) if self.ddp is not None else self.head(self.drop(self.tail(x)))

    @classmethod
    def build(cls, model, start: int, W0, b0, device: str) -> "Trainable":
        torch = _torch()
        # channels_last: oneDNN's fast path for these 1x1 and depthwise convolutions (2-3x on CPU).
        tail = make_tail(model, start).to(device, memory_format=torch.channels_last)
        head = torch.nn.Linear(W0.shape[0], W0.shape[1]).to(device)
        drop = torch.nn.Dropout(DROPOUT)
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(np.ascontiguousarray(W0.T)))
            head.bias.copy_(torch.from_numpy(np.ascontiguousarray(b0)))
        return cls(tail, drop, head, device)


def build_net(bb, unfreeze: int, W0, b0, device: str):
    """The backbone's tail from block split_point(unfreeze) and the head at (W0, b0).
    Returns (Trainable, the first unfrozen block, the number of blocks)."""
    from retrain.features import build_torch

    model = build_torch(bb)
    start = split_point(model, unfreeze)
    return Trainable.build(model, start, W0, b0, device), start, len(model._blocks)


def batch_share(m: int, rank: int, world: int):
    """This process's rows of a batch of m under --nproc: (slice, number of rows, loss weight).
    The weight (its rows x world / m) makes DDP's average of the gradients that of the whole
    batch's mean loss; a process with no row trains on one at weight 0, so that every process
    takes part in each gradient average."""
    if world <= 1:
        return slice(None), m, 1.0
    lo, hi = rank * m // world, (rank + 1) * m // world
    if hi == lo:
        return slice(0, 1), 0, 0.0
    return slice(lo, hi), hi - lo, (hi - lo) * world / m


@dataclasses.dataclass
class ActivationData:
    """Cached activations at the split point, as training and validation read them."""

    pool: np.ndarray  # (m, D') float16: the training photos' computed views, one row each
    rows: np.ndarray  # (n_train, 1 + V) int32: the pool row of a photo's centre view (slot 0) and
    #                   of its distorted views (1..V); -1 where not computed or unreadable
    draws: np.ndarray  # (epochs, n_train): the slot each photo trains on in each epoch (view_draws)
    ytr: object  # torch (n_train,)
    Xva: object  # torch (n_val, C, h, w), channels last
    yva: object  # torch (n_val,)
    shape: tuple  # (C, h, w) of validation
    pool_shape: tuple | None = None  # (C, h', w') of the pool's rows (at the training side); None: shape
    centre_tr: np.ndarray | None = None  # (n_train, D) float16: their centre views at `shape`, if not the pool's

    def __post_init__(self):
        self.pool_shape = tuple(self.pool_shape or self.shape)

    @classmethod
    def build(cls, acts, draws, y, parts, device) -> "ActivationData":
        """acts: the backbone_split.PrefixActivations of every photo, its pool (the training
        photos' views) used as it is; draws: view_draws'."""
        torch = _torch()
        tr, va = parts["train"], parts["validation"]
        Xva = torch.from_numpy(acts.centre[va].astype(np.float32).reshape(-1, *acts.shape)).to(
            device, memory_format=torch.channels_last)
        # The views that could not be read (NaN rows), a few rows at a time: no temporary the size of the pool.
        pool, rows = acts.pool, acts.rows.copy()
        unread = np.concatenate([~np.isfinite(pool[s:s + 1024]).all(axis=1) for s in range(0, len(pool), 1024)]
                                or [np.zeros(0, bool)])
        rows[(rows >= 0) & unread[np.maximum(rows, 0)]] = -1
        centre_tr = acts.centre[tr] if tuple(acts.pool_shape) != tuple(acts.shape) else None
        return cls(pool, rows, draws, torch.from_numpy(y[tr]).to(device), Xva,
                   torch.from_numpy(y[va]).to(device), tuple(acts.shape), tuple(acts.pool_shape), centre_tr)

    def view_rows(self, idx: np.ndarray, epoch: int) -> np.ndarray:
        """The pool rows that photos `idx` train on in `epoch` (1-based): the drawn view, or the
        first view of the photo that could be read where that one could not (its centre view)."""
        rows = self.rows[idx, self.draws[epoch - 1, idx]]
        for j in np.nonzero(rows < 0)[0]:
            readable = self.rows[idx[j]][self.rows[idx[j]] >= 0]
            if not len(readable):
                raise ConfigError("a training photo has no view whose frozen-part activations could be computed")
            rows[j] = readable[0]
        return rows


@dataclasses.dataclass
class Schedule:
    """Steps of the run: linear warm-up for WARMUP_EPOCHS, then cosine decay (lr_at)."""

    epochs: int
    steps_per_epoch: int
    total: int
    warmup: int

    @classmethod
    def of(cls, epochs: int, n_train: int) -> "Schedule":
        spe = max(1, math.ceil(n_train / BATCH))
        total = epochs * spe
        return cls(epochs, spe, total, min(WARMUP_EPOCHS * spe, total // 2 or 1))


def autocast(device: str, bf16: bool):
    """A context factory: bf16 autocast where the hardware has it, else a no-op."""
    torch = _torch()
    if bf16:
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    if device == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return lambda: torch.autocast("cpu", enabled=False)


def make_optimizer(net: Trainable, cfg):
    """AdamW, the tail at TAIL_LR_FACTOR of the head's rate. Returns (optimizer, head rate)."""
    torch = _torch()
    head_lr = cfg.learning_rate if cfg.learning_rate is not None else HEAD_LR
    opt = torch.optim.AdamW([{"params": net.tail.parameters(), "lr": head_lr * TAIL_LR_FACTOR},
                             {"params": net.head.parameters(), "lr": head_lr}], weight_decay=WEIGHT_DECAY)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    return opt, head_lr


def make_loss(cfg, ytr: np.ndarray, k: int, device: str):
    """Label-smoothed cross entropy, class-balanced with --class-weights balanced."""
    torch = _torch()
    cw = None
    if cfg.class_weights == "balanced":
        counts = np.bincount(ytr, minlength=k).astype(np.float32)
        cw = torch.from_numpy(len(ytr) / (k * np.maximum(counts, 1))).to(device)
    return torch.nn.CrossEntropyLoss(weight=cw, label_smoothing=LABEL_SMOOTHING)


def train_one_epoch(net: Trainable, data: ActivationData, opt, loss_fn, amp, sched: Schedule, epoch: int,
                    rng, *, quiet: bool = False, rank: int = 0, world: int = 1) -> float:
    """One pass over the training photos (one random cached view each, manifold mixup).
    Returns the mean training loss.

    Under --nproc every process draws the same random numbers (the same `rng` seed): the same
    order, views and mixing of each batch of BATCH photos, of which it trains on its share
    (batch_share); the others train on the rest of the same batch."""
    torch = _torch()
    from retrain.progress import bar

    net.tail.train()
    n = len(data.rows)
    full_side = data.centre_tr is not None and epoch > sched.epochs - FULL_SIDE_EPOCHS
    order = rng.permutation(n)
    seen = loss_sum = 0.0
    for s in bar(range(sched.steps_per_epoch), desc=f"Epoch {epoch}/{sched.epochs}", unit="batch", quiet=quiet):
        step = (epoch - 1) * sched.steps_per_epoch + s
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_at(step, sched.total, sched.warmup)
        idx = order[s * BATCH:(s + 1) * BATCH]
        if full_side:
            rows, shape = data.centre_tr[idx], data.shape  # the last epochs: at the scoring side
        else:  # each photo's view drawn for this epoch (view_draws)
            rows, shape = data.pool[data.view_rows(idx, epoch)], data.pool_shape
        xb = torch.from_numpy(rows.astype(np.float32).reshape(-1, *shape)).to(
            net.device, memory_format=torch.channels_last)
        yb = data.ytr[idx]
        lam = float(rng.beta(MIXUP_ALPHA, MIXUP_ALPHA)) if MIXUP_ALPHA > 0 else 1.0
        yb2 = yb
        if lam < 1.0:  # mix each activation map with another image's; the loss mixes labels alike
            perm = torch.from_numpy(rng.permutation(len(idx))).to(net.device)
            xb = lam * xb + (1 - lam) * xb[perm]
            yb2 = yb[perm]
        mine, rows, weight = batch_share(len(idx), rank, world)
        xb, yb, yb2 = xb[mine], yb[mine], yb2[mine]
        with amp():
            z = net(xb).float()
            loss = loss_fn(z, yb) if lam == 1.0 else lam * loss_fn(z, yb) + (1 - lam) * loss_fn(z, yb2)
        opt.zero_grad(set_to_none=True)
        (loss * weight if world > 1 else loss).backward()
        opt.step()
        seen += rows
        loss_sum += float(loss.detach()) * rows
    if world > 1:  # the mean over every process's rows
        t = torch.tensor([loss_sum, seen], dtype=torch.float64, device=net.device)
        torch.distributed.all_reduce(t)
        loss_sum, seen = t.tolist()
    return loss_sum / max(seen, 1)


def validate(net: Trainable, data: ActivationData, amp, *, rank: int = 0, world: int = 1) -> tuple[float, float]:
    """Validation accuracy and calibrated cross entropy (after the best temperature).

    Calibrated, because label smoothing makes the fine-tuned model less sure of itself than the
    initial head: raw cross entropy would penalise that, though a temperature (fitted
    afterwards anyway) undoes it.
    Under --nproc each process scores its share of the photos; rank 0 scores the gathered
    logits and every process gets its two numbers, so that all take the same decisions.
    """
    torch = _torch()
    from retrain.calibrate import fit_temperature, nll

    net.tail.eval()
    if not len(data.yva):
        return float("nan"), float("nan")
    n = len(data.Xva)
    lo, hi = (rank * n // world, (rank + 1) * n // world) if world > 1 else (0, n)
    outs = [torch.zeros(0, net.head.out_features, device=net.device)]
    with torch.no_grad(), amp():
        for s in range(lo, hi, 256):
            outs.append(net.head(net.tail(data.Xva[s:min(s + 256, hi)])).float())
    z = torch.cat(outs)
    if world > 1:
        z = _gather_rows(z, n, world)
    z = z.cpu().numpy().astype(np.float64)
    yv = data.yva.cpu().numpy()
    scores = [float((z.argmax(1) == yv).mean()), nll(z, yv, fit_temperature(z, yv))]
    if world > 1:
        t = torch.tensor(scores, dtype=torch.float64, device=net.device)
        torch.distributed.broadcast(t, 0)
        scores = t.tolist()
    return scores[0], scores[1]


def _gather_rows(z, n: int, world: int):
    """The (n, K) rows of every process, in order, from each one's share (rank * n // world ...)."""
    torch = _torch()
    size = -(-n // world)
    pad = torch.zeros(size, z.shape[1], dtype=z.dtype, device=z.device)
    pad[:len(z)] = z
    parts = [torch.empty_like(pad) for _ in range(world)]
    torch.distributed.all_gather(parts, pad)
    return torch.cat([parts[r][:(r + 1) * n // world - r * n // world] for r in range(world)])


def snapshot(net: Trainable, epoch: int, acc: float, ce: float) -> dict:
    """The state to keep as the best so far (copied to the CPU)."""
    return {"epoch": epoch, "validation_calibrated_cross_entropy": ce, "validation_accuracy": acc,
            "tail": {n: t.detach().cpu().clone() for n, t in net.tail.state_dict().items()},
            "head": {n: t.detach().cpu().clone() for n, t in net.head.state_dict().items()}}


def save_checkpoint(path: Path, *, sig, epoch, net: Trainable, opt, best, history) -> None:
    """Tensors and plain values only (loaded back with weights_only=True), written atomically."""
    torch = _torch()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    torch.save({"signature": sig, "epoch": epoch, "tail": net.tail.state_dict(), "head": net.head.state_dict(),
                "optimizer": opt.state_dict(), "best": best, "history": history}, tmp)
    os.replace(tmp, path)


def resume(path: Path, sig: str, net: Trainable, opt, device: str):
    """Load an interrupted run's checkpoint into net and opt. Returns (best, history, epoch)."""
    torch = _torch()
    if not path.is_file():
        raise ConfigError(f"--resume: no fine-tuning checkpoint at {path}; run without --resume")
    ck = torch.load(path, map_location=device, weights_only=True)
    if ck.get("signature") != sig:
        raise ConfigError(f"--resume: the checkpoint {path} was made with other data or settings; "
                          "run without --resume to start afresh")
    net.tail.load_state_dict(ck["tail"])
    net.head.load_state_dict(ck["head"])
    base = [g["base_lr"] for g in opt.param_groups]
    opt.load_state_dict(ck["optimizer"])
    for g, b in zip(opt.param_groups, base):
        g["base_lr"] = b
    return ck["best"], ck["history"], int(ck["epoch"])


def pooled_features(net: Trainable, centre: np.ndarray, shape, dim: int) -> np.ndarray:
    """(n, dim) float32 features of every photo's centre view through the tail (NaN rows kept)."""
    torch = _torch()
    net.tail.eval()
    feats = np.full((len(centre), dim), np.nan, np.float32)
    okrows = np.nonzero(np.isfinite(centre).all(1))[0]
    with torch.no_grad():
        for s in range(0, len(okrows), 256):
            r = okrows[s:s + 256]
            xr = torch.from_numpy(centre[r].astype(np.float32).reshape(-1, *shape)).to(
                net.device, memory_format=torch.channels_last)
            feats[r] = net.tail(xr).float().cpu().numpy()
    return feats
