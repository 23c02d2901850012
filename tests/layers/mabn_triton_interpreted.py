"""Runs MABN2d(kernel="triton") under Triton's CPU interpreter against MABN2d(kernel="torch").

Not a test module: tests/layers/test_mabn_triton.py runs it once, in a subprocess with
TRITON_INTERPRET=1 (Triton reads it when the kernels are defined), and reads the JSON it prints:

    {"<scenario>": {"failures": [...], "triton_steps": int, "steps": int, "seconds": float}, ...}

Every scenario trains both layers on the same inputs through the warm-up (batch statistics), ring
averaging, clipped renormalisation, a NaN input, an empty batch and an infinite gradient, and
compares y, dx, dγ, dβ and every buffer after every step.
"""
import json
import math
import sys
import time

import torch

from mabn_det.layers import mabn_triton
from mabn_det.layers.mabn import MABN2d

LAYER = dict(buffer_size=2, warmup_iters=3, renorm_warmup_iters=4, renorm_clip=1.1, momentum=0.3)
# Step 1-2: t ≤ m, batch statistics; 3-4: ring averages; 5-: renormalised, r clipped in some
# channels. Step 6 has a NaN input value, step 7 an empty batch, step 8 an infinite gradient.
STEPS = 9
NAN_STEP, EMPTY_STEP, INF_GRAD_STEP = 6, 7, 8
# Tiny tiles (TILE elements, UPDATE_BLOCK_C channels per update iteration, PROGRAMS per reduction)
# make even these small inputs use several splits per channel, masked tails and loops in the
# last program's update; "default" keeps the production tile sizes.
SMALL_TILES = dict(TILE=64, UPDATE_BLOCK_C=4, UPDATE_BLOCK_S=4, INTERPRETER_PROGRAMS=16)
SCENARIOS = {
    f"{layout}-{'x'.join(map(str, shape))}-{dtype}": (layout, shape, dtype, SMALL_TILES)
    for shape, layout, dtype in [
        ((2, 8, 7, 7), "nchw", "float32"), ((2, 8, 7, 7), "nchw", "bfloat16"),  # H·W = 49
        ((2, 8, 7, 7), "nhwc", "float32"), ((2, 8, 7, 7), "nhwc", "bfloat16"),
        ((3, 5, 3, 5), "nchw", "float32"), ((3, 5, 3, 5), "nhwc", "bfloat16"),  # odd C, H·W
    ]
}
SCENARIOS["nchw-2x8x7x7-float32-default-tiles"] = ("nchw", (2, 8, 7, 7), "float32", {})


def _tolerances(dtype):
    """(rtol, atol) for the outputs y and dx; statistics and buffers are float32 in both paths."""
    if dtype == torch.float32:
        return 1e-5, 1e-5
    # The PyTorch path rounds its coefficients and each intermediate product to bfloat16; the
    # kernels round once. Two to three bfloat16 ulps of the largest term.
    return 2e-2, 3e-2


def _scale(t):
    """The largest finite magnitude in t, at least 1."""
    finite = t.detach().float().nan_to_num(nan=0, posinf=0, neginf=0)
    return max([1.0] + finite.abs().flatten().tolist())


def _close(name, got, want, rtol, atol, failures, step):
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        failures.append(f"step {step}: {name} shape {tuple(got.shape)} != {tuple(want.shape)}")
        return
    if not torch.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True):
        diff = (got - want).abs().nan_to_num(nan=math.inf).max().item()
        failures.append(f"step {step}: {name} differs by {diff:.3g} (rtol {rtol}, atol {atol})")


