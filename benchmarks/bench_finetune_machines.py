"""Does `retrain fit --fine-tune` give the same model on another kind of CPU? (issue 15, part 3)

    python benchmarks/bench_finetune_machines.py                      # seed 0, the four kernel sets
    python benchmarks/bench_finetune_machines.py --only fp32,fp32-avx2 --seed 1

One machine stands in for others by restricting the kernels PyTorch may use: ATen's vector
code (ATEN_CPU_CAPABILITY) and oneDNN's (ONEDNN_MAX_CPU_ISA), which do the convolutions and
matrix products of the unfrozen tail. Each variant is the real CLI in a fresh process:

- fp32: the shipped default (float32), every instruction this CPU has;
- fp32-avx2: float32 on AVX2 kernels only, as on an older or a non-AVX-512 machine;
- bf16-amx: --fine-tune-bf16 on Intel AMX (where the CPU has it);
- bf16-avx512: --fine-tune-bf16 on AVX-512 BF16 kernels without AMX, as on an AMD EPYC (Zen 4).

All variants share one activation cache, computed by the first (ONNX Runtime, float16): only the
training differs. The table gives each one's validation history, the kept epoch, its validation
and test accuracy, and how far its validation history is from the first variant's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import FLOWERS, machine  # noqa: E402

VARIANTS = {
    "fp32": ({}, []),
    "fp32-avx2": ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, []),
    "bf16-amx": ({}, ["--fine-tune-bf16"]),
    "bf16-avx512": ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, ["--fine-tune-bf16"]),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=FLOWERS)
    ap.add_argument("--only", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "finetune-machines.md")
    a = ap.parse_args()
    if not a.data.is_dir():
        sys.exit(f"data not found: {a.data}")
    names = a.only.split(",")
    if any(n not in VARIANTS for n in names):
        sys.exit(f"--only takes any of {', '.join(VARIANTS)}; got {a.only}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ft-machines-") as tmp:
        cache = Path(tmp) / "cache"
        for name in names:
            env_extra, flags = VARIANTS[name]
            run_dir = Path(tmp) / name
            cmd = [sys.executable, "-m", "retrain", "fit", str(a.data), "-o", str(run_dir), "--cache-dir", str(cache),
                   "-q", "--fine-tune", "--seed", str(a.seed), *flags]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env_extra})
            wall = time.perf_counter() - t0
            if p.returncode != 0:
                sys.exit(f"{name} failed:\n{p.stderr[-3000:]}")
            rep = json.loads((run_dir / "report.json").read_text())
            ft = rep["train"]["fine_tune"]
            hist = [h["validation_accuracy"] for h in ft["history"]]
            rows.append({"variant": name, "env": env_extra, "flags": flags, "precision": ft["precision"],
                         "history": hist, "best_epoch": ft["best_epoch"],
                         "validation_accuracy": rep["metrics"]["validation"]["accuracy"],
                         "test_accuracy": rep["metrics"]["test"]["accuracy"], "wall_s": round(wall, 1),
                         "epoch_s": round(sum(h["seconds"] for h in ft["history"]) / max(1, len(hist)), 1)})
            print(json.dumps(rows[-1]), flush=True)
    ref = rows[0]["history"]
    lines = ["# Fine-tuning on other CPU kernels (`benchmarks/bench_finetune_machines.py`)", "",
             f"Machine: {machine()}. Seed {a.seed}, `retrain fit {a.data.name} --fine-tune` with the shipped "
             "recipe; the activations cached once and shared; each variant restricts the kernels PyTorch uses.", "",
             "| variant | environment | precision | validation accuracy per epoch | kept epoch | validation | "
             f"test (n={rep['metrics']['test']['n']}) | largest gap to {rows[0]['variant']} per epoch | epoch | wall |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        env = " ".join(f"{k}={v}" for k, v in r["env"].items()) or "(this CPU)"
        gap = max((abs(x - y) for x, y in zip(r["history"], ref)), default=0.0)
        lines.append(f"| {r['variant']} | {env} | {r['precision']} | {' '.join(f'{h:.1%}' for h in r['history'])} "
                     f"| {r['best_epoch']} | {r['validation_accuracy']:.2%} | {r['test_accuracy']:.2%} "
                     f"| {gap * 100:.2f} points | {r['epoch_s']} s | {r['wall_s']:.0f} s |")
    lines += ["", f"Reproduce: `python benchmarks/bench_finetune_machines.py --only {a.only} --seed {a.seed}`", ""]
    a.out.write_text("\n".join(lines))
    a.out.with_suffix(".json").write_text(json.dumps({"machine": machine(), "seed": a.seed, "rows": rows}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
