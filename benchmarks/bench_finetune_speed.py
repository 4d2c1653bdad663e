"""What makes one `--fine-tune` training step faster on this machine: the levers of issue 15, part 4.

    python benchmarks/bench_finetune_speed.py                 # every variant, 3 interleaved rounds
    python benchmarks/bench_finetune_speed.py --only baseline,unfreeze-5 --rounds 5
    python benchmarks/bench_finetune_speed.py --profile      # where the baseline's step goes

One training step is what each epoch repeats: the unfrozen tail of EfficientNet-Lite0 (real
ImageNet weights, `retrain.backbone_split.make_tail`) forward and backward on a batch of cached
activations (random values of the cached shape), the head, label-smoothed cross entropy and an
AdamW step, exactly as retrain.finetune builds them. Each variant changes one lever against the
shipped recipe ("baseline": float32, channels-last, batch 64, --unfreeze 8, every core). The
variants run interleaved, round after round, in one process, and the table gives the median
time per photo and its ratio to the baseline's median: the ratio, not the milliseconds, is what
carries to another machine or another load.

torch.compile is timed after its warm-up steps (which compile), and the compile time is
printed apart: on a fine-tune of 8 epochs of 37 steps it is paid once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine  # noqa: E402

# name -> what differs from the baseline
VARIANTS = {
    "baseline": {},
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
    """The trainable tail + head, optimizer and loss of one variant, and a batch to train on."""
    import torch

    from retrain import finetune
    from retrain.architectures import get_backbone
    from retrain.backbone_split import activation_shape, make_tail, split_point
    from retrain.features import build_torch

    bb = get_backbone("efficientnet_lite0")
    bb = bb.at_size(bb.train_size or bb.image_size)
    model = build_torch(bb)
    start = split_point(model, opts.get("unfreeze", 8))
    shape = activation_shape(bb, start)
    fmt = torch.channels_last if opts.get("channels_last", True) else torch.contiguous_format
    tail = make_tail(model, start).to(memory_format=fmt)
    head = torch.nn.Linear(1280, 5)
    drop = torch.nn.Dropout(finetune.DROPOUT)
    params = [{"params": tail.parameters(), "lr": finetune.HEAD_LR * finetune.TAIL_LR_FACTOR},
              {"params": head.parameters(), "lr": finetune.HEAD_LR}]
    opt = torch.optim.AdamW(params, weight_decay=finetune.WEIGHT_DECAY)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=finetune.LABEL_SMOOTHING)
    n = opts.get("batch", finetune.BATCH)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=g).to(memory_format=fmt)
    y = torch.randint(0, 5, (n,), generator=g)

    def forward(xb):
        return head(drop(tail(xb)))

    fwd = torch.compile(forward) if opts.get("compile") else forward
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if opts.get("bf16") else \
        (lambda: torch.autocast("cpu", enabled=False))

    def step():
        tail.train()
        with amp():
            loss = loss_fn(fwd(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, n, shape


def profile() -> int:
    """The baseline's step under torch.profiler: the operators that take its time."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(os.cpu_count() or 1)
    step, _, _ = build({})
    step(), step()  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


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
            "float32, channels-last, batch 64, --unfreeze 8, all cores"
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
