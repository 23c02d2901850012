"""Fused Triton kernels for a training step of `MABN2d`: four launches per layer-step.

Forward
    K1 (`_fwd_reduce_*`): split per-channel reduction of Σx² over a grid of channel tiles × S
        splits (an NCHW tile is one channel, an NHWC tile up to CHANNEL_TILE channels). With
        S > 1, every program stores its partial sums, then takes a ticket of its tile (block
        barrier, then an integer atomic add with acquire-release semantics). The program that
        draws a tile's last ticket combines the tile's S partials, whichever program finished
        first: it accumulates them into a 2-D register tile in split order and sums the tile's
        rows once at the end, a fixed order, with no float atomics. With S = 1 (a constexpr
        variant: res3-res5 in NCHW) a program owns its tile and skips partials, ticket and combine.
        The tile's owner then updates the tile's channels: χ into the forward ring (non-finite
        channels keep their old entry), s², r (also into the module's ``last_renorm``),
        running_var and the two coefficients of the affine map. It then takes a ticket of the
        layer, whose high bits count the tiles with a non-finite χ; the layer's last tile advances
        the step counter and the skip counter. Each last program puts its ticket back to 0 with a
        relaxed exchange (the launch boundary publishes it), so no memset is launched; no program
        loops over all channels.
    K2 (`_scale_add_*` without v): y = a·x + b in x's dtype.
Backward
    K3 (`_bwd_reduce_*`): the same protocol for Σdy·x and Σdy; a tile's owner records ψ into
        the backward ring and forms ψ̄, dγ, dβ and the coefficients of dx; the layer's last tile
        counts a non-finite ψ.
    K4 (`_scale_add_*`): dx = a·dy + b·x in x's dtype (a = γ·r/σ, b = −ψ̄/σ²).

Each kernel exists for NCHW (a [N·C, H·W] view with H·W contiguous) and NHWC / channels_last (a
[N·H·W, C] matrix). NCHW kernels receive H·W as H·W / ROW_ALIGN and multiply it back by the
constexpr ROW_ALIGN, so that the compiler knows rows start on 16-byte boundaries whenever they do
(res4, res5 and the mask head are not multiples of 16 elements) and vectorises their loads.
Statistics are accumulated and kept in float32 whatever the input dtype. The tickets are the
module's ``_triton_tickets`` buffer, allocated with the module (never during a step, so never
inside a CUDA-graph capture). Kernels launch on the input's device, whichever device is current.
Nothing here reads a device value on the host.

The module imports Triton; `mabn_det` imports it only when a `MABN2d(kernel="triton")` layer sees a
CUDA tensor (or a CPU tensor under ``TRITON_INTERPRET=1``, which is how the CPU tests run it).
"""
import contextlib
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
MIN_BLOCK_HW = 256  # NCHW: the shortest row segment a tile may use to fit H·W more tightly
CHANNEL_TILE = 64  # NHWC: channels per channel tile
COMBINE_TILE = 2048  # partial sums loaded per iteration of a tile's combine (its 2-D accumulator)
RING_ROWS = 16  # ring rows loaded per iteration of a tile's update
INTERPRETER_PROGRAMS = 8  # programs per reduction under the interpreter, which runs them serially
NUM_WARPS = 4
# Register cap of the reductions. Left alone, ptxas keeps them at 48-56 registers (for occupancy)
# by spilling a few bytes in some variants; with a cap they never spill
# (tests/layers/mabn_triton_aot.py compiles every variant for sm_90).
REDUCE_MAXNREG = 128
REDUCE_OPTIONS = dict(num_warps=NUM_WARPS, maxnreg=REDUCE_MAXNREG)
ELEMENTWISE_OPTIONS = dict(num_warps=NUM_WARPS)
_MAX_SPLITS = 1024
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# A layer ticket counts arriving tiles below this unit and tiles with a non-finite statistic in
# multiples of it; supports() keeps C < 2¹⁵, so neither part overflows an int32.
_BAD_TILE = tl.constexpr(65536)
MAX_CHANNELS = 2**15 - 1


# --------------------------------------------------------------------------------------------
# The ticket protocol and a tile's update, run by the owner of each channel tile: its only
# program (S = 1) or the last of its S programs to arrive.
# --------------------------------------------------------------------------------------------

