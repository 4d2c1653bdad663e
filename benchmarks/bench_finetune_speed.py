"""What makes one `--fine-tune` training step faster on this machine: the levers of issue 15, part 4.

    python benchmarks/bench_finetune_speed.py                 # every variant, 3 interleaved rounds
    python benchmarks/bench_finetune_speed.py --only baseline,unfreeze-5 --rounds 5
    python benchmarks/bench_finetune_speed.py --profile      # where the baseline's step goes

One training step is what each epoch repeats: the unfrozen tail of EfficientNet-Lite0 (real
ImageNet weights) forward and backward on a batch of cached activations (random values of the
cached shape), dropout, the head (small random weights, as the L-BFGS head a fit starts from),
label-smoothed cross entropy and an AdamW step, built by retrain.finetune's own build_net,
make_optimizer, make_loss and autocast. Each variant changes one lever against the shipped
recipe ("baseline": float32, channels-last, batch 64, --unfreeze 8, every core, batch norms
folded into the convolutions, freed memory kept as in the fit's epochs). The variants run
interleaved, round after round, in one process, and the table gives the median time per photo
and its ratio to the baseline's median: the ratio, not the milliseconds, is what carries to
another machine or another load.

torch.compile is timed after its warm-up steps (which compile), and the compile time is
printed apart: on a fine-tune of 8 epochs of 37 steps it is paid once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine  # noqa: E402

from retrain.runtime import heap_kept  # noqa: E402

# name -> what differs from the baseline
VARIANTS = {
    "baseline": {},
    "unfolded-norms": {"fold_norms": False},
    "fresh-pages": {"heap_kept": False},
    "contiguous": {"channels_last": False},
    "bf16-autocast": {"bf16": True},
    "batch-128": {"batch": 128},
    "batch-32": {"batch": 32},
    "one-thread": {"threads": 1},
    "torch.compile": {"compile": True},
    "unfreeze-6": {"unfreeze": 6},
    "unfreeze-5": {"unfreeze": 5},
}


def build(opts: dict):
    """One variant's training step, built by retrain.finetune itself (its Trainable, optimizer,
    loss and autocast), on a batch of random activations of the cached shape."""
    import numpy as np
    import torch

    from retrain import finetune
    from retrain.architectures import get_backbone
    from retrain.backbone_split import activation_shape
    from retrain.config import FitConfig

    bb = get_backbone("efficientnet_lite0")
    bb = bb.at_size(bb.train_size or bb.image_size)
    k = 5
    g = np.random.default_rng(0)
    net, start, _ = finetune.build_net(bb, opts.get("unfreeze", 8), (0.02 * g.standard_normal((1280, k))).astype(np.float32),
                                       np.zeros(k, np.float32), "cpu")
    if opts.get("fold_norms") is False:  # the tail with the library's blocks: norms and pads as ops
        from retrain.backbone_split import make_tail
        from retrain.features import build_torch

        net.tail = make_tail(build_torch(bb), start, fold_norms=False)
    shape = activation_shape(bb, start)
    fmt = torch.channels_last if opts.get("channels_last", True) else torch.contiguous_format
    net.tail.to(memory_format=fmt)
    cfg = FitConfig()
    opt, _ = finetune.make_optimizer(net, cfg)
    y = g.integers(0, k, opts.get("batch", finetune.BATCH))
    loss_fn = finetune.make_loss(cfg, y, k, "cpu")
    amp = finetune.autocast("cpu", bool(opts.get("bf16")))
    x = torch.from_numpy(g.standard_normal((len(y), *shape)).astype(np.float32)).to(memory_format=fmt)
    y = torch.from_numpy(y)
    fwd = torch.compile(net) if opts.get("compile") else net

    def step():  # as finetune.train_one_epoch does for each batch (without mixup)
        net.tail.train()
        with amp():
            loss = loss_fn(fwd(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, len(y), shape


def profile() -> int:
    """The baseline's step under torch.profiler: the operators that take its time."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(os.cpu_count() or 1)
    step, _, _ = build({})
    with heap_kept():  # as the baseline is timed
        step(), step()  # warm-up
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(3):
                step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    # The convolutions by kind: depthwise (a weight of shape (C, 1, k, k)) or not (1x1 here).
    ms: dict = {}
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in ("aten::mkldnn_convolution", "aten::convolution_backward") and len(e.input_shapes) > 2:
            w = e.input_shapes[1] if e.key == "aten::mkldnn_convolution" else e.input_shapes[2]
            kind = "depthwise" if len(w) == 4 and w[1] == 1 else "pointwise (1x1)"
            part = "forward" if e.key == "aten::mkldnn_convolution" else "backward"
            ms[(kind, part)] = ms.get((kind, part), 0.0) + e.self_cpu_time_total / 1000 / 3
    total = prof.key_averages().total_average().self_cpu_time_total / 1000 / 3
    print(f"\nOne step: {total:.0f} ms of CPU time (batch {finetune_batch()})\n")
    print("| convolutions | forward, ms | backward, ms | share of the step |")
    print("|---|---:|---:|---:|")
    for kind in ("pointwise (1x1)", "depthwise"):
        f, b = ms.get((kind, "forward"), 0.0), ms.get((kind, "backward"), 0.0)
        print(f"| {kind} | {f:.0f} | {b:.0f} | {(f + b) / total:.0%} |")
    return 0


