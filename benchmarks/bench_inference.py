#!/usr/bin/env python
"""Inference cost of the same Mask R-CNN R50-FPN with MABN (folded or as FrozenBN), GN and FrozenBN.

Why MABN and not GroupNorm? The paper's answer is inference: MABN folds into the conv before it.
This benchmark measures that claim on the machine it runs on, with every variant timed side by side:

    (a) MABN folded   MABN → FrozenBN → folded into the conv: a plain conv net (the reference)
    (b) MABN→FrozenBN MABN converted to FrozenBatchNorm2d, not folded (stock Detectron2 export)
    (c) GN            GroupNorm(32) everywhere
    (d) FrozenBN      stock FrozenBatchNorm2d everywhere
    MABN as trained   the unconverted model in eval mode (eager only)

Programs: "backbone+FPN" (normalised image → p2…p6), "heads" (4conv1fc box head + predictor on a
fixed number of RoIs per image, mask head on a fixed number of detections) and, in eager PyTorch
only, the "whole model" end to end (RPN, NMS, RoIAlign, heads, mask pasting) with the counts
forced fixed: RPN NMS off so exactly PROPOSALS boxes reach the box head, score threshold 0 and NMS
off so exactly DETECTIONS boxes reach the mask head. Randomly initialised weights would otherwise
decide how much work the heads do. Runtimes: eager PyTorch, TorchScript (traced and frozen), ONNX
Runtime (CPU); with CUDA, eager fp32/fp16/bf16. Repeats are interleaved round-robin and medians
reported, so that a shared, noisy CPU slows every variant alike; ratios are to (a) measured in the
same run.

Beyond speed: ONNX graph size and node kinds before and after ONNX Runtime's optimiser (are conv
and norm fused?), file sizes, and int8 dynamic/static quantization of (a) vs (c) in ONNX Runtime
with the relative error of the backbone features against fp32 on held-out photographs.

Weights are random (no trained R50 checkpoint here): every norm's statistics are calibrated on a
few photographs first, so activations have realistic scales for the quantization error.

    python benchmarks/bench_inference.py            # default: 565 s of CPU time on 2 cores
    python benchmarks/bench_inference.py --quick    # smaller images, 3 repeats: a check, too noisy
    python benchmarks/bench_inference.py --tiny     # R18 with narrow heads: a smoke run in seconds

Needs `pip install -e ".[bench]"` (onnx, onnxruntime); writes OUTPUT/results.md, results.json and
ratios.png. The code is split over inference_models.py (variants, inputs), inference_onnx.py
(TorchScript, ONNX Runtime, quantization) and inference_report.py (tables, plot).
"""
import argparse
import copy
import json
import os
import sys
import time
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from inference_models import (AS_TRAINED, CALIBRATION_PHOTOS, EAGER, EXPORTED, ORT,  # noqa: E402
                              REPO, TINY_OPTS, TORCHSCRIPT, BackboneFPN, Heads, Setting, batch_of,
                              build_variants, head_inputs, model_inputs, normalise, photographs,
                              set_counts)
from inference_onnx import (export_onnx, graph_stats, ort_runner, ort_session,  # noqa: E402
                            quantization_study, torchscript)
from inference_report import plot_ratios, render, state_dict_sizes  # noqa: E402

Rows = Dict[Tuple[str, str, str, str], float]  # (program, setting, runtime, variant) → ms


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
                inputs = model_inputs(images.cuda())
                whole[v] = (lambda m, i, d: lambda: _autocast_inference(m, i, d))(fp32, inputs,
                                                                                   dtype)
            for program, runners in (("backbone+FPN", backbone), ("heads", heads),
                                     ("whole model", whole)):
                for v, sec in common.time_interleaved(runners, repeats, sync).items():
                    rows[(program, s.name, runtime, v)] = sec * 1e3
    return rows, f"CUDA: {torch.cuda.get_device_name()}"


