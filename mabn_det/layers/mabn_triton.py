"""Fused Triton kernels for a training step of `MABN2d`: four launches per layer-step.

Forward
    K1 (`_fwd_reduce_*`): split per-channel reduction of Σx². Every program stores its partial sum,
        then takes a ticket from an integer counter (atomic add, acquire-release). The program that
        draws the last ticket combines all partials in a fixed order — the result never depends on
        which program finished first, and no float atomics are used — and then performs the whole
        C-sized update of the layer's state: χ into the forward ring (non-finite channels keep their
        old entry and bump the skip counter), s², r, running_var, the step counter, and the two
        coefficients of the affine map. It finally resets the ticket, so no memset is launched.
    K2 (`_affine_*`): y = a·x + b in x's dtype.
Backward
    K3 (`_bwd_reduce_*`): the same pattern for Σdy·x and Σdy; the last program records ψ into the
        backward ring, forms ψ̄, dγ, dβ and the two coefficients of dx.
    K4 (`_dx_*`): dx = a·dy − b·x in x's dtype.

Each kernel exists for NCHW (a [N·C, H·W] view with H·W contiguous: 128-bit loads when H·W is a
multiple of 16) and NHWC / channels_last (a [N·H·W, C] matrix). Statistics are accumulated and kept
in float32 whatever the input dtype. Nothing here reads a device value on the host.

The module imports Triton; `mabn_det` imports it only when a `MABN2d(kernel="triton")` layer sees a
CUDA tensor (or a CPU tensor under ``TRITON_INTERPRET=1``, which is how the CPU tests run it).
"""
import os
from typing import Tuple

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRETED", "supports", "mabn_train_step"]

# Triton decides at `@triton.jit` time whether a kernel is interpreted; a compiled kernel must never
# receive a CPU tensor, so CPU inputs are accepted only when this module was imported interpreted.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tile sizes (module constants, so that the interpreted tests can shrink them to exercise splits,
# masks and loops on tiny inputs).
TILE = 2048  # elements per program and loop iteration in the streaming kernels (16 per thread)
UPDATE_BLOCK_C = 128  # channels per loop iteration of the last program's update (64 registers)
UPDATE_BLOCK_S = 16  # partial sums (splits) combined per loop iteration of the update
INTERPRETER_PROGRAMS = 8  # programs per reduction under the interpreter, which runs them serially
NUM_WARPS = 4
# Register cap of the reductions. Left alone, ptxas keeps them at 48-56 registers (for occupancy)
# by spilling a few bytes in some variants; with a cap they take 56-96 registers and never spill
# (tests/layers/mabn_triton_aot.py compiles every variant for sm_90).
REDUCE_MAXNREG = 128
REDUCE_OPTIONS = dict(num_warps=NUM_WARPS, maxnreg=REDUCE_MAXNREG)
ELEMENTWISE_OPTIONS = dict(num_warps=NUM_WARPS)
_MAX_SPLITS = 1024
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# C-sized updates, run by the last program of K1 / K3.
# --------------------------------------------------------------------------------------------