@triton.jit
def _take_ticket(ticket_ptr, increment):
    """Add `increment` to the ticket and return its previous value. The barrier orders every
    thread's earlier loads and stores of this program before the release; the acquire orders the
    released stores of the programs that drew earlier tickets before what follows."""
    tl.debug_barrier()
    return tl.atomic_add(ticket_ptr, increment, sem="acq_rel")


@triton.jit
def _put_back(ticket_ptr):
    """Reset a ticket that every program has drawn. Relaxed: nothing in this launch reads it
    again, and the end of the launch makes the store visible to the next one."""
    tl.atomic_xchg(ticket_ptr, 0, sem="relaxed")


@triton.jit
def _tile_is_complete(ticket_ptr, tile, S):
    """True in exactly one of the S programs of channel tile `tile`: the last to arrive."""
    return _take_ticket(ticket_ptr + 1 + tile, 1) == S - 1


@triton.jit
def _layer_is_complete(ticket_ptr, tile_bad):
    """Called once per tile, by its owner, with tile_bad = 1 when a statistic of the tile is not
    finite. Returns (whether this is the last tile, whether any tile was bad)."""
    before = _take_ticket(ticket_ptr, 1 + tile_bad * _BAD_TILE)
    return (before % _BAD_TILE) == tl.num_programs(0) - 1, (before // _BAD_TILE + tile_bad) > 0


@triton.jit
def _combine(partial_ptr, S, C, cs, cmask, BLOCK_S: tl.constexpr, BLOCK_CT: tl.constexpr):
    """Σ over the S rows of a [S, C] float32 partial-sum matrix for channels `cs`: row s adds
    into accumulator row s mod BLOCK_S, in split order, and the accumulator's rows are summed
    once at the end; the order never depends on which program arrived last."""
    rows = tl.arange(0, BLOCK_S)
    acc = tl.zeros((BLOCK_S, BLOCK_CT), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        r = s0 + rows
        # .cg: read from L2, where the other programs' stores are, never from a stale L1 line.
        acc += tl.load(partial_ptr + r[:, None] * C + cs[None, :],
                       mask=(r[:, None] < S) & cmask[None, :], other=0.0, cache_modifier=".cg")
    return tl.sum(acc, axis=0)


@triton.jit
def _record_and_average(ring_ptr, m, slot, C, cs, cmask, value,
                        BLOCK_M: tl.constexpr, BLOCK_CT: tl.constexpr):
    """Write `value` into row `slot` of the [m, C] ring, keeping the old entry of non-finite
    channels; return (non-finite flags, mean of the ring after the write)."""
    bad = ((value != value) | (tl.abs(value) == float("inf"))) & cmask
    rows = tl.arange(0, BLOCK_M)
    others = tl.zeros((BLOCK_CT,), dtype=tl.float32)
    old = tl.zeros((BLOCK_CT,), dtype=tl.float32)
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
def _forward_update(sum_sq, ticket_ptr, C, cs, count, iter_ptr, step_ptr, chi_ptr, running_ptr,
                    skip_ptr, weight_ptr, bias_ptr, stats_ptr, renorm_ptr, m, warmup_iters,
                    renorm_after, eps, momentum, clip,
                    BLOCK_M: tl.constexpr, BLOCK_CT: tl.constexpr):
    """The channels `cs` of one tile, from their Σx², then (last tile) the counters.
    stats rows: 0 s², 1 r, 2 a = γ·r/√(s²+ε), 3 b = β; r also into the module's last_renorm."""
    cmask = cs < C
    # Read before this tile's layer ticket; the counter is written only after the last one.
    t = tl.load(iter_ptr) + 1
    slot = t % m
    use_batch = (t <= m) | (t < warmup_iters)
    renorm_on = t > renorm_after
    chi = sum_sq / count
    bad, chi_mean = _record_and_average(chi_ptr, m, slot, C, cs, cmask, chi, BLOCK_M, BLOCK_CT)
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
    tl.store(renorm_ptr + cs, r, mask=cmask)
    tl.store(stats_ptr + 2 * C + cs, (gamma * r) * (1.0 / tl.sqrt(var + eps)), mask=cmask)
    tl.store(stats_ptr + 3 * C + cs, beta, mask=cmask)
    last, any_bad = _layer_is_complete(ticket_ptr, tl.max(bad.to(tl.int32), axis=0))
    if last:
        tl.store(skip_ptr, tl.load(skip_ptr) + any_bad.to(tl.int64))
        tl.store(iter_ptr, t)
        tl.store(step_ptr, t)
        _put_back(ticket_ptr)


@triton.jit
def _backward_update(sum_dy_x, sum_dy, ticket_ptr, C, cs, count, step_ptr, stats_ptr, weight_ptr,
                     psi_ptr, skip_ptr, out_ptr, m, warmup_iters, eps,
                     BLOCK_M: tl.constexpr, BLOCK_CT: tl.constexpr):
    """The channels `cs` of one tile, from their Σdy·x and Σdy, then (last tile) the skip
    counter. out rows: 0 dγ, 1 dβ, 2 a = γ·r/σ, 3 b = −ψ̄/σ² (dx = a·dy + b·x)."""
    cmask = cs < C
    t = tl.load(step_ptr)
    slot = t % m
    use_batch = (t <= m) | (t < warmup_iters)
    var = tl.load(stats_ptr + cs, mask=cmask, other=1.0)
    r = tl.load(stats_ptr + C + cs, mask=cmask, other=1.0)
    gamma = tl.load(weight_ptr + cs, mask=cmask, other=0.0)
    inv_std = tl.rsqrt(var + eps)
    grad_scale = (gamma * r) * inv_std
    psi = grad_scale * sum_dy_x / count
    bad, psi_mean = _record_and_average(psi_ptr, m, slot, C, cs, cmask, psi, BLOCK_M, BLOCK_CT)
    psi_bar = tl.where(use_batch, psi, psi_mean)
    tl.store(out_ptr + cs, (r * inv_std) * sum_dy_x, mask=cmask)
    tl.store(out_ptr + C + cs, sum_dy, mask=cmask)
    tl.store(out_ptr + 2 * C + cs, grad_scale, mask=cmask)
    tl.store(out_ptr + 3 * C + cs, -((psi_bar * inv_std) * inv_std), mask=cmask)
    last, any_bad = _layer_is_complete(ticket_ptr, tl.max(bad.to(tl.int32), axis=0))
    if last:
        tl.store(skip_ptr, tl.load(skip_ptr) + any_bad.to(tl.int64))
        _put_back(ticket_ptr)


# --------------------------------------------------------------------------------------------
# K1 / K3: split reductions. Program (tile, split) sums the tiles split, split + S, ... of its
# channels' elements; ticket_ptr points at [layer ticket, one ticket per channel tile].
# SINGLE_SPLIT (S = 1) compiles the owner's path alone: no partials, tile ticket or combine.
# --------------------------------------------------------------------------------------------

@triton.jit
def _nchw_offsets(tile, c, N, C, HW, BLOCK_N: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Offsets and mask of tile number `tile` of channel c: BLOCK_N images × BLOCK_HW pixels."""
    hw_blocks = tl.cdiv(HW, BLOCK_HW)
    nb = tile // hw_blocks
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    hw = (tile - nb * hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    return (n[:, None] * C + c) * HW + hw[None, :], (n[:, None] < N) & (hw[None, :] < HW)


@triton.jit
def _fwd_reduce_nchw(x_ptr, partial_ptr, ticket_ptr, iter_ptr, step_ptr, chi_ptr, running_ptr,
                     skip_ptr, weight_ptr, bias_ptr, stats_ptr, renorm_ptr,
                     N, C, HW_Q, S, count, m, warmup_iters, renorm_after, eps, momentum, clip,
                     ROW_ALIGN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HW: tl.constexpr,
                     BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, SINGLE_SPLIT: tl.constexpr):
    c = tl.program_id(0)
    split = tl.program_id(1)
    HW = HW_Q * ROW_ALIGN
    acc = tl.zeros((BLOCK_N, BLOCK_HW), dtype=tl.float32)
    for tile in range(split, tl.cdiv(N, BLOCK_N) * tl.cdiv(HW, BLOCK_HW), S):
        offs, mask = _nchw_offsets(tile, c, N, C, HW, BLOCK_N, BLOCK_HW)
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc += v * v
    sum_sq = tl.sum(tl.sum(acc, axis=1), axis=0, keep_dims=True)
    cs = c + tl.arange(0, 1)
    owner = True
    if not SINGLE_SPLIT:
        tl.store(partial_ptr + split * C + cs, sum_sq)
        owner = _tile_is_complete(ticket_ptr, c, S)
        if owner:
            sum_sq = _combine(partial_ptr, S, C, cs, cs < C, BLOCK_S, 1)
            _put_back(ticket_ptr + 1 + c)
    if owner:
        _forward_update(sum_sq, ticket_ptr, C, cs, count, iter_ptr, step_ptr, chi_ptr,
                        running_ptr, skip_ptr, weight_ptr, bias_ptr, stats_ptr, renorm_ptr, m,
                        warmup_iters, renorm_after, eps, momentum, clip, BLOCK_M, 1)


@triton.jit
def _fwd_reduce_nhwc(x_ptr, partial_ptr, ticket_ptr, iter_ptr, step_ptr, chi_ptr, running_ptr,
                     skip_ptr, weight_ptr, bias_ptr, stats_ptr, renorm_ptr,
                     R, C, S, count, m, warmup_iters, renorm_after, eps, momentum, clip,
                     BLOCK_R: tl.constexpr, BLOCK_CT: tl.constexpr, BLOCK_S: tl.constexpr,
                     BLOCK_M: tl.constexpr, SINGLE_SPLIT: tl.constexpr):
    ct = tl.program_id(0)
    cs = ct * BLOCK_CT + tl.arange(0, BLOCK_CT)
    split = tl.program_id(1)
    rs = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_CT), dtype=tl.float32)
    for tile in range(split, tl.cdiv(R, BLOCK_R), S):
        rows = tile * BLOCK_R + rs
        v = tl.load(x_ptr + rows[:, None] * C + cs[None, :],
                    mask=(rows[:, None] < R) & (cs[None, :] < C), other=0.0)
        v = v.to(tl.float32)
        acc += v * v
    sum_sq = tl.sum(acc, axis=0)
    owner = True
    if not SINGLE_SPLIT:
        tl.store(partial_ptr + split * C + cs, sum_sq, mask=cs < C)
        owner = _tile_is_complete(ticket_ptr, ct, S)
        if owner:
            sum_sq = _combine(partial_ptr, S, C, cs, cs < C, BLOCK_S, BLOCK_CT)
            _put_back(ticket_ptr + 1 + ct)
    if owner:
        _forward_update(sum_sq, ticket_ptr, C, cs, count, iter_ptr, step_ptr, chi_ptr,
                        running_ptr, skip_ptr, weight_ptr, bias_ptr, stats_ptr, renorm_ptr, m,
                        warmup_iters, renorm_after, eps, momentum, clip, BLOCK_M, BLOCK_CT)


@triton.jit
def _bwd_reduce_nchw(dy_ptr, x_ptr, partial_ptr, ticket_ptr, step_ptr, stats_ptr, weight_ptr,
                     psi_ptr, skip_ptr, out_ptr, N, C, HW_Q, S, count, m, warmup_iters, eps,
                     ROW_ALIGN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HW: tl.constexpr,
                     BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, SINGLE_SPLIT: tl.constexpr):
    c = tl.program_id(0)
    split = tl.program_id(1)
    HW = HW_Q * ROW_ALIGN
    acc_dyx = tl.zeros((BLOCK_N, BLOCK_HW), dtype=tl.float32)
    acc_dy = tl.zeros((BLOCK_N, BLOCK_HW), dtype=tl.float32)
    for tile in range(split, tl.cdiv(N, BLOCK_N) * tl.cdiv(HW, BLOCK_HW), S):
        offs, mask = _nchw_offsets(tile, c, N, C, HW, BLOCK_N, BLOCK_HW)
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc_dyx += g * v
        acc_dy += g
    sum_dy_x = tl.sum(tl.sum(acc_dyx, axis=1), axis=0, keep_dims=True)
    sum_dy = tl.sum(tl.sum(acc_dy, axis=1), axis=0, keep_dims=True)
    cs = c + tl.arange(0, 1)
    owner = True
    if not SINGLE_SPLIT:
        tl.store(partial_ptr + split * C + cs, sum_dy_x)
        tl.store(partial_ptr + (S + split) * C + cs, sum_dy)
        owner = _tile_is_complete(ticket_ptr, c, S)
        if owner:
            sum_dy_x = _combine(partial_ptr, S, C, cs, cs < C, BLOCK_S, 1)
            sum_dy = _combine(partial_ptr + S * C, S, C, cs, cs < C, BLOCK_S, 1)
            _put_back(ticket_ptr + 1 + c)
    if owner:
        _backward_update(sum_dy_x, sum_dy, ticket_ptr, C, cs, count, step_ptr, stats_ptr,
                         weight_ptr, psi_ptr, skip_ptr, out_ptr, m, warmup_iters, eps, BLOCK_M, 1)


@triton.jit
def _bwd_reduce_nhwc(dy_ptr, x_ptr, partial_ptr, ticket_ptr, step_ptr, stats_ptr, weight_ptr,
                     psi_ptr, skip_ptr, out_ptr, R, C, S, count, m, warmup_iters, eps,
                     BLOCK_R: tl.constexpr, BLOCK_CT: tl.constexpr, BLOCK_S: tl.constexpr,
                     BLOCK_M: tl.constexpr, SINGLE_SPLIT: tl.constexpr):
    ct = tl.program_id(0)
    cs = ct * BLOCK_CT + tl.arange(0, BLOCK_CT)
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
    sum_dy_x = tl.sum(acc_dyx, axis=0)
    sum_dy = tl.sum(acc_dy, axis=0)
    owner = True
    if not SINGLE_SPLIT:
        tl.store(partial_ptr + split * C + cs, sum_dy_x, mask=cs < C)
        tl.store(partial_ptr + (S + split) * C + cs, sum_dy, mask=cs < C)
        owner = _tile_is_complete(ticket_ptr, ct, S)
        if owner:
            sum_dy_x = _combine(partial_ptr, S, C, cs, cs < C, BLOCK_S, BLOCK_CT)
            sum_dy = _combine(partial_ptr + S * C, S, C, cs, cs < C, BLOCK_S, BLOCK_CT)
            _put_back(ticket_ptr + 1 + ct)
    if owner:
        _backward_update(sum_dy_x, sum_dy, ticket_ptr, C, cs, count, step_ptr, stats_ptr,
                         weight_ptr, psi_ptr, skip_ptr, out_ptr, m, warmup_iters, eps, BLOCK_M,
                         BLOCK_CT)


# --------------------------------------------------------------------------------------------
# K2 / K4: out = a·u + b·v (HAS_V) or a·u + b; coef_ptr points at two [C] float32 rows: a, b.
# --------------------------------------------------------------------------------------------

@triton.jit
def _scale_add_nchw(u_ptr, v_ptr, out_ptr, coef_ptr, NC, C, HW_Q, HAS_V: tl.constexpr,
                    ROW_ALIGN: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Over the [N·C, H·W] view."""
    pid = tl.program_id(0)
    HW = HW_Q * ROW_ALIGN
    hw_blocks = tl.cdiv(HW, BLOCK_HW)
    rb = pid // hw_blocks
    rows = rb * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    hw = (pid - rb * hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    row_ok = rows < NC
    c = rows % C
    a = tl.load(coef_ptr + c, mask=row_ok, other=0.0)[:, None]
    b = tl.load(coef_ptr + C + c, mask=row_ok, other=0.0)[:, None]
    offs = rows[:, None] * HW + hw[None, :]
    mask = row_ok[:, None] & (hw[None, :] < HW)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_V:
        out = a * u + b * tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        out = a * u + b
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_add_nhwc(u_ptr, v_ptr, out_ptr, coef_ptr, R, C, HAS_V: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_CT: tl.constexpr):
    """Over the [N·H·W, C] matrix."""
    pid = tl.program_id(0)
    c_blocks = tl.cdiv(C, BLOCK_CT)
    rb = pid // c_blocks
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    cs = (pid - rb * c_blocks) * BLOCK_CT + tl.arange(0, BLOCK_CT)
    c_ok = cs < C
    a = tl.load(coef_ptr + cs, mask=c_ok, other=0.0)[None, :]
    b = tl.load(coef_ptr + C + cs, mask=c_ok, other=0.0)[None, :]
    offs = rows[:, None] * C + cs[None, :]
    mask = (rows[:, None] < R) & c_ok[None, :]
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_V:
        out = a * u + b * tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        out = a * u + b
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


KERNELS = {
    "fwd_reduce_nchw": _fwd_reduce_nchw, "fwd_reduce_nhwc": _fwd_reduce_nhwc,
    "bwd_reduce_nchw": _bwd_reduce_nchw, "bwd_reduce_nhwc": _bwd_reduce_nhwc,
    "scale_add_nchw": _scale_add_nchw, "scale_add_nhwc": _scale_add_nhwc,
}


def launch_options(kernel: str) -> dict:
    """Compile options (num_warps, maxnreg) of a kernel of `KERNELS`."""
    return REDUCE_OPTIONS if "reduce" in kernel else ELEMENTWISE_OPTIONS


# --------------------------------------------------------------------------------------------
# Host side: shapes only, never a device value.
# --------------------------------------------------------------------------------------------

def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _row_segment(hw: int) -> int:
    """BLOCK_HW for rows of `hw` elements: a power of two in [MIN_BLOCK_HW, TILE]. The longest one
    unless a shorter one spends 5 % fewer lanes on the row (its masked tail included): longer
    segments make bigger tiles, shorter ones fit rows like res4's 4200 elements more tightly."""
    best = min(_pow2(hw), TILE)
    block = best // 2
    while block >= MIN_BLOCK_HW:
        if triton.cdiv(hw, block) * block < 0.95 * triton.cdiv(hw, best) * best:
            best = block
        block //= 2
    return best


def _row_align(hw: int, element_size: int) -> int:
    """The largest divisor of `hw` among 16 bytes' worth of elements, 8, 4, 2 and 1: rows of
    an NCHW tensor then start on multiples of it."""
    align = 16 // element_size
    while hw % align:
        align //= 2
    return align


class Plan:
    """Tile sizes and grids for one input shape, layout and element size; from shapes alone.

    Attributes:
        channels_last: NHWC kernels when True, NCHW otherwise.
        splits: S, the number of programs that share one channel tile in K1/K3.
        channel_tiles: the reductions' first grid dimension (C for NCHW).
        row_align: NCHW: H·W is passed as H·W / row_align (1 for NHWC).
        reduce_grid, elementwise_grid: launch grids.
        reduce_blocks, elementwise_blocks: the constexprs of each kernel (SINGLE_SPLIT when
            splits is 1; BLOCK_S rows of partial sums per pass of the combine otherwise).
    """

    def __init__(self, shape: Tuple[int, int, int, int], channels_last: bool, buffer_size: int,
                 target_programs: int, element_size: int = 4):
        n, c, h, w = shape
        hw = h * w
        self.channels_last = channels_last
        if channels_last:
            rows = n * hw
            block_ct = min(_pow2(c), CHANNEL_TILE)
            block_r = max(1, min(_pow2(rows), TILE // block_ct))
            self.channel_tiles = triton.cdiv(c, block_ct)
            self.row_align = 1
            tiles = triton.cdiv(rows, block_r)
            self.reduce_blocks = dict(BLOCK_R=block_r, BLOCK_CT=block_ct)
            self.elementwise_blocks = dict(BLOCK_R=block_r, BLOCK_CT=block_ct)
            self.elementwise_grid = (triton.cdiv(rows, block_r) * self.channel_tiles,)
        else:
            block_ct = 1
            block_hw = _row_segment(hw)
            block_n = max(1, min(_pow2(n), TILE // block_hw))
            block_rows = max(1, min(_pow2(n * c), TILE // block_hw))
            self.channel_tiles = c
            self.row_align = _row_align(hw, element_size)
            tiles = triton.cdiv(n, block_n) * triton.cdiv(hw, block_hw)
            self.reduce_blocks = dict(ROW_ALIGN=self.row_align, BLOCK_N=block_n,
                                      BLOCK_HW=block_hw)
            self.elementwise_blocks = dict(ROW_ALIGN=self.row_align, BLOCK_ROWS=block_rows,
                                           BLOCK_HW=block_hw)
            self.elementwise_grid = (triton.cdiv(n * c, block_rows) * triton.cdiv(hw, block_hw),)
        # Whole waves: as many splits as fit in the target, not one more (a second, partly filled
        # wave would cost a full program's time for a few programs).
        self.splits = max(1, min(tiles, _MAX_SPLITS, target_programs // self.channel_tiles))
        self.reduce_grid = (self.channel_tiles, self.splits)
        self.reduce_blocks.update(BLOCK_S=min(_pow2(self.splits), max(1, COMBINE_TILE // block_ct)),
                                  BLOCK_M=min(_pow2(buffer_size), RING_ROWS),
                                  SINGLE_SPLIT=self.splits == 1)


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
    if x.shape[1] > MAX_CHANNELS:
        return False
    tensors = (module.weight, module.bias, module.chi_buffer, module.psi_buffer,
               module.running_var, module.last_renorm)
    return (all(t.dtype == torch.float32 and t.device == x.device for t in tensors)
            and module._triton_tickets.device == x.device)


def launch_device(device: torch.device):
    """The context the kernels launch in: Triton launches on the current CUDA device, which must
    be the input's (an input on cuda:1 while cuda:0 is current would otherwise fault or read peer
    memory)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _dense(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


class _MABNTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, module):
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        x = _dense(x, channels_last)
        n, c, h, w = x.shape
        plan = Plan(tuple(x.shape), channels_last, module.buffer_size, _target_programs(x.device),
                    x.element_size())
        f32 = dict(dtype=torch.float32, device=x.device)
        partials = torch.empty(plan.splits, c, **f32)
        stats = torch.empty(4, c, **f32)  # s², r, a, b
        step = torch.empty(1, dtype=torch.long, device=x.device)
        common = dict(count=float(n * h * w), m=module.buffer_size,
                      warmup_iters=module.warmup_iters,
                      renorm_after=max(module.renorm_warmup_iters, module.warmup_iters),
                      eps=module.eps, momentum=module.momentum, clip=module.renorm_clip,
                      **REDUCE_OPTIONS, **plan.reduce_blocks)
        buffers = (partials, module._triton_tickets[0], module.iteration, step,
                   module.chi_buffer, module.running_var, module.skipped_forward_stats, weight,
                   bias, stats, module.last_renorm)
        y = torch.empty_like(x)
        affine = dict(HAS_V=False, **ELEMENTWISE_OPTIONS, **plan.elementwise_blocks)
        with launch_device(x.device):
            if channels_last:
                _fwd_reduce_nhwc[plan.reduce_grid](x, *buffers, n * h * w, c, plan.splits,
                                                   **common)
                _scale_add_nhwc[plan.elementwise_grid](x, x, y, stats[2], n * h * w, c, **affine)
            else:
                hw_q = h * w // plan.row_align
                _fwd_reduce_nchw[plan.reduce_grid](x, *buffers, n, c, hw_q, plan.splits,
                                                   **common)
                _scale_add_nchw[plan.elementwise_grid](x, x, y, stats[2], n * c, c, hw_q,
                                                       **affine)
        ctx.save_for_backward(x, weight, stats, step)
        ctx.plan, ctx.module = plan, module
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
                      **plan.reduce_blocks)
        buffers = (partials, module._triton_tickets[1], step, stats, weight,
                   module.psi_buffer, module.skipped_backward_stats, out)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        dx = dict(HAS_V=True, **ELEMENTWISE_OPTIONS, **plan.elementwise_blocks)
        with launch_device(x.device):
            if plan.channels_last:
                _bwd_reduce_nhwc[plan.reduce_grid](dy, x, *buffers, n * h * w, c, plan.splits,
                                                   **common)
                if grad_x is not None:
                    _scale_add_nhwc[plan.elementwise_grid](dy, x, grad_x, out[2], n * h * w, c,
                                                           **dx)
            else:
                hw_q = h * w // plan.row_align
                _bwd_reduce_nchw[plan.reduce_grid](dy, x, *buffers, n, c, hw_q, plan.splits,
                                                   **common)
                if grad_x is not None:
                    _scale_add_nchw[plan.elementwise_grid](dy, x, grad_x, out[2], n * c, c, hw_q,
                                                           **dx)
        return grad_x, out[0].to(weight.dtype), out[1].to(weight.dtype), None


def mabn_train_step(module, x: torch.Tensor) -> torch.Tensor:
    """One training-mode forward of `module` (an MABN2d) through the four fused kernels.

    The caller checks `supports(module, x)` and that x is non-empty.
    """
    return _MABNTritonFunction.apply(x, module.weight, module.bias, module)
