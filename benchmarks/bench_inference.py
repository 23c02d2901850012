#!/usr/bin/env python
"""Inference cost of the same Mask R-CNN R50-FPN with MABN (folded or as FrozenBN), GN and FrozenBN.

Why MABN and not GroupNorm? The paper's answer is inference: MABN folds into the conv before it. This
benchmark measures that claim on the machine it runs on, with every variant timed side by side:

    (a) MABN folded   MABN → FrozenBN → folded into the conv: a plain conv net (the reference)
    (b) MABN→FrozenBN MABN converted to FrozenBatchNorm2d, not folded (stock Detectron2 deployment)
    (c) GN            GroupNorm(32) everywhere
    (d) FrozenBN      stock FrozenBatchNorm2d everywhere
    MABN as trained   the unconverted model in eval mode (eager only)

Programs: "backbone+FPN" (normalised image → p2…p6), "heads" (4conv1fc box head + predictor on a
fixed number of RoIs per image, mask head on a fixed number of detections) and, in eager PyTorch only,
the "whole model" end to end (RPN, NMS, RoIAlign, heads, mask pasting) with the counts forced fixed:
RPN NMS off so exactly PROPOSALS boxes reach the box head, score threshold 0 and NMS off so exactly
DETECTIONS boxes reach the mask head. Randomly initialised weights would otherwise decide how much
work the heads do. Runtimes: eager PyTorch, TorchScript (traced and frozen), ONNX Runtime (CPU);
with CUDA, eager fp32/fp16/bf16. Repeats are interleaved round-robin and medians reported, so that a
shared, noisy CPU slows every variant alike; ratios are to (a) measured in the same run.

Beyond speed: ONNX graph size and node kinds before and after ONNX Runtime's optimiser (are conv and
norm fused?), file sizes, and int8 dynamic/static quantization of (a) vs (c) in ONNX Runtime with the
relative error of the backbone features against fp32 on held-out photographs.

Weights are random (no trained R50 checkpoint here): every norm's statistics are calibrated on a few
photographs first, so activations have realistic scales for the quantization error.

    python benchmarks/bench_inference.py            # default: 565 s of CPU time on 2 cores
    python benchmarks/bench_inference.py --quick    # smaller images, 3 repeats: a check, too noisy to quote
    python benchmarks/bench_inference.py --tiny     # R18 with narrow heads: a smoke run in seconds

Needs `pip install -e ".[bench]"` (onnx, onnxruntime); writes OUTPUT/results.md, results.json and
ratios.png.
"""
import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from torch import nn

from mabn_det import MABN2d, convert_to_inference_form
from mabn_det.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "MABN": "configs/mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml",
    "GN": "configs/mask_rcnn_R_50_FPN_2x_gn_scratch.yaml",
    "FrozenBN": "configs/mask_rcnn_R_50_FPN_2x_bn_scratch.yaml",
}
NORM_KEYS = ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM",
             "MODEL.ROI_MASK_HEAD.NORM")
FOLDED, AS_FROZEN, GN, FROZEN, AS_TRAINED = (
    "(a) MABN folded", "(b) MABN→FrozenBN", "(c) GN", "(d) FrozenBN", "MABN as trained")
EXPORTED = (FOLDED, AS_FROZEN, GN, FROZEN)  # the variants a deployment would ship
EAGER, TORCHSCRIPT, ORT = "eager", "TorchScript", "ONNX Runtime"
# R18 with narrow heads: the same code paths at a fraction of the cost (smoke runs, tests).
TINY_OPTS = ["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
             "MODEL.FPN.OUT_CHANNELS", 64, "MODEL.ROI_BOX_HEAD.CONV_DIM", 64,
             "MODEL.ROI_BOX_HEAD.FC_DIM", 128, "MODEL.ROI_MASK_HEAD.CONV_DIM", 64]
CALIBRATION_PHOTOS = ("astronaut", "coffee", "chelsea")
HELD_OUT_PHOTOS = ("rocket", "immunohistochemistry", "cat")


