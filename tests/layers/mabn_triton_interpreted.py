"""Runs MABN2d(kernel="triton") under Triton's CPU interpreter against MABN2d(kernel="torch").

Not a test module: tests/layers/test_mabn_triton.py runs it in subprocesses with
TRITON_INTERPRET=1 (Triton reads it when the kernels are defined), each on some of the scenarios
(named as arguments; all by default), and reads the JSON they print:

    {"<scenario>": {"failures": [...], "shuffled": [...] | null, "triton_steps": int, ...}, ...,
     "device_guard": {"launches": int, "outside": [...], "devices": [...]}}

Every scenario trains both layers on the same inputs through the warm-up (batch statistics), ring
averaging, clipped renormalisation, a NaN input, an empty batch and an infinite gradient, and
compares y, dx, dγ, dβ and every buffer after every step, and checks that every ticket is back at
0. The SHUFFLED scenarios then train Triton layers again with each launch's programs run in a
random order ("shuffled": failures, or null when not run): the interpreter otherwise always
runs them in grid order, and the result must not depend on which program arrives last.
"device_guard" lists the kernel launches made outside `mabn_triton.launch_device` and the devices
it was entered with.
"""
import contextlib
import itertools
import json
import math
import random
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
# Tiny tiles (TILE elements per program iteration, CHANNEL_TILE channels per NHWC tile, COMBINE_TILE
# partial sums and RING_ROWS ring rows per update iteration, PROGRAMS per reduction) make even these
# small inputs use several splits and channel tiles, masked tails, a combine that accumulates a
# 2-D tile over several passes and loops in the tiles' updates; "default" keeps the production tile
# sizes (and with them one split per channel tile: the SINGLE_SPLIT kernels).
SMALL_TILES = dict(TILE=64, MIN_BLOCK_HW=8, CHANNEL_TILE=4, COMBINE_TILE=8, RING_ROWS=1,
                   INTERPRETER_PROGRAMS=16)
SCENARIOS = {
    f"{layout}-{'x'.join(map(str, shape))}-{dtype}": (layout, shape, dtype, SMALL_TILES)
    for shape, layout, dtype in [
        ((2, 8, 7, 7), "nchw", "float32"), ((2, 8, 7, 7), "nchw", "bfloat16"),  # H·W = 49
        ((2, 8, 7, 7), "nhwc", "float32"), ((2, 8, 7, 7), "nhwc", "bfloat16"),
        ((3, 5, 3, 5), "nchw", "float32"), ((3, 5, 3, 5), "nhwc", "bfloat16"),  # odd C, H·W
        ((2, 6, 3, 4), "nchw", "bfloat16"),  # rows of 12 elements: ROW_ALIGN 4
    ]
}
SCENARIOS["nchw-2x8x7x7-float32-default-tiles"] = ("nchw", (2, 8, 7, 7), "float32", {})
SCENARIOS["nhwc-1x8x2x3-float32-default-tiles"] = ("nhwc", (1, 8, 2, 3), "float32", {})
# Scenarios run again with each launch's programs in a random order (one seed per run): the
# results must not change in a single bit.
SHUFFLED = ("nchw-2x8x7x7-float32", "nhwc-2x8x7x7-bfloat16", "nchw-2x8x7x7-float32-default-tiles")
SHUFFLE_SEEDS = (1, 2, 3)


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


def _layer(kernel, c):
    layer = MABN2d(c, kernel=kernel, **LAYER)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(-1.5, 2.0, c))
        layer.bias.copy_(torch.linspace(0.3, -0.2, c))
    return layer


def _batches(layout, shape, dtype):
    """(step, x, dy) of every step: the same for every layer and every run."""
    torch.manual_seed(0)
    n, c, h, w = shape
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
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
        yield (step, x.to(dtype).contiguous(memory_format=fmt),
               dy.to(dtype).contiguous(memory_format=fmt))


def _train_step(layer, x, dy):
    """(y, dx, dγ, dβ) of one forward+backward."""
    layer.zero_grad()
    xi = x.clone().requires_grad_()
    y = layer(xi)
    y.backward(dy)
    return y, xi.grad, layer.weight.grad, layer.bias.grad


def _snapshot(layer, outputs):
    """Everything a Triton step produced, by name, for bitwise comparison between runs."""
    names = ("y", "dx", "dgamma", "dbeta")
    return {**dict(zip(names, (t.detach().clone() for t in outputs))),
            **{k: v.clone() for k, v in layer.state_dict().items()}}


def _ticket_failures(layer, step):
    held = layer._triton_tickets
    return [] if not held.any() else [f"step {step}: tickets not back at 0: {held.tolist()}"]


def run_scenario(layout, shape, dtype_name, trace):
    """Train a torch-path and a Triton-path layer side by side; return the differences found.
    Appends the Triton layer's `_snapshot` of every step to `trace`."""
    dtype = getattr(torch, dtype_name)
    c = shape[1]
    ref, tri = _layer("torch", c), _layer("triton", c)
    out_rtol, out_atol = _tolerances(dtype)
    failures, clipped, unclipped = [], 0, 0
    for step, x, dy in _batches(layout, shape, dtype):
        (y_ref, dx_ref, dg_ref, db_ref), (y, dx, dg, db) = (_train_step(ref, x, dy),
                                                            _train_step(tri, x, dy))
        trace.append(_snapshot(tri, (y, dx, dg, db)))
        failures += _ticket_failures(tri, step)
        if y.dtype != dtype or dx.dtype != dtype:
            failures.append(f"step {step}: dtypes y {y.dtype}, dx {dx.dtype}, expected {dtype}")
        if len(x) and layout == "nhwc" and not y.is_contiguous(memory_format=torch.channels_last):
            failures.append(f"step {step}: y lost the channels_last layout")
        _close("y", y, y_ref, out_rtol, out_atol * _scale(y_ref), failures, step)
        _close("dx", dx, dx_ref, out_rtol, out_atol * _scale(dx_ref), failures, step)
        _close("dgamma", dg, dg_ref, 1e-5, 1e-5, failures, step)
        _close("dbeta", db, db_ref, 1e-5, 1e-5, failures, step)
        for key, want in ref.state_dict().items():
            got = tri.state_dict()[key]
            if want.is_floating_point():
                _close(key, got, want, 1e-5, 1e-6, failures, step)
            elif not torch.equal(got, want):
                failures.append(f"step {step}: {key} is {got.tolist()}, expected {want.tolist()}")
        if len(x) and step > LAYER["renorm_warmup_iters"]:
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