def run_scenario(layout, shape, dtype_name):
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    n, c, h, w = shape
    ref = MABN2d(c, kernel="torch", **LAYER)
    tri = MABN2d(c, kernel="triton", **LAYER)
    with torch.no_grad():
        for layer in (ref, tri):
            layer.weight.copy_(torch.linspace(-1.5, 2.0, c))
            layer.bias.copy_(torch.linspace(0.3, -0.2, c))
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    out_rtol, out_atol = _tolerances(dtype)
    failures, clipped, unclipped = [], 0, 0
    for step in range(1, STEPS + 1):
        batch = 0 if step == EMPTY_STEP else n
        # Per-channel scales that jump between steps, so that r hits the clip in some channels.
        scale = 1.0 + 0.9 * torch.sin(torch.arange(c) * 1.3 + step * 2.1)
        x = torch.randn(batch, c, h, w) * scale.view(1, c, 1, 1) + 0.1
        dy = torch.randn(batch, c, h, w)
        if step == NAN_STEP:
            x[0, 1, 0, 0] = float("nan")
        if step == INF_GRAD_STEP:
            dy[-1, c - 1, h - 1, w - 1] = float("inf")
        x = x.to(dtype).contiguous(memory_format=fmt)
        dy = dy.to(dtype).contiguous(memory_format=fmt)
        results = []
        for layer in (ref, tri):
            layer.zero_grad()
            xi = x.clone().requires_grad_()
            y = layer(xi)
            y.backward(dy)
            results.append((y, xi.grad, layer.weight.grad, layer.bias.grad))
        (y_ref, dx_ref, dg_ref, db_ref), (y, dx, dg, db) = results
        if y.dtype != dtype or dx.dtype != dtype:
            failures.append(f"step {step}: dtypes y {y.dtype}, dx {dx.dtype}, expected {dtype}")
        if batch and layout == "nhwc" and not y.is_contiguous(memory_format=torch.channels_last):
            failures.append(f"step {step}: y lost the channels_last layout")
        _close("y", y, y_ref, out_rtol, out_atol * _scale(y_ref),
               failures, step)
        _close("dx", dx, dx_ref, out_rtol,
               out_atol * _scale(dx_ref),
               failures, step)
        _close("dgamma", dg, dg_ref, 1e-5, 1e-5, failures, step)
        _close("dbeta", db, db_ref, 1e-5, 1e-5, failures, step)
        for key, want in ref.state_dict().items():
            got = tri.state_dict()[key]
            if want.is_floating_point():
                _close(key, got, want, 1e-5, 1e-6, failures, step)
            elif not torch.equal(got, want):
                failures.append(f"step {step}: {key} is {got.tolist()}, expected {want.tolist()}")
        if batch and step > LAYER["renorm_warmup_iters"]:
            at_clip = (ref.last_renorm - LAYER["renorm_clip"]).abs() < 1e-6
            at_clip |= (ref.last_renorm - 1 / LAYER["renorm_clip"]).abs() < 1e-6
            clipped += int(at_clip.sum())
            unclipped += int((~at_clip).sum())
            _close("last_renorm", tri.last_renorm, ref.last_renorm, 1e-5, 1e-6, failures, step)
    for key, expected in [("skipped_forward_stats", 1), ("skipped_backward_stats", 2)]:
        # backward: the NaN input's channel (ψ = NaN) and the infinite gradient
        if int(getattr(ref, key)) != expected:
            failures.append(f"reference {key} = {int(getattr(ref, key))}, expected {expected}")
    if not (clipped and unclipped):
        failures.append(f"renormalisation not exercised: {clipped} clipped, {unclipped} unclipped")
    return failures


def main():
    if not mabn_triton.INTERPRETED:
        sys.exit("run with TRITON_INTERPRET=1")
    calls = []
    original = mabn_triton.mabn_train_step

    def counting(module, x):
        calls.append(1)
        return original(module, x)

    mabn_triton.mabn_train_step = counting
    report = {}
    defaults = {k: getattr(mabn_triton, k) for k in SMALL_TILES}
    names = sys.argv[1:] or list(SCENARIOS)
    for name in names:
        layout, shape, dtype, tiles = SCENARIOS[name]
        for key, value in {**defaults, **tiles}.items():
            setattr(mabn_triton, key, value)
        plan = mabn_triton.Plan(shape, layout == "nhwc", LAYER["buffer_size"],
                                mabn_triton.INTERPRETER_PROGRAMS)
        start, before = time.perf_counter(), len(calls)
        failures = run_scenario(layout, shape, dtype)
        report[name] = {"failures": failures, "triton_steps": len(calls) - before,
                        "steps": STEPS - 1, "splits": plan.splits,
                        "update_blocks": plan.update_blocks,
                        "seconds": round(time.perf_counter() - start, 2)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
