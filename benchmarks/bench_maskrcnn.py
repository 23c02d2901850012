#!/usr/bin/env python
"""Time of one Mask R-CNN R50-FPN training iteration with BN, GN and MABN everywhere.

2 images of 800×1216 with 10 random boxes each, 4conv1fc box head, norms in backbone, FPN and both
heads. Prints the median iteration time, its ratio to BN and the peak memory; with CUDA it also runs
one MABN iteration under `torch.cuda.set_sync_debug_mode("error")` to prove that MABN adds no host
synchronisation beyond Detectron2's own. Next to the timings: kernel launches per iteration, norm
layer-steps per iteration, and launches per norm layer-step (one layer of the model, alone).

    python benchmarks/bench_maskrcnn.py                    # CUDA when present
    python benchmarks/bench_maskrcnn.py --device cpu --size 320 --iters 3   # a CPU smoke run
    python benchmarks/bench_maskrcnn.py --kernel triton    # MABN2d's Triton path only
    python benchmarks/bench_maskrcnn.py --markdown output/bench_maskrcnn.md   # also as Markdown

MABN runs with MABN2d(kernel="torch") and, on CUDA, kernel="triton"; `--kernel` picks one. On CPU
"launches" are ATen ops, each of which would be a kernel launch on a GPU.
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from mabn_det.config import load_config, set_key
from mabn_det.layers import MABN2d

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from launch_count import count_launches  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "Base-MABN-RCNN-FPN.yaml")


NORM_TYPES = (torch.nn.BatchNorm2d, torch.nn.GroupNorm, MABN2d)


def _model(norm: str, device: str, kernel: str = "torch"):
    cfg = load_config(CONFIG)
    for key in common.NORM_KEYS:
        set_key(cfg, key, norm)
    cfg.MODEL.DEVICE = device
    cfg.MODEL.MABN.WARMUP_ITERS = cfg.MODEL.MABN.RENORM_WARMUP_ITERS = 0  # steady state
    cfg.MODEL.MABN.KERNEL = kernel
    return build_model(cfg).train()


def _batch(height: int, width: int, device: str):
    g = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(2):
        xy = torch.rand(10, 2, generator=g) * torch.tensor([width * 0.7, height * 0.7])
        wh = 32 + torch.rand(10, 2, generator=g) * 200
        boxes = torch.cat([xy, xy + wh], dim=1)
        masks = torch.zeros(10, height, width, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[i, y0:y1, x0:x1] = True
        inst = Instances((height, width), gt_boxes=Boxes(boxes), gt_classes=torch.arange(10) % 80,
                         gt_masks=BitMasks(masks))
        image = torch.randint(0, 255, (3, height, width), generator=g, dtype=torch.uint8)
        batch.append({"image": image.to(device), "instances": inst.to(device)})
    return batch


def _step(model, optimizer, batch):
    losses = sum(model(batch).values())
    optimizer.zero_grad()
    losses.backward()
    optimizer.step()


def _launch_counts(model, optimizer, batch, device: str):
    """(launches per iteration, norm layer-steps per iteration, launches per norm layer-step)."""
    norms = [m for m in model.modules() if isinstance(m, NORM_TYPES)]
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in norms]
    try:
        per_iteration = count_launches(lambda: _step(model, optimizer, batch), device)
    finally:
        for hook in hooks:
            hook.remove()
    if not norms:
        return per_iteration, 0, 0
    layer = copy.deepcopy(norms[0])
    x = torch.randn(2, getattr(layer, "num_features", None) or layer.num_channels, 32, 32,
                    device=device, requires_grad=True)

    def layer_step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(torch.ones_like(x))

    layer_step()
    return per_iteration, len(calls), count_launches(layer_step, device)


def measure(norm: str, device: str, batch, iters: int, kernel: str = "torch"):
    model = _model(norm, device, kernel)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    times = []
    with EventStorage():
        for i in range(iters + 3):
            if device == "cuda":
                torch.cuda.synchronize()
                if i == 3:
                    torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            _step(model, optimizer, batch)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        launches = _launch_counts(model, optimizer, batch, device)
    return statistics.median(times), peak, launches, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=800, help="short side; long side × 1.52")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--kernel", choices=["torch", "triton"], action="append",
                        help="MABN2d implementation(s); default: torch, plus triton on CUDA")
    common.add_markdown_argument(parser)
    args = parser.parse_args()
    kernels = args.kernel or (["torch", "triton"] if args.device == "cuda" else ["torch"])
    if args.device != "cuda" and "triton" in kernels:
        print("MABN2d(kernel='triton') runs on CUDA only; using its PyTorch path on CPU")
        kernels = ["torch"]
    width = int(args.size * 1.52) // 32 * 32
    batch = _batch(args.size, width, args.device)
    title = f"{common.header(args.device)}; 2 images {args.size}×{width}, median of {args.iters}"
    print(title)
    rows, results = [], {}
    runs = [("BN", "BN", "torch"), ("GN", "GN", "torch")] + [
        ("MABN" if kernel == "torch" else f"MABN ({kernel})", "MABN", kernel) for kernel in kernels]
    for label, norm, kernel in runs:
        seconds, peak, (launches, layer_steps, per_layer), model = measure(
            norm, args.device, batch, args.iters, kernel)
        results[label] = seconds
        rows.append([label, f"{seconds * 1e3:.1f}", f"{seconds / results['BN']:.3f}×",
                     f"{peak:.2f}", launches, layer_steps, per_layer])
        print(f"  {label}: {seconds * 1e3:.1f} ms per iteration", flush=True)
    table = common.markdown_table(
        ["norm", "ms / iteration", "vs BN", "peak memory (GiB)", "launches / iteration",
         "norm layer-steps / iteration", "launches / norm layer-step"], rows)
    print(table)
    lines = [title, "", table]
    if args.device == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            # Detectron2's proposal sampling reads values back by design; the backbone and FPN,
            # where most MABN layers are, must not.
            features = model.backbone(batch[0]["image"][None].float())
            sum(f.float().mean() for f in features.values()).backward()
            lines += ["", "MABN backbone+FPN forward+backward under "
                          "set_sync_debug_mode('error'): no synchronisation"]
            print(lines[-1])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    common.write_markdown(args.markdown, "Mask R-CNN R50-FPN training iteration", lines)


if __name__ == "__main__":
    main()