@contextlib.contextmanager
def programs_in_random_order(seed):
    """Make Triton's interpreter run the programs of every launch in a random order.

    The interpreter runs them one at a time in grid order, so the last program of each channel
    tile, and the last tile, would always be the same ones. It sets the grid's size and then each
    program's index on one builder object; this replaces the index by the next one of a shuffled
    list. For the tests only: the kernels and their launches are untouched.
    """
    from triton.runtime import interpreter

    builder, rng, order = interpreter.interpreter_builder, random.Random(seed), []
    set_grid_dim, set_grid_idx = builder.set_grid_dim, builder.set_grid_idx

    def shuffled_dim(nx, ny, nz):
        set_grid_dim(nx, ny, nz)
        order[:] = itertools.product(range(nx), range(ny), range(nz))
        rng.shuffle(order)
        order.reverse()  # popped from the end

    builder.set_grid_dim = shuffled_dim
    builder.set_grid_idx = lambda x, y, z: set_grid_idx(*order.pop())
    try:
        yield
    finally:
        del builder.set_grid_dim, builder.set_grid_idx  # back to the class's methods


def _bits(t):
    """t's bits as integers, so that NaNs compare equal to themselves and -0 differs from 0."""
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()]
    return t.view(ints) if t.is_floating_point() else t


def run_shuffled(layout, shape, dtype_name, seed, expected):
    """Train a Triton-path layer with every launch's programs shuffled; return where its steps
    differ from `expected` (the trace in grid order) in a single bit, or leave a ticket held."""
    dtype = getattr(torch, dtype_name)
    tri, failures = _layer("triton", shape[1]), []
    with programs_in_random_order(seed):
        for (step, x, dy), want in zip(_batches(layout, shape, dtype), expected):
            got = _snapshot(tri, _train_step(tri, x, dy))
            failures += _ticket_failures(tri, step)
            failures += [f"seed {seed}, step {step}: {key} differs from the grid-order run"
                         for key in want if not torch.equal(_bits(got[key]), _bits(want[key]))]
    return failures


class _GuardedLaunches:
    """Stands in for a kernel of `mabn_triton` and records whether each of its launches happens
    inside `launch_device`."""

    def __init__(self, kernel, guard):
        self.kernel, self.guard = kernel, guard

    def __getitem__(self, grid):
        self.guard["launches"] += 1
        if not self.guard["inside"]:
            self.guard["outside"].append(self.kernel.__name__)
        return self.kernel[grid]


def watch_launch_device():
    """Route every kernel launch of `mabn_triton` through `_GuardedLaunches`; returns the record
    ({"launches", "outside", "devices"}) that they and `launch_device` fill in."""
    guard = {"launches": 0, "outside": [], "devices": [], "inside": False}
    enter = mabn_triton.launch_device

    @contextlib.contextmanager
    def recording(device):
        guard["devices"].append(str(device))
        with enter(device):
            guard["inside"] = True
            try:
                yield
            finally:
                guard["inside"] = False

    mabn_triton.launch_device = recording
    for kernel in mabn_triton.KERNELS.values():
        setattr(mabn_triton, kernel.__name__, _GuardedLaunches(kernel, guard))
    return guard


def main():
    if not mabn_triton.INTERPRETED:
        sys.exit("run with TRITON_INTERPRET=1")
    calls = []
    original = mabn_triton.mabn_train_step

    def counting(module, x):
        calls.append(1)
        return original(module, x)

    mabn_triton.mabn_train_step = counting
    guard = watch_launch_device()
    report = {}
    defaults = {k: getattr(mabn_triton, k) for k in SMALL_TILES}
    names = sys.argv[1:] or list(SCENARIOS)
    for name in names:
        layout, shape, dtype, tiles = SCENARIOS[name]
        for key, value in {**defaults, **tiles}.items():
            setattr(mabn_triton, key, value)
        plan = mabn_triton.Plan(shape, layout == "nhwc", LAYER["buffer_size"],
                                mabn_triton.INTERPRETER_PROGRAMS, getattr(torch, dtype).itemsize)
        start, before, trace = time.perf_counter(), len(calls), []
        failures = run_scenario(layout, shape, dtype, trace)
        report[name] = {"failures": failures, "triton_steps": len(calls) - before,
                        "steps": STEPS - 1, "splits": plan.splits,
                        "reduce_blocks": plan.reduce_blocks, "shuffled": None,
                        "seconds": round(time.perf_counter() - start, 2)}
        if name in SHUFFLED:
            report[name]["shuffled"] = [failure for seed in SHUFFLE_SEEDS for failure in
                                        run_shuffled(layout, shape, dtype, seed, trace)]
    report["device_guard"] = {key: guard[key] for key in ("launches", "outside", "devices")}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