class Setting:
    """One batch configuration: `batch` images of `height`×`width`, fixed RoI counts per image."""

    def __init__(self, batch: int, height: int, width: int, proposals: int, detections: int):
        self.batch, self.height, self.width = batch, height, width
        self.proposals, self.detections = proposals, detections

    @property
    def name(self) -> str:
        return f"batch {self.batch}, {self.height}×{self.width}"

    def describe(self) -> str:
        return (f"{self.name}, {self.proposals} proposals and {self.detections} detections "
                f"per image")


class BackboneFPN(nn.Module):
    """(B, 3, H, W) normalised images → the FPN levels p2…p6 as a tuple (traceable)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbone = model.backbone

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        features = self.backbone(images)
        return tuple(features[k] for k in sorted(features))


class Heads(nn.Module):
    """The normalised RoI heads on pooled features.

    forward(box_features (R, C, 7, 7), mask_features (D, C, 14, 14)) →
    (class scores (R, K+1), box deltas (R, 4K), mask logits (D, K, 28, 28)).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.box_head = model.roi_heads.box_head
        self.box_predictor = model.roi_heads.box_predictor
        self.mask_head = model.roi_heads.mask_head

    def forward(self, box_features: torch.Tensor, mask_features: torch.Tensor):
        scores, deltas = self.box_predictor(self.box_head(box_features))
        return scores, deltas, self.mask_head.layers(mask_features)


# ------------------------------------------------------------------------------------------------
# Models


def _config(norm: str, setting: Setting, opts: Sequence):
    fixed_counts = [
        "MODEL.DEVICE", "cpu",
        "MODEL.RPN.NMS_THRESH", 1.0,  # IoU > 1 never happens: no proposal is suppressed
        "MODEL.RPN.POST_NMS_TOPK_TEST", setting.proposals,
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
        "MODEL.ROI_HEADS.NMS_THRESH_TEST", 1.0,
        "TEST.DETECTIONS_PER_IMAGE", setting.detections,
    ]
    norms = [v for key in NORM_KEYS for v in (key, "FrozenBN")] if norm == "FrozenBN" else []
    return load_config(os.path.join(REPO, CONFIGS[norm]), fixed_counts + norms + list(opts))


@torch.no_grad()
def calibrate_norms(model: nn.Module, images: torch.Tensor) -> None:
    """Set every MABN2d / FrozenBatchNorm2d statistic from the data that reaches it.

    One eval forward of the whole model with a pre-hook per norm layer: each layer's statistic is set
    from its own input before it normalises it, so later layers see calibrated earlier ones. MABN
    gets the second moment χ = mean(x²) (its inference statistic), FrozenBN the mean and variance.

    Args:
        images: (N, 3, H, W) float BGR pixels in [0, 255].
    """
    def set_stats(module, inputs):
        x = inputs[0]
        if isinstance(module, MABN2d):
            module.running_var.copy_(x.pow(2).mean((0, 2, 3)))
        else:
            module.running_mean.copy_(x.mean((0, 2, 3)))
            module.running_var.copy_(x.var((0, 2, 3)))

    hooks = [m.register_forward_pre_hook(set_stats) for m in model.modules()
             if isinstance(m, (MABN2d, FrozenBatchNorm2d))]
    try:
        model.inference(_inputs(images), do_postprocess=False)
    finally:
        for h in hooks:
            h.remove()


def build_variants(setting: Setting, opts: Sequence, calibration: torch.Tensor) -> Dict[str, nn.Module]:
    """The five eval-mode models: same architecture, `setting`'s RoI counts, norms calibrated.

    Args:
        opts: KEY VALUE config overrides applied to every variant.
        calibration: (N, 3, H, W) float BGR images in [0, 255] for `calibrate_norms`.

    Returns:
        Variant name (FOLDED, AS_FROZEN, GN, FROZEN, AS_TRAINED) → model on the CPU.
    """
    variants = {}
    torch.manual_seed(0)
    mabn = build_model(_config("MABN", setting, opts)).eval()
    calibrate_norms(mabn, calibration)
    variants[FOLDED] = convert_to_inference_form(mabn, fold_into_conv=True)
    variants[AS_FROZEN] = convert_to_inference_form(mabn)
    torch.manual_seed(0)
    variants[GN] = build_model(_config("GN", setting, opts)).eval()
    torch.manual_seed(0)
    frozen = build_model(_config("FrozenBN", setting, opts)).eval()
    calibrate_norms(frozen, calibration)
    variants[FROZEN] = frozen
    variants[AS_TRAINED] = mabn
    return variants