@triton.jit
def _combine(partial_ptr, S, C, cs, cmask, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Σ over the S rows of a [S, C] float32 partial-sum matrix, for channels `cs`, fixed order."""
    rows = tl.arange(0, BLOCK_S)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        r = s0 + rows
        mask = (r[:, None] < S) & cmask[None, :]
        # .cg: read from L2, where the other programs' stores are, never from a stale L1 line.
        acc += tl.sum(tl.load(partial_ptr + r[:, None] * C + cs[None, :], mask=mask, other=0.0,
                              cache_modifier=".cg"), axis=0)
    return acc


@triton.jit
def _record_and_average(ring_ptr, m, slot, C, cs, cmask, value,
                        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Write `value` into row `slot` of the [m, C] ring, keeping the old entry of non-finite
    channels; return (non-finite flags, mean of the ring after the write)."""
    bad = (value != value) | (tl.abs(value) == float("inf"))
    rows = tl.arange(0, BLOCK_M)
    others = tl.zeros((BLOCK_C,), dtype=tl.float32)
    old = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for m0 in range(0, m, BLOCK_M):
        r = m0 + rows
        tile = tl.load(ring_ptr + r[:, None] * C + cs[None, :],
                       mask=(r[:, None] < m) & cmask[None, :], other=0.0)
        is_slot = r[:, None] == slot
        old += tl.sum(tl.where(is_slot, tile, 0.0), axis=0)
        others += tl.sum(tl.where(is_slot, 0.0, tile), axis=0)
    kept = tl.where(bad, old, value)
    tl.store(ring_ptr + slot * C + cs, kept, mask=cmask)
    return bad, (others + kept) / m


@triton.jit
def _forward_update(partial_ptr, S, C, count, iter_ptr, step_ptr, chi_ptr, running_ptr, skip_ptr,
                    weight_ptr, bias_ptr, stats_ptr, m, warmup_iters, renorm_after, eps, momentum,
                    clip,
                    BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """stats rows: 0 s², 1 r, 2 a = γ·r/√(s²+ε), 3 b = β."""
    t = tl.load(iter_ptr) + 1
    slot = t % m
    use_batch = (t <= m) | (t < warmup_iters)
    renorm_on = t > renorm_after
    n_bad = tl.zeros((BLOCK_C,), dtype=tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cmask = cs < C
        chi = _combine(partial_ptr, S, C, cs, cmask, BLOCK_S, BLOCK_C) / count
        bad, chi_mean = _record_and_average(chi_ptr, m, slot, C, cs, cmask, chi, BLOCK_M, BLOCK_C)
        n_bad += (bad & cmask).to(tl.int32)
        var = tl.where(use_batch, chi, chi_mean)
        running = tl.load(running_ptr + cs, mask=cmask, other=1.0)
        ratio = tl.sqrt((var + eps) / (running + eps))
        low = 1.0 / clip
        clipped = tl.where(ratio < low, low, tl.where(ratio > clip, clip, ratio))  # keeps NaN
        r = tl.where(renorm_on, clipped, 1.0)
        var_ok = (var == var) & (tl.abs(var) != float("inf"))
        tl.store(running_ptr + cs, tl.where(var_ok, running + momentum * (var - running), running),
                 mask=cmask)
        gamma = tl.load(weight_ptr + cs, mask=cmask, other=0.0)
        beta = tl.load(bias_ptr + cs, mask=cmask, other=0.0)
        tl.store(stats_ptr + cs, var, mask=cmask)
        tl.store(stats_ptr + C + cs, r, mask=cmask)
        tl.store(stats_ptr + 2 * C + cs, (gamma * r) * (1.0 / tl.sqrt(var + eps)), mask=cmask)
        tl.store(stats_ptr + 3 * C + cs, beta, mask=cmask)
    any_bad = (tl.sum(n_bad, axis=0) > 0).to(tl.int64)
    tl.store(skip_ptr, tl.load(skip_ptr) + any_bad)
    tl.store(iter_ptr, t)
    tl.store(step_ptr, t)


@triton.jit
def _backward_update(partial_ptr, S, C, count, step_ptr, stats_ptr, weight_ptr, psi_ptr, skip_ptr,
                     out_ptr, m, warmup_iters, eps,
                     BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """out rows: 0 dγ, 1 dβ, 2 a = γ·r/σ, 3 b = ψ̄/σ² (dx = a·dy − b·x)."""
    t = tl.load(step_ptr)
    slot = t % m
    use_batch = (t <= m) | (t < warmup_iters)
    n_bad = tl.zeros((BLOCK_C,), dtype=tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cmask = cs < C
        sum_dy_x = _combine(partial_ptr, S, C, cs, cmask, BLOCK_S, BLOCK_C)
        sum_dy = _combine(partial_ptr + S * C, S, C, cs, cmask, BLOCK_S, BLOCK_C)
        var = tl.load(stats_ptr + cs, mask=cmask, other=1.0)
        r = tl.load(stats_ptr + C + cs, mask=cmask, other=1.0)
        gamma = tl.load(weight_ptr + cs, mask=cmask, other=0.0)
        inv_std = tl.rsqrt(var + eps)
        grad_scale = (gamma * r) * inv_std
        psi = grad_scale * sum_dy_x / count
        bad, psi_mean = _record_and_average(psi_ptr, m, slot, C, cs, cmask, psi, BLOCK_M, BLOCK_C)
        n_bad += (bad & cmask).to(tl.int32)
        psi_bar = tl.where(use_batch, psi, psi_mean)
        tl.store(out_ptr + cs, (r * inv_std) * sum_dy_x, mask=cmask)
        tl.store(out_ptr + C + cs, sum_dy, mask=cmask)
        tl.store(out_ptr + 2 * C + cs, grad_scale, mask=cmask)
        tl.store(out_ptr + 3 * C + cs, (psi_bar * inv_std) * inv_std, mask=cmask)
    any_bad = (tl.sum(n_bad, axis=0) > 0).to(tl.int64)
    tl.store(skip_ptr, tl.load(skip_ptr) + any_bad)


@triton.jit
def _take_ticket(ticket_ptr):
    """True in exactly one program: the last one to arrive. Orders this program's earlier stores
    before the ticket (barrier + release) and the other programs' stores before what follows
    (acquire)."""
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    total = tl.num_programs(0) * tl.num_programs(1)
    return ticket == total - 1


# --------------------------------------------------------------------------------------------
# K1: Σx² split reduction + forward update.
# --------------------------------------------------------------------------------------------

@triton.jit
def _fwd_reduce_nchw(x_ptr, partial_ptr, ticket_ptr, iter_ptr, step_ptr, chi_ptr, running_ptr,
                     skip_ptr, weight_ptr, bias_ptr, stats_ptr,
                     N, C, HW, S, count, m, warmup_iters, renorm_after, eps, momentum, clip,
                     BLOCK_N: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_S: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    c = tl.program_id(0)
    split = tl.program_id(1)
    hw_blocks = tl.cdiv(HW, BLOCK_HW)
    tiles = tl.cdiv(N, BLOCK_N) * hw_blocks
    ns = tl.arange(0, BLOCK_N)
    hws = tl.arange(0, BLOCK_HW)
    acc = tl.zeros((BLOCK_N, BLOCK_HW), dtype=tl.float32)
    for tile in range(split, tiles, S):
        nb = tile // hw_blocks
        n = nb * BLOCK_N + ns
        hw = (tile - nb * hw_blocks) * BLOCK_HW + hws
        offs = (n[:, None] * C + c) * HW + hw[None, :]
        v = tl.load(x_ptr + offs, mask=(n[:, None] < N) & (hw[None, :] < HW), other=0.0)
        v = v.to(tl.float32)
        acc += v * v
    tl.store(partial_ptr + split * C + c, tl.sum(tl.sum(acc, axis=1), axis=0))
    if _take_ticket(ticket_ptr):
        _forward_update(partial_ptr, S, C, count, iter_ptr, step_ptr, chi_ptr, running_ptr,
                        skip_ptr, weight_ptr, bias_ptr, stats_ptr, m, warmup_iters, renorm_after,
                        eps, momentum, clip, BLOCK_S, BLOCK_M, BLOCK_C)
        tl.atomic_xchg(ticket_ptr, 0)


@triton.jit
def _fwd_reduce_nhwc(x_ptr, partial_ptr, ticket_ptr, iter_ptr, step_ptr, chi_ptr, running_ptr,
                     skip_ptr, weight_ptr, bias_ptr, stats_ptr,
                     R, C, S, count, m, warmup_iters, renorm_after, eps, momentum, clip,
                     BLOCK_R: tl.constexpr, BLOCK_CT: tl.constexpr, BLOCK_S: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    cs = tl.program_id(0) * BLOCK_CT + tl.arange(0, BLOCK_CT)
    split = tl.program_id(1)
    rs = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_CT), dtype=tl.float32)
    for tile in range(split, tl.cdiv(R, BLOCK_R), S):
        rows = tile * BLOCK_R + rs
        v = tl.load(x_ptr + rows[:, None] * C + cs[None, :],
                    mask=(rows[:, None] < R) & (cs[None, :] < C), other=0.0)
        v = v.to(tl.float32)
        acc += v * v
    tl.store(partial_ptr + split * C + cs, tl.sum(acc, axis=0), mask=cs < C)
    if _take_ticket(ticket_ptr):
        _forward_update(partial_ptr, S, C, count, iter_ptr, step_ptr, chi_ptr, running_ptr,
                        skip_ptr, weight_ptr, bias_ptr, stats_ptr, m, warmup_iters, renorm_after,
                        eps, momentum, clip, BLOCK_S, BLOCK_M, BLOCK_C)
        tl.atomic_xchg(ticket_ptr, 0)


# --------------------------------------------------------------------------------------------
# K3: Σdy·x, Σdy split reduction + backward update.
# --------------------------------------------------------------------------------------------

@triton.jit
def _bwd_reduce_nchw(dy_ptr, x_ptr, partial_ptr, ticket_ptr, step_ptr, stats_ptr, weight_ptr,
                     psi_ptr, skip_ptr, out_ptr, N, C, HW, S, count, m, warmup_iters, eps,
                     BLOCK_N: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_S: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    c = tl.program_id(0)
    split = tl.program_id(1)
    hw_blocks = tl.cdiv(HW, BLOCK_HW)
    tiles = tl.cdiv(N, BLOCK_N) * hw_blocks
    ns = tl.arange(0, BLOCK_N)
    hws = tl.arange(0, BLOCK_HW)
    acc_dyx = tl.zeros((BLOCK_N, BLOCK_HW), dtype=tl.float32)
    acc_dy = tl.zeros((BLOCK_N, BLOCK_HW), dtype=tl.float32)
    for tile in range(split, tiles, S):
        nb = tile // hw_blocks
        n = nb * BLOCK_N + ns
        hw = (tile - nb * hw_blocks) * BLOCK_HW + hws
        offs = (n[:, None] * C + c) * HW + hw[None, :]
        mask = (n[:, None] < N) & (hw[None, :] < HW)
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc_dyx += g * v
        acc_dy += g
    tl.store(partial_ptr + split * C + c, tl.sum(tl.sum(acc_dyx, axis=1), axis=0))
    tl.store(partial_ptr + (S + split) * C + c, tl.sum(tl.sum(acc_dy, axis=1), axis=0))
    if _take_ticket(ticket_ptr):
        _backward_update(partial_ptr, S, C, count, step_ptr, stats_ptr, weight_ptr, psi_ptr,
                         skip_ptr, out_ptr, m, warmup_iters, eps, BLOCK_S, BLOCK_M, BLOCK_C)
        tl.atomic_xchg(ticket_ptr, 0)


@triton.jit
def _bwd_reduce_nhwc(dy_ptr, x_ptr, partial_ptr, ticket_ptr, step_ptr, stats_ptr, weight_ptr,
                     psi_ptr, skip_ptr, out_ptr, R, C, S, count, m, warmup_iters, eps,
                     BLOCK_R: tl.constexpr, BLOCK_CT: tl.constexpr, BLOCK_S: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    cs = tl.program_id(0) * BLOCK_CT + tl.arange(0, BLOCK_CT)
    split = tl.program_id(1)
    rs = tl.arange(0, BLOCK_R)
    acc_dyx = tl.zeros((BLOCK_R, BLOCK_CT), dtype=tl.float32)
    acc_dy = tl.zeros((BLOCK_R, BLOCK_CT), dtype=tl.float32)
    for tile in range(split, tl.cdiv(R, BLOCK_R), S):
        rows = tile * BLOCK_R + rs
        offs = rows[:, None] * C + cs[None, :]
        mask = (rows[:, None] < R) & (cs[None, :] < C)
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc_dyx += g * v
        acc_dy += g
    tl.store(partial_ptr + split * C + cs, tl.sum(acc_dyx, axis=0), mask=cs < C)
    tl.store(partial_ptr + (S + split) * C + cs, tl.sum(acc_dy, axis=0), mask=cs < C)
    if _take_ticket(ticket_ptr):
        _backward_update(partial_ptr, S, C, count, step_ptr, stats_ptr, weight_ptr, psi_ptr,
                         skip_ptr, out_ptr, m, warmup_iters, eps, BLOCK_S, BLOCK_M, BLOCK_C)
        tl.atomic_xchg(ticket_ptr, 0)


# --------------------------------------------------------------------------------------------
# K2 / K4: element-wise passes. coef_ptr points at two [C] float32 rows: a, then b.
# --------------------------------------------------------------------------------------------

@triton.jit
def _affine_nchw(x_ptr, y_ptr, coef_ptr, NC, C, HW,
                 BLOCK_ROWS: tl.constexpr, BLOCK_HW: tl.constexpr):
    """y = a·x + b over the [N·C, H·W] view."""
    pid = tl.program_id(0)
    hw_blocks = tl.cdiv(HW, BLOCK_HW)
    rb = pid // hw_blocks
    rows = rb * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    hw = (pid - rb * hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    row_ok = rows < NC
    c = rows % C
    a = tl.load(coef_ptr + c, mask=row_ok, other=0.0)
    b = tl.load(coef_ptr + C + c, mask=row_ok, other=0.0)
    offs = rows[:, None] * HW + hw[None, :]
    mask = row_ok[:, None] & (hw[None, :] < HW)
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (a[:, None] * v + b[:, None]).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _affine_nhwc(x_ptr, y_ptr, coef_ptr, R, C, BLOCK_R: tl.constexpr, BLOCK_CT: tl.constexpr):
    """y = a·x + b over the [N·H·W, C] matrix."""
    pid = tl.program_id(0)
    c_blocks = tl.cdiv(C, BLOCK_CT)
    rb = pid // c_blocks
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    cs = (pid - rb * c_blocks) * BLOCK_CT + tl.arange(0, BLOCK_CT)
    c_ok = cs < C
    a = tl.load(coef_ptr + cs, mask=c_ok, other=0.0)
    b = tl.load(coef_ptr + C + cs, mask=c_ok, other=0.0)
    offs = rows[:, None] * C + cs[None, :]
    mask = (rows[:, None] < R) & c_ok[None, :]
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (a[None, :] * v + b[None, :]).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dx_nchw(dy_ptr, x_ptr, dx_ptr, coef_ptr, NC, C, HW,
             BLOCK_ROWS: tl.constexpr, BLOCK_HW: tl.constexpr):
    """dx = a·dy − b·x over the [N·C, H·W] view."""
    pid = tl.program_id(0)
    hw_blocks = tl.cdiv(HW, BLOCK_HW)
    rb = pid // hw_blocks
    rows = rb * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    hw = (pid - rb * hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    row_ok = rows < NC
    c = rows % C
    a = tl.load(coef_ptr + c, mask=row_ok, other=0.0)
    b = tl.load(coef_ptr + C + c, mask=row_ok, other=0.0)
    offs = rows[:, None] * HW + hw[None, :]
    mask = row_ok[:, None] & (hw[None, :] < HW)
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offs, (a[:, None] * g - b[:, None] * v).to(dx_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _dx_nhwc(dy_ptr, x_ptr, dx_ptr, coef_ptr, R, C, BLOCK_R: tl.constexpr, BLOCK_CT: tl.constexpr):
    """dx = a·dy − b·x over the [N·H·W, C] matrix."""
    pid = tl.program_id(0)
    c_blocks = tl.cdiv(C, BLOCK_CT)
    rb = pid // c_blocks
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    cs = (pid - rb * c_blocks) * BLOCK_CT + tl.arange(0, BLOCK_CT)
    c_ok = cs < C
    a = tl.load(coef_ptr + cs, mask=c_ok, other=0.0)
    b = tl.load(coef_ptr + C + cs, mask=c_ok, other=0.0)
    offs = rows[:, None] * C + cs[None, :]
    mask = (rows[:, None] < R) & c_ok[None, :]
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offs, (a[None, :] * g - b[None, :] * v).to(dx_ptr.dtype.element_ty),
             mask=mask)


KERNELS = {
    "fwd_reduce_nchw": _fwd_reduce_nchw, "fwd_reduce_nhwc": _fwd_reduce_nhwc,
    "affine_nchw": _affine_nchw, "affine_nhwc": _affine_nhwc,
    "bwd_reduce_nchw": _bwd_reduce_nchw, "bwd_reduce_nhwc": _bwd_reduce_nhwc,
    "dx_nchw": _dx_nchw, "dx_nhwc": _dx_nhwc,
}


def launch_options(kernel: str) -> dict:
    """Compile options (num_warps, maxnreg) of a kernel of `KERNELS`."""
    return REDUCE_OPTIONS if "reduce" in kernel else ELEMENTWISE_OPTIONS


# --------------------------------------------------------------------------------------------
# Host side: shapes only, never a device value.
# --------------------------------------------------------------------------------------------

def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


class Plan:
    """Tile sizes and grids for one input shape and layout; derived from shapes alone.

    Attributes:
        channels_last: NHWC kernels when True, NCHW otherwise.
        splits: S, the number of programs that share one channel (or channel tile) in K1/K3.
        reduce_grid, elementwise_grid: launch grids.
        reduce_blocks, elementwise_blocks: the tile constexprs of each kernel.
        update_blocks: BLOCK_S, BLOCK_M, BLOCK_C of the last program's C-sized update.
    """

    def __init__(self, shape: Tuple[int, int, int, int], channels_last: bool, buffer_size: int,
                 target_programs: int):
        n, c, h, w = shape
        hw = h * w
        self.channels_last = channels_last
        if channels_last:
            rows = n * hw
            block_ct = min(_pow2(c), 64)
            block_r = max(1, min(_pow2(rows), TILE // block_ct))
            channel_programs = triton.cdiv(c, block_ct)
            tiles = triton.cdiv(rows, block_r)
            self.reduce_blocks = dict(BLOCK_R=block_r, BLOCK_CT=block_ct)
            self.elementwise_blocks = dict(BLOCK_R=block_r, BLOCK_CT=block_ct)
            self.elementwise_grid = (triton.cdiv(rows, block_r) * channel_programs,)
        else:
            block_hw = min(_pow2(hw), TILE)
            block_n = max(1, min(_pow2(n), TILE // block_hw))
            channel_programs = c
            tiles = triton.cdiv(n, block_n) * triton.cdiv(hw, block_hw)
            block_rows = max(1, min(_pow2(n * c), TILE // block_hw))
            self.reduce_blocks = dict(BLOCK_N=block_n, BLOCK_HW=block_hw)
            self.elementwise_blocks = dict(BLOCK_ROWS=block_rows, BLOCK_HW=block_hw)
            self.elementwise_grid = (triton.cdiv(n * c, block_rows) * triton.cdiv(hw, block_hw),)
        self.splits = max(1, min(tiles, _MAX_SPLITS,
                                 triton.cdiv(target_programs, channel_programs)))
        self.reduce_grid = (channel_programs, self.splits)
        block_c = min(_pow2(c), UPDATE_BLOCK_C)
        self.update_blocks = dict(BLOCK_S=min(_pow2(self.splits), UPDATE_BLOCK_S),
                                  BLOCK_M=min(_pow2(buffer_size), 16), BLOCK_C=block_c)


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        # About four resident programs per SM; a query of cached device properties, no sync.
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_PROGRAMS


def supports(module, x: torch.Tensor) -> bool:
    """Whether the kernels cover this input and module (else the PyTorch path runs)."""
    if x.device.type == "cpu" and not INTERPRETED:
        return False
    if x.dtype not in _SUPPORTED_DTYPES or x.numel() + TILE * x.shape[1] >= 2**31:
        return False
    tensors = (module.weight, module.bias, module.chi_buffer, module.psi_buffer,
               module.running_var)
    return all(t.dtype == torch.float32 and t.device == x.device for t in tensors)


def _dense(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def _tickets(module, device: torch.device) -> torch.Tensor:
    """Two int32 tickets (forward, backward) per module and device; zero between launches."""
    store = module.__dict__.setdefault("_triton_tickets", {})
    ticket = store.get(device)
    if ticket is None:
        ticket = store[device] = torch.zeros(2, dtype=torch.int32, device=device)
    return ticket


class _MABNTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, module):
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        x = _dense(x, channels_last)
        n, c, h, w = x.shape
        plan = Plan(tuple(x.shape), channels_last, module.buffer_size, _target_programs(x.device))
        f32 = dict(dtype=torch.float32, device=x.device)
        partials = torch.empty(plan.splits, c, **f32)
        stats = torch.empty(4, c, **f32)  # s², r, a, b
        step = torch.empty(1, dtype=torch.long, device=x.device)
        tickets = _tickets(module, x.device)
        common = dict(count=float(n * h * w), m=module.buffer_size,
                      warmup_iters=module.warmup_iters,
                      renorm_after=max(module.renorm_warmup_iters, module.warmup_iters),
                      eps=module.eps, momentum=module.momentum, clip=module.renorm_clip,
                      **REDUCE_OPTIONS, **plan.update_blocks, **plan.reduce_blocks)
        buffers = (partials, tickets, module.iteration, step, module.chi_buffer, module.running_var,
                   module.skipped_forward_stats, weight, bias, stats)
        y = torch.empty_like(x)
        if channels_last:
            _fwd_reduce_nhwc[plan.reduce_grid](x, *buffers, n * h * w, c, plan.splits, **common)
            _affine_nhwc[plan.elementwise_grid](x, y, stats[2], n * h * w, c,
                                                **ELEMENTWISE_OPTIONS, **plan.elementwise_blocks)
        else:
            _fwd_reduce_nchw[plan.reduce_grid](x, *buffers, n, c, h * w, plan.splits, **common)
            _affine_nchw[plan.elementwise_grid](x, y, stats[2], n * c, c, h * w,
                                                **ELEMENTWISE_OPTIONS, **plan.elementwise_blocks)
        ctx.save_for_backward(x, weight, stats, step)
        ctx.plan, ctx.module = plan, module
        module.last_renorm = stats[1]
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight, stats, step = ctx.saved_tensors
        plan, module = ctx.plan, ctx.module
        n, c, h, w = x.shape
        dy = _dense(grad_out.to(x.dtype), plan.channels_last)
        partials = torch.empty(2, plan.splits, c, dtype=torch.float32, device=x.device)
        out = torch.empty(4, c, dtype=torch.float32, device=x.device)  # dγ, dβ, a, b
        common = dict(count=float(n * h * w), m=module.buffer_size,
                      warmup_iters=module.warmup_iters, eps=module.eps, **REDUCE_OPTIONS,
                      **plan.update_blocks, **plan.reduce_blocks)
        buffers = (partials, _tickets(module, x.device)[1:], step, stats, weight,
                   module.psi_buffer, module.skipped_backward_stats, out)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        if plan.channels_last:
            _bwd_reduce_nhwc[plan.reduce_grid](dy, x, *buffers, n * h * w, c, plan.splits,
                                               **common)
            if grad_x is not None:
                _dx_nhwc[plan.elementwise_grid](dy, x, grad_x, out[2], n * h * w, c,
                                                **ELEMENTWISE_OPTIONS, **plan.elementwise_blocks)
        else:
            _bwd_reduce_nchw[plan.reduce_grid](dy, x, *buffers, n, c, h * w, plan.splits,
                                               **common)
            if grad_x is not None:
                _dx_nchw[plan.elementwise_grid](dy, x, grad_x, out[2], n * c, c, h * w,
                                                **ELEMENTWISE_OPTIONS, **plan.elementwise_blocks)
        return grad_x, out[0].to(weight.dtype), out[1].to(weight.dtype), None


def mabn_train_step(module, x: torch.Tensor) -> torch.Tensor:
    """One training-mode forward of `module` (an MABN2d) through the four fused kernels.

    The caller checks `supports(module, x)` and that x is non-empty.
    """
    return _MABNTritonFunction.apply(x, module.weight, module.bias, module)
