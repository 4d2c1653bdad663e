"""Does this CPU's int8 keep the backbone's features? Full-range and 7-bit int8 weights against fp32.

    python benchmarks/bench_int8_kernels.py [--architecture efficientnet_lite0]

Quantizes the backbone as `--bottleneck-precision int8` does (static, QOperator, per-channel
int8 weights, uint8 activations, calibrated on the photos in retrain/calibration), once with
full-range weights and once with 7-bit ones (ONNX Runtime's reduce_range), and prints each
one's mean cosine similarity to the fp32 features of the same photos and its speed against
fp32 in this process. On x86 CPUs without VNNI or AMX, ONNX Runtime's u8 x s8 kernels add
pairs of products in int16, which can overflow; retrain refuses int8 bottlenecks there
(retrain.runtime.cpu_lacks_int8_dot) and `retrain fit` keeps an int8 backbone only at a mean
cosine of 0.98 or more.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402


def per_image_ms(session, x: np.ndarray, rounds: int = 3) -> float:
    session.run(None, {"input": x[:8]})  # warm-up
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        session.run(None, {"input": x})
        best = min(best, time.perf_counter() - t)
    return best / len(x) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--architecture", default="efficientnet_lite0")
    args = ap.parse_args()

    import onnxruntime as ort

    from retrain.architectures import get_backbone
    from retrain.features import calibration_inputs, features_onnx, mean_cosine, quantize_graph_int8
    from retrain.runtime import cpu_flags, cpu_lacks_int8_dot

    bb = get_backbone(args.architecture)
    fp32 = features_onnx(bb)
    x = calibration_inputs(bb)
    cpu = "CPUExecutionProvider"
    ref_session = ort.InferenceSession(str(fp32), providers=[cpu])
    ref = ref_session.run(None, {"input": x})[0]
    fp32_ms = per_image_ms(ref_session, x)
    isa = sorted(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in cpu_flags())
    print(f"Machine: {machine()}; {' '.join(isa) or 'flags unknown'}")
    print(f"{bb.name} at {bb.image_size} px, {len(x)} calibration photos; "
          f"int8 {'refused' if cpu_lacks_int8_dot() else 'allowed'} here")
    print("| weights | mean cosine vs fp32 | time per photo vs fp32 |\n|---|---:|---:|")
    print(f"| fp32 | 1.0000 | 1.00x ({fp32_ms:.1f} ms) |")
    with tempfile.TemporaryDirectory() as tmp:
        for bits in (8, 7):
            q = Path(tmp) / f"int8-{bits}.onnx"
            quantize_graph_int8(fp32, q, x, reduce_range=bits == 7)
            s = ort.InferenceSession(str(q), providers=[cpu])
            cos = mean_cosine(ref, s.run(None, {"input": x})[0])
            ms = per_image_ms(s, x)
            print(f"| int8, {bits}-bit weights | {cos:.4f} | {ms / fp32_ms:.2f}x ({ms:.1f} ms) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