def finetune_batch() -> int:
    from retrain import finetune

    return finetune.BATCH


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant and round (default 6)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--profile", action="store_true", help="profile 3 steps of the baseline instead (torch.profiler)")
    a = ap.parse_args()
    if a.profile:
        return profile()
    names = a.only.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or "baseline" not in names:
        sys.exit(f"--only takes baseline plus any of {', '.join(VARIANTS)}; got {a.only}")
    import torch

    cores = os.cpu_count() or 1
    built, compile_s = {}, {}
    for name in names:
        torch.set_num_threads(VARIANTS[name].get("threads", cores))
        t0 = time.perf_counter()
        step, n, shape = build(VARIANTS[name])
        for _ in range(3 if VARIANTS[name].get("compile") else 1):  # warm-up (and compile)
            step()
        if VARIANTS[name].get("compile"):
            compile_s[name] = time.perf_counter() - t0
        built[name] = (step, n, shape)
    per_photo = {name: [] for name in names}
    for r in range(a.rounds):
        for name in names:
            torch.set_num_threads(VARIANTS[name].get("threads", cores))
            step, n, _ = built[name]
            # as in the fit's epochs, freed memory is kept (retrain.runtime.heap_kept), unless the
            # variant measures glibc's default: a fresh mapping for every large block
            with heap_kept() if VARIANTS[name].get("heap_kept", True) else contextlib.nullcontext():
                step()  # the first step after a switch grows the heap
                for _ in range(a.steps):
                    t0 = time.perf_counter()
                    step()
                    per_photo[name].append((time.perf_counter() - t0) / n)
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True)
    base = statistics.median(per_photo["baseline"])
    print(f"Machine: {machine()}; torch {torch.__version__}; load average before "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| variant | what differs from the baseline | activations (C, h, w) | ms per photo (median) | "
          "time / baseline |")
    print("|---|---|---|---:|---:|")
    rows = []
    for name in names:
        med = statistics.median(per_photo[name])
        what = ", ".join(f"{k}={v}" for k, v in VARIANTS[name].items()) or \
            "float32, channels-last, batch 64, --unfreeze 8, all cores, norms folded, freed memory kept"
        if name in compile_s:
            what += f" (compile + warm-up {compile_s[name]:.0f} s, once)"
        rows.append({"variant": name, "ms_per_photo": med * 1e3, "ratio": med / base, "shape": built[name][2],
                     "compile_seconds": compile_s.get(name)})
        print(f"| {name} | {what} | {tuple(built[name][2])} | {med * 1e3:.2f} | {med / base:.2f} |")
    if a.json:
        a.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
