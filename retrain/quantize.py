"""The fast forms of a model: int8 static quantization and float16, as `retrain export` makes them.

(The int8 *backbone* for int8 bottlenecks is made by retrain.features.quantize_backbone_int8,
calibrated on the photos shipped with retrain; this one quantizes a whole trained model,
calibrated on the run's own training photos.)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from retrain.errors import ModelError

def optimize_for_quantization(src: Path, dst: Path, log=None) -> Path:
    """ONNX Runtime's quantization pre-processing: shape inference + graph optimisation (folds the
    backbone's computed 'same' padding into the convolutions). Falls back to the source graph."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        # skip_symbolic_shape: ONNX inference gives the same graph here, and the symbolic pass
        # saves a temp model into the current folder when it cannot finish
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        return dst
    except Exception as e:  # an unusual graph: quantize it as it is
        if log:
            log(f"quantization pre-processing skipped ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})")
        return src


def quantize_model_int8(src: Path, dst: Path, calibration: np.ndarray, *, mean, std, quant_format: str = "qdq",
                  per_channel: bool = True, method: str = "minmax", quiet: bool = True, log=None) -> dict:
    """Static int8 quantization of `src` calibrated on uint8 images (n, H, W, 3). Returns its settings.

    Activations uint8, weights int8 (the U8S8 pair the x86 VNNI/AMX kernels run fastest). The
    classifier head (Gemm/MatMul, Softmax) stays float: it is a tiny share of the work and keeps
    the probabilities smooth.
    """
    from onnxruntime import quantization as Q

    from retrain import images
    from retrain.progress import bar

    batch = 16
    pbar = bar(total=len(calibration), desc="Calibrating", unit="img", quiet=quiet)

    class Reader(Q.CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= len(calibration):
                return None
            x = calibration[self.i:self.i + batch]
            self.i += len(x)
            pbar.update(len(x))
            return {"input": images.normalize(x, mean, std)}

        def rewind(self):
            self.i = 0

    with tempfile.TemporaryDirectory(prefix="retrain-quant-") as tmp:
        pre = optimize_for_quantization(src, Path(tmp) / "pre.onnx", log=log)
        fmt = Q.QuantFormat.QDQ if quant_format == "qdq" else Q.QuantFormat.QOperator
        cm = {"minmax": Q.CalibrationMethod.MinMax, "percentile": Q.CalibrationMethod.Percentile,
              "entropy": Q.CalibrationMethod.Entropy}[method]
        import onnx

        # The head stays float; every other quantizable op (Conv, Clip, Add, ...) is quantized:
        # leaving Clip (ReLU6) out makes its Conv's range the un-clipped one and costs ~2 points.
        head = [n.name for n in onnx.load(str(pre), load_external_data=False).graph.node
                if n.op_type in ("Gemm", "MatMul", "Softmax")]
        try:
            Q.quantize_static(str(pre), str(dst), Reader(), quant_format=fmt, per_channel=per_channel,
                              activation_type=Q.QuantType.QUInt8, weight_type=Q.QuantType.QInt8,
                              nodes_to_exclude=head, calibrate_method=cm, reduce_range=False,
                              # MinMax: fold ranges every 4 batches, so memory stays flat in N
                              extra_options={"CalibMaxIntermediateOutputs": 4})
        except Exception as e:
            raise ModelError(f"int8 quantization failed: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
        finally:
            pbar.close()
    return {"quant_format": quant_format, "per_channel": per_channel, "calibration_method": method,
            "calibration_images": int(len(calibration)), "activations": "uint8", "weights": "int8",
            "float_ops_kept": ["classifier head (Gemm/MatMul)", "Softmax"]}


def convert_fp16(src: Path, dst: Path) -> dict:
    """float16 weights and activations; the model's input and output stay float32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    m = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(m, str(dst))
    return {"weights": "float16", "activations": "float16", "io": "float32"}
