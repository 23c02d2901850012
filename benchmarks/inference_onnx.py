"""TorchScript, ONNX export, ONNX Runtime sessions, graph statistics and int8 quantization for
benchmarks/bench_inference.py."""
import os
from typing import Callable, List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

import common
from inference_models import (CALIBRATION_PHOTOS, FOLDED, GN, HELD_OUT_PHOTOS, Setting, batch_of,
                              normalise, photographs)

# ------------------------------------------------------------------------------------------------
# Runtimes


def torchscript(program: nn.Module, example: Tuple[torch.Tensor, ...]):
    """Traced and frozen (freezing folds eval-mode batch norm into the conv before it)."""
    traced = torch.jit.trace(program.eval(), example, check_trace=False)
    return torch.jit.optimize_for_inference(torch.jit.freeze(traced))


def export_onnx(program: nn.Module, example: Tuple[torch.Tensor, ...], input_names: Sequence[str],
                path: str) -> None:
    """The legacy TorchScript-based exporter, batch and image sizes dynamic, opset 17."""
    # Distinct names per input: a shared name would tell ONNX Runtime the sizes are equal.
    dynamic = {name: {0: f"{name}_n", 2: f"{name}_h", 3: f"{name}_w"} for name in input_names}
    with torch.no_grad():
        torch.onnx.export(program.eval(), example, path, input_names=list(input_names),
                          dynamic_axes=dynamic, opset_version=17, dynamo=False)


def ort_session(path: str, threads: int, optimized_path: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def ort_runner(session, names: Sequence[str], tensors: Sequence[torch.Tensor]) -> Callable:
    feed = {n: t.numpy() for n, t in zip(names, tensors)}
    return lambda: session.run(None, feed)



# ------------------------------------------------------------------------------------------------
# Graph statistics and quantization


NORM_OPS = ("BatchNormalization", "InstanceNormalization", "GroupNormalization",
            "LayerNormalization", "ReduceMean")
CONV_OPS = ("Conv", "FusedConv", "NchwcConv", "QLinearConv", "ConvInteger")


# ONNX Runtime's NCHWc layout conversions: each one is a copy of the activation.
REORDER_OPS = ("ReorderInput", "ReorderOutput")
# Nodes that compute nothing at run time.
FREE_OPS = ("Constant", "Identity")


def graph_stats(path: str) -> dict:
    """Of an ONNX file: nodes that compute (no Constant/Identity), conv nodes, norm nodes by op
    type, layout reorders and the file size."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    ops = [node.op_type for node in graph.node]
    return {"nodes": sum(op not in FREE_OPS for op in ops),
            "conv": sum(op in CONV_OPS for op in ops),
            "norm": {op: ops.count(op) for op in NORM_OPS if op in ops},
            "reorders": sum(op in REORDER_OPS for op in ops), "mb": os.path.getsize(path) / 2**20}


class _Calibration:
    """onnxruntime.quantization.CalibrationDataReader over a list of (1, 3, H, W) arrays."""

    def __init__(self, name: str, arrays: List[np.ndarray]):
        self._items = iter([{name: a} for a in arrays])

    def get_next(self):
        return next(self._items, None)


def quantize(fp32_path: str, calibration: List[np.ndarray], out_dir: str, stem: str) -> dict:
    """int8 models of `fp32_path`: dynamic (weights int8, activations quantised per call) and
    static QDQ (per-channel weights, activations calibrated with MinMax on `calibration`)."""
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quant_pre_process, quantize_dynamic, quantize_static)

    pre = os.path.join(out_dir, f"{stem}_pre.onnx")
    quant_pre_process(fp32_path, pre, skip_symbolic_shape=True)
    paths = {"int8 dynamic": os.path.join(out_dir, f"{stem}_int8_dynamic.onnx"),
             "int8 static": os.path.join(out_dir, f"{stem}_int8_static.onnx")}
    quantize_dynamic(pre, paths["int8 dynamic"], weight_type=QuantType.QInt8)
    quantize_static(pre, paths["int8 static"], _Calibration("images", calibration),
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return paths


def relative_error(reference: Sequence[np.ndarray], other: Sequence[np.ndarray]) -> float:
    """max over FPN levels of ‖other − reference‖ / ‖reference‖."""
    return max(float(np.linalg.norm(o - r) / np.linalg.norm(r)) for r, o in zip(reference, other))



def quantization_study(variants, onnx_paths, setting: Setting, args, repeats: int) -> List[dict]:
    """int8 backbone+FPN of (a) and (c): ms at `setting`, file size, feature error vs fp32."""
    held_out = photographs(HELD_OUT_PHOTOS, setting.height, setting.width)
    calibration = photographs(CALIBRATION_PHOTOS, setting.height, setting.width)
    out = []
    runners, outputs = {}, {}
    for v in (FOLDED, GN):
        model = variants[v]
        fp32 = onnx_paths[("backbone+FPN", v)]
        calib = [normalise(model, im[None]).numpy() for im in calibration]
        paths = {"fp32": fp32, **quantize(fp32, calib, args.output, f"backbone_{v[1]}")}
        x = normalise(model, batch_of(held_out, setting.batch))
        for kind, path in paths.items():
            session = ort_session(path, args.threads)
            runners[(v, kind)] = ort_runner(session, ["images"], (x,))
            outputs[(v, kind)] = [session.run(None, {"images": normalise(model, im[None]).numpy()})
                                  for im in held_out]
            out.append({"variant": v, "model": kind, "mb": os.path.getsize(path) / 2**20})
    ms = common.time_interleaved(runners, repeats)
    for row in out:
        key = (row["variant"], row["model"])
        row["ms"] = ms[key] * 1e3
        row["ms_fp32"] = ms[(row["variant"], "fp32")] * 1e3
        row["error"] = max(relative_error(ref, got) for ref, got in
                           zip(outputs[(row["variant"], "fp32")], outputs[key]))
    return out