def _autocast_inference(model: nn.Module, inputs: List[dict], dtype: torch.dtype):
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        return model.inference(inputs)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller images, 3 repeats")
    parser.add_argument("--tiny", action="store_true",
                        help="R18, narrow heads, tiny images, 1 repeat: checks the code paths only")
    parser.add_argument("--repeats", type=int, help="timed rounds per measurement (default 5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=os.path.join(REPO, "output", "bench_inference"))
    parser.add_argument("--no-quantization", action="store_true")
    parser.add_argument("opts", nargs="*", default=[], help="KEY VALUE config overrides for all")
    return parser.parse_args(argv)


def settings_of(args: argparse.Namespace) -> Tuple[List[Setting], int, list]:
    """(settings, repeats, config overrides) of --tiny, --quick or the default run."""
    if args.tiny:
        settings = [Setting(1, 64, 96, 8, 2), Setting(2, 64, 64, 4, 1)]
        return settings, args.repeats or 1, TINY_OPTS + list(args.opts)
    if args.quick:
        settings = [Setting(1, 192, 256, 20, 4), Setting(8, 64, 96, 4, 1)]
        return settings, args.repeats or 3, list(args.opts)
    settings = [Setting(1, 320, 416, 50, 10), Setting(8, 128, 160, 8, 2)]
    return settings, args.repeats or 5, list(args.opts)


class Exports:
    """TorchScript traces and ONNX files, made once per (program, variant): both are
    shape-generic, so every setting reuses them. `graphs` collects the ONNX graph statistics."""

    def __init__(self, output: str, threads: int, with_ort: bool):
        self.output, self.threads, self.with_ort = output, threads, with_ort
        self.traced: Dict[Tuple[str, str], torch.jit.ScriptModule] = {}
        self.onnx_paths: Dict[Tuple[str, str], str] = {}
        self.graphs: Dict[str, dict] = {}

    def runners(self, program: str, v: str, module: nn.Module, example, names) -> dict:
        """(runtime, variant) → a call of the traced program, and of its ONNX Runtime session."""
        key = (program, v)
        if key not in self.traced:
            self.traced[key] = torchscript(module, example)
        out = {(TORCHSCRIPT, v): (lambda m, a: lambda: m(*a))(self.traced[key], example)}
        if not self.with_ort:
            return out
        if key not in self.onnx_paths:
            stem = f"{program.split('+')[0]}_{v[1]}"
            self.onnx_paths[key] = os.path.join(self.output, f"{stem}.onnx")
            export_onnx(module, example, names, self.onnx_paths[key])
            optimized = os.path.join(self.output, f"{stem}_ort_optimized.onnx")
            session = ort_session(self.onnx_paths[key], self.threads, optimized)
            self.graphs[f"{program} {v}"] = {"exported": graph_stats(self.onnx_paths[key]),
                                             "ORT-optimised": graph_stats(optimized)}
        else:
            session = ort_session(self.onnx_paths[key], self.threads)
        out[(ORT, v)] = ort_runner(session, names, example)
        return out


def time_programs(s: Setting, variants: Dict[str, nn.Module], exports: Exports, repeats: int,
                  rows: Rows) -> None:
    """backbone+FPN and heads of every variant at `s`, in each runtime, into `rows`."""
    images = batch_of(photographs(CALIBRATION_PHOTOS, s.height, s.width), s.batch)
    for model in variants.values():
        set_counts(model, s)
    for program in ("backbone+FPN", "heads"):
        runners = {}
        for v, model in variants.items():
            if v == AS_TRAINED and program != "backbone+FPN":
                continue  # the backbone shows what skipping the conversion costs
            if program == "heads":
                module, example, names = Heads(model), head_inputs(model, s), ("box", "mask")
            else:
                module, names = BackboneFPN(model), ("images",)
                example = (normalise(model, images),)
            runners[(EAGER, v)] = (lambda m, a: lambda: m(*a))(module, example)
            if v in EXPORTED:
                runners.update(exports.runners(program, v, module, example, names))
        for (rt, v), sec in common.time_interleaved(runners, repeats).items():
            rows[(program, s.name, rt, v)] = sec * 1e3


def time_whole_model(s: Setting, variants: Dict[str, nn.Module], repeats: int, rows: Rows) -> None:
    """The whole model end to end in eager PyTorch; checks the detection counts stay fixed."""
    images = batch_of(photographs(CALIBRATION_PHOTOS, s.height, s.width), s.batch)
    counts = {}  # detections per image, recorded by every call: they must not vary

    def whole_model(v, model, inputs):
        def run():
            counts.setdefault(v, set()).update(len(o["instances"])
                                               for o in model.inference(inputs))
        return run

    whole = {v: whole_model(v, variants[v], model_inputs(images)) for v in EXPORTED}
    for v, sec in common.time_interleaved(whole, repeats).items():
        rows[("whole model", s.name, EAGER, v)] = sec * 1e3
    if any(c != {s.detections} for c in counts.values()):
        raise RuntimeError(f"detections per image should all be {s.detections}, got {counts}")


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings, repeats, opts = settings_of(args)
    os.makedirs(args.output, exist_ok=True)
    began = time.perf_counter()
    header = (f"{common.header('cpu', 'onnxruntime', 'onnx')}; {repeats} interleaved repeats, "
              "medians")
    print(header)
    first = settings[0]
    variants = build_variants(first, opts,
                              photographs(CALIBRATION_PHOTOS, first.height, first.width))
    try:
        import onnxruntime  # noqa: F401
        have_ort = True
    except ImportError:
        have_ort = False
        print("onnxruntime is not installed (pip install -e '.[bench]'): ONNX Runtime skipped")

    rows: Rows = {}
    exports = Exports(args.output, args.threads, have_ort)
    for s in settings:
        time_programs(s, variants, exports, repeats, rows)
        print(f"  timed backbone+FPN and heads, {s.name} ({time.perf_counter() - began:.0f} s)")
        time_whole_model(s, variants, repeats, rows)
        print(f"  timed whole model, {s.name} ({time.perf_counter() - began:.0f} s)")
    quant_rows = []
    if have_ort and not args.no_quantization:
        quant_rows = quantization_study(variants, exports.onnx_paths, first, args, repeats)
        print(f"  quantization done ({time.perf_counter() - began:.0f} s)")
    cuda_rows, cuda_note = cuda_timings(variants, settings, repeats)
    rows.update(cuda_rows)
    elapsed = time.perf_counter() - began
    report = render(header, settings, rows, exports.graphs, quant_rows, cuda_note, variants,
                    elapsed, state_dict_sizes(variants, args.output))
    print(report)
    with open(os.path.join(args.output, "results.md"), "w") as f:
        f.write(report + "\n")
    result = {"header": header, "seconds": elapsed, "graphs": exports.graphs,
              "quantization": quant_rows,
              "timings_ms": [{"program": k[0], "setting": k[1], "runtime": k[2], "variant": k[3],
                              "ms": ms} for k, ms in rows.items()]}
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot_ratios(rows, os.path.join(args.output, "ratios.png"))
    print(f"wrote {args.output}/results.md, results.json, ratios.png in {elapsed:.0f} s")
    return result


if __name__ == "__main__":
    main()