def set_counts(model: nn.Module, setting: Setting) -> None:
    """Point a built model at `setting`'s RoI counts (they are plain attributes after build)."""
    model.proposal_generator.post_nms_topk = {False: setting.proposals, True: setting.proposals}
    model.roi_heads.box_predictor.test_topk_per_image = setting.detections


# ------------------------------------------------------------------------------------------------
# Inputs


def photographs(names: Sequence[str], height: int, width: int) -> torch.Tensor:
    """scikit-image's bundled photographs as (N, 3, height, width) float BGR in [0, 255]."""
    import skimage.data

    out = []
    for name in names:
        rgb = getattr(skimage.data, name)()
        if rgb.ndim == 2:
            rgb = np.stack([rgb] * 3, axis=-1)
        x = torch.from_numpy(np.ascontiguousarray(rgb[..., 2::-1])).permute(2, 0, 1).float()
        out.append(nn.functional.interpolate(x[None], size=(height, width), mode="bilinear",
                                             align_corners=False)[0])
    return torch.stack(out)


def batch_of(photos: torch.Tensor, batch: int) -> torch.Tensor:
    """`batch` images cycling through `photos` (N, 3, H, W)."""
    return photos[torch.arange(batch) % len(photos)].contiguous()


def _inputs(images: torch.Tensor) -> List[dict]:
    return [{"image": im, "height": im.shape[1], "width": im.shape[2]} for im in images]


def normalise(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What GeneralizedRCNN feeds its backbone: (x − PIXEL_MEAN) / PIXEL_STD."""
    return (images - model.pixel_mean) / model.pixel_std


def head_inputs(model: nn.Module, setting: Setting, seed: int = 0):
    """Random pooled features: (B·PROPOSALS, C, 7, 7) and (B·DETECTIONS, C, 14, 14).

    Their values do not change the cost of dense convs; their shapes are what the heads see.
    """
    g = torch.Generator().manual_seed(seed)
    channels = model.backbone.output_shape()["p2"].channels
    box = torch.randn(setting.batch * setting.proposals, channels, 7, 7, generator=g)
    mask = torch.randn(setting.batch * setting.detections, channels, 14, 14, generator=g)
    return box, mask


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
# Timing


def time_interleaved(runners: Dict[str, Callable[[], object]], repeats: int,
                     sync: Callable[[], None] = lambda: None) -> Dict[str, float]:
    """Median seconds per call of each runner, repeats interleaved round-robin.

    One warm-up call each, then `repeats` rounds; the starting runner rotates every round so that
    none always follows the same neighbour.
    """
    names = list(runners)
    times = {n: [] for n in names}
    with torch.no_grad():
        for n in names:
            runners[n]()
        sync()
        for r in range(repeats):
            for n in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                runners[n]()
                sync()
                times[n].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}


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
    return {"nodes": sum(op not in FREE_OPS for op in ops), "conv": sum(op in CONV_OPS for op in ops),
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


# ------------------------------------------------------------------------------------------------
# Reporting


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs visible, {torch.get_num_threads()} torch threads"


def versions() -> str:
    parts = [f"torch {torch.__version__}"]
    for module in ("onnxruntime", "onnx"):
        try:
            parts.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            parts.append(f"{module} missing")
    return ", ".join(parts)


def speed_table(rows: Dict[Tuple[str, str, str], float], program: str,
                settings: Sequence[Setting], runtimes: Sequence[str], variants: Sequence[str]) -> str:
    """Markdown: one row per variant, per (setting, runtime) ms and ratio to (a)."""
    cols = [(s.name, rt) for s in settings for rt in runtimes
            if any((program, s.name, rt, v) in rows for v in variants)]
    head = "| variant | " + " | ".join(f"{s}, {rt}" for s, rt in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for v in variants:
        if not any((program, s, rt, v) in rows for s, rt in cols):
            continue
        cells = []
        for s, rt in cols:
            ms = rows.get((program, s, rt, v))
            ref = rows.get((program, s, rt, FOLDED))
            cells.append("–" if ms is None else f"{ms:.0f} ms ({ms / ref:.2f}×)")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_ratios(rows: Dict[Tuple[str, str, str, str], float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({k[:3] for k in rows}, key=lambda k: list(rows).index(k + (FOLDED,)))
    variants = [v for v in (AS_FROZEN, GN, FROZEN, AS_TRAINED)
                if any(g + (v,) in rows for g in groups)]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(groups)), 4.8))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        ys = [rows[g + (v,)] / rows[g + (FOLDED,)] if g + (v,) in rows else np.nan for g in groups]
        ax.bar(np.arange(len(groups)) + (i - (len(variants) - 1) / 2) * width, ys, width, label=v)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(np.arange(len(groups)))
    short = {EAGER: "eager", TORCHSCRIPT: "TS", ORT: "ORT"}
    ax.set_xticklabels([f"{p}\n{s.replace('batch ', 'b').replace(', ', ' ')}\n{short.get(rt, rt)}"
                        for p, s, rt in groups], fontsize=7)
    ax.set_ylabel("time / time of (a) MABN folded")
    ax.legend(fontsize=8)
    ax.set_title("Inference time relative to MABN folded into the convs (lower is faster)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# CUDA


def cuda_timings(variants: Dict[str, nn.Module], settings: Sequence[Setting],
                 repeats: int) -> Tuple[dict, str]:
    """Eager fp32/fp16/bf16 on CUDA (weights cast), whole model under autocast; skips without CUDA.

    Returns:
        Rows keyed (program, setting name, runtime, variant) → ms, and a line naming the device.
    """
    if not torch.cuda.is_available():
        return {}, "CUDA: no device, skipped."
    rows = {}
    sync = torch.cuda.synchronize
    for s in settings:
        images = batch_of(photographs(CALIBRATION_PHOTOS, s.height, s.width), s.batch)
        for model in variants.values():
            set_counts(model, s)
        for dtype_name, dtype in (("fp32", torch.float32), ("fp16", torch.float16),
                                  ("bf16", torch.bfloat16)):
            runtime = f"CUDA {dtype_name}"
            backbone, heads, whole = {}, {}, {}
            for v, model in variants.items():
                cast = copy.deepcopy(model).cuda().to(dtype)
                x = normalise(model, images).cuda().to(dtype)
                box, mask = (t.cuda().to(dtype) for t in head_inputs(model, s))
                backbone[v] = (lambda p, a: lambda: p(a))(BackboneFPN(cast), x)
                heads[v] = (lambda p, a, b: lambda: p(a, b))(Heads(cast), box, mask)
                fp32 = copy.deepcopy(model).cuda()
                inputs = _inputs(images.cuda())
                whole[v] = (lambda m, i, d: lambda: _autocast_inference(m, i, d))(fp32, inputs, dtype)
            for program, runners in (("backbone+FPN", backbone), ("heads", heads),
                                     ("whole model", whole)):
                for v, sec in time_interleaved(runners, repeats, sync).items():
                    rows[(program, s.name, runtime, v)] = sec * 1e3
    return rows, f"CUDA: {torch.cuda.get_device_name()}"


def _autocast_inference(model: nn.Module, inputs: List[dict], dtype: torch.dtype):
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        return model.inference(inputs)


# ------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller images, 3 repeats")
    parser.add_argument("--tiny", action="store_true",
                        help="R18, narrow heads, tiny images, 1 repeat: checks the code paths only")
    parser.add_argument("--repeats", type=int, help="timed rounds per measurement (default 5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=os.path.join(REPO, "output", "bench_inference"))
    parser.add_argument("--no-quantization", action="store_true")
    parser.add_argument("opts", nargs="*", default=[], help="KEY VALUE config overrides for all")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.tiny:
        settings = [Setting(1, 64, 96, 8, 2), Setting(2, 64, 64, 4, 1)]
        repeats, opts = args.repeats or 1, TINY_OPTS + list(args.opts)
    elif args.quick:
        settings = [Setting(1, 192, 256, 20, 4), Setting(8, 64, 96, 4, 1)]
        repeats, opts = args.repeats or 3, list(args.opts)
    else:
        settings = [Setting(1, 320, 416, 50, 10), Setting(8, 128, 160, 8, 2)]
        repeats, opts = args.repeats or 5, list(args.opts)
    os.makedirs(args.output, exist_ok=True)
    began = time.perf_counter()
    header = (f"{datetime.date.today().isoformat()}; {machine()}; {versions()}; "
              f"{repeats} interleaved repeats, medians")
    print(header)

    first = settings[0]
    calibration = photographs(CALIBRATION_PHOTOS, first.height, first.width)
    variants = build_variants(first, opts, calibration)
    try:
        import onnxruntime  # noqa: F401
        have_ort = True
    except ImportError:
        have_ort = False
        print("onnxruntime is not installed (pip install -e '.[bench]'): ONNX Runtime skipped")

    rows: Dict[Tuple[str, str, str, str], float] = {}
    graphs: Dict[str, dict] = {}
    onnx_paths: Dict[Tuple[str, str], str] = {}
    traced: Dict[Tuple[str, str], torch.jit.ScriptModule] = {}
    for s in settings:
        photos = photographs(CALIBRATION_PHOTOS, s.height, s.width)
        images = batch_of(photos, s.batch)
        for model in variants.values():
            set_counts(model, s)
        programs = {}
        for v, model in variants.items():
            x = normalise(model, images)
            programs[("backbone+FPN", v)] = (BackboneFPN(model), (x,), ("images",))
            programs[("heads", v)] = (Heads(model), head_inputs(model, s), ("box", "mask"))
        for program in ("backbone+FPN", "heads"):
            runners = {}
            for v in variants:
                if v == AS_TRAINED and program != "backbone+FPN":
                    continue  # the backbone shows what skipping the conversion costs
                module, example, names = programs[(program, v)]
                runners[(EAGER, v)] = (lambda m, a: lambda: m(*a))(module, example)
                if v not in EXPORTED:
                    continue
                if (program, v) not in traced:  # traced once: the traces are shape-generic
                    traced[(program, v)] = torchscript(module, example)
                runners[(TORCHSCRIPT, v)] = (lambda m, a: lambda: m(*a))(traced[(program, v)],
                                                                          example)
                if have_ort:
                    key = (program, v)
                    if key not in onnx_paths:  # exported once, dynamic shapes
                        stem = f"{program.split('+')[0]}_{v[1]}"
                        onnx_paths[key] = os.path.join(args.output, f"{stem}.onnx")
                        export_onnx(module, example, names, onnx_paths[key])
                        optimized = os.path.join(args.output, f"{stem}_ort_optimized.onnx")
                        session = ort_session(onnx_paths[key], args.threads, optimized)
                        graphs[f"{program} {v}"] = {"exported": graph_stats(onnx_paths[key]),
                                                   "ORT-optimised": graph_stats(optimized)}
                    else:
                        session = ort_session(onnx_paths[key], args.threads)
                    runners[(ORT, v)] = ort_runner(session, names, example)
            for (rt, v), sec in time_interleaved(runners, repeats).items():
                rows[(program, s.name, rt, v)] = sec * 1e3
            print(f"  timed {program}, {s.name} ({time.perf_counter() - began:.0f} s)")
        counts = {}  # detections per image, recorded by every call: they must not vary

        def whole_model(v, model, inputs):
            def run():
                counts.setdefault(v, set()).update(len(o["instances"]) for o in model.inference(inputs))
            return run

        whole = {v: whole_model(v, variants[v], _inputs(images)) for v in EXPORTED}
        for v, sec in time_interleaved(whole, repeats).items():
            rows[("whole model", s.name, EAGER, v)] = sec * 1e3
        if any(c != {s.detections} for c in counts.values()):
            raise RuntimeError(f"detections per image should all be {s.detections}, got {counts}")
        print(f"  timed whole model, {s.name} ({time.perf_counter() - began:.0f} s)")

    quant_rows = []
    if have_ort and not args.no_quantization:
        quant_rows = quantization_study(variants, onnx_paths, settings[0], args, repeats)
        print(f"  quantization done ({time.perf_counter() - began:.0f} s)")

    cuda_rows, cuda_note = cuda_timings(variants, settings, repeats)
    rows.update(cuda_rows)
    elapsed = time.perf_counter() - began
    report = render(header, settings, rows, graphs, quant_rows, cuda_note, variants, elapsed,
                    state_dict_sizes(variants, args.output))
    print(report)
    with open(os.path.join(args.output, "results.md"), "w") as f:
        f.write(report + "\n")
    result = {"header": header, "seconds": elapsed, "graphs": graphs, "quantization": quant_rows,
              "timings_ms": [{"program": k[0], "setting": k[1], "runtime": k[2], "variant": k[3],
                              "ms": ms} for k, ms in rows.items()]}
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot_ratios(rows, os.path.join(args.output, "ratios.png"))
    print(f"wrote {args.output}/results.md, results.json, ratios.png in {elapsed:.0f} s")
    return result


def state_dict_sizes(variants: Dict[str, nn.Module], out_dir: str) -> Dict[str, float]:
    """MiB of each exported variant's saved state dict (the PyTorch checkpoint a user ships)."""
    sizes = {}
    for v in EXPORTED:
        path = os.path.join(out_dir, "state_dict.pth")
        torch.save(variants[v].state_dict(), path)
        sizes[v] = os.path.getsize(path) / 2**20
        os.remove(path)
    return sizes


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
    ms = time_interleaved(runners, repeats)
    for row in out:
        key = (row["variant"], row["model"])
        row["ms"] = ms[key] * 1e3
        row["ms_fp32"] = ms[(row["variant"], "fp32")] * 1e3
        row["error"] = max(relative_error(ref, got) for ref, got in
                           zip(outputs[(row["variant"], "fp32")], outputs[key]))
    return out


def render(header, settings, rows, graphs, quant_rows, cuda_note, variants, elapsed, sizes) -> str:
    lines = ["# Inference benchmark: MABN or GN?", "", header, "",
             "Settings: " + "; ".join(s.describe() for s in settings) + ".", ""]
    runtimes = [EAGER, TORCHSCRIPT, ORT] + sorted({k[2] for k in rows if k[2].startswith("CUDA")})
    for program in ("backbone+FPN", "heads", "whole model"):
        lines += [f"## {program}: median ms (ratio to (a))", "",
                  speed_table(rows, program, settings, runtimes, list(variants)), ""]
    if graphs:
        lines += ["## Exported ONNX graphs", "",
                  "| program | variant | graph | compute nodes | Conv | norm nodes | "
                  "layout reorders | MiB |", "|---|---|---|---|---|---|---|---|"]
        for name, stages in graphs.items():
            program, v = name.split(" ", 1)
            for stage, g in stages.items():
                norms = ", ".join(f"{op} {n}" for op, n in g["norm"].items()) or "none"
                lines.append(f"| {program} | {v} | {stage} | {g['nodes']} | {g['conv']} | "
                             f"{norms} | {g['reorders']} | {g['mb']:.1f} |")
        lines.append("")
    lines += ["## PyTorch state dict (whole model)", "", "| variant | MiB |", "|---|---|"]
    lines += [f"| {v} | {mb:.1f} |" for v, mb in sizes.items()] + [""]
    if quant_rows:
        lines += [f"## int8 in ONNX Runtime: backbone+FPN, {settings[0].name}", "",
                  "| variant | model | ms | vs its fp32 | max rel. error of p2–p6 vs fp32 | MiB |",
                  "|---|---|---|---|---|---|"]
        for r in quant_rows:
            lines.append(f"| {r['variant']} | {r['model']} | {r['ms']:.0f} | "
                         f"{r['ms'] / r['ms_fp32']:.2f}× | {r['error']:.4f} | {r['mb']:.1f} |")
        lines.append("")
    lines += [cuda_note, "", f"Total run time: {elapsed:.0f} s."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
