"""Moving Average Batch Normalization (Yan et al., ICLR 2020, arXiv 2001.06838).

MABN normalises by the second moment χ = mean(x²) (no mean subtraction: the conv before it is
weight-centred) and replaces both the forward statistic χ and the backward statistic
ψ = mean(g·ẑ) by simple moving averages over the last ``buffer_size`` steps. With
``buffer_size = m`` and 2 images per GPU the layer sees the statistics of 2·m images, which is what
makes small-batch training stable.

Everything is computed with tensor ops on the layer's own buffers: no `.item()`, no Python branch
on a tensor value, so a training step never waits for the device. The PyTorch path issues few ops
per step: constants live in buffers, the non-finite guards are comparisons against per-slot limits,
and a ring's write and mean take one op each (see docs/benchmarks.md for the count).
"""
import contextlib
import math
import os
from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .mabn_settings import MABNSettings

__all__ = ["MABN2d"]

# What kernel="auto" picks for CUDA inputs. Stays False until the CUDA tests have passed on a real
# GPU with the Triton kernels (tests/layers/test_mabn_triton.py, test_mabn_robustness.py).
_AUTO_PICKS_TRITON = False


def channel_sums(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, one: torch.Tensor,
                 zero: torch.Tensor, with_sum_a: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel scale·Σ a·b and Σ a over (N, H, W), in one pass over memory.

    Batch norm's backward reduction computes exactly these sums (its dγ with mean 0 and inverse
    std `scale`, its dβ) in either memory format, accumulating half-precision inputs in float32 so
    that fp16 values near 6e4 do not overflow.

    Args:
        a, b: (N, C, H, W), the same dtype.
        scale: (C,) applied to Σ a·b after the sum.
        one, zero: (C,) constants of the statistics' dtype (the sums come back in it).
        with_sum_a: whether Σ a is wanted (else the second result is None).

    Returns:
        Two tensors of shape (C,).
    """
    _, sum_ab, sum_a = torch.ops.aten.native_batch_norm_backward(
        a, b, one, None, None, zero, scale, True, 0.0, [False, True, with_sum_a])
    return sum_ab, sum_a


def record(ring: torch.Tensor, value: torch.Tensor, magnitude: torch.Tensor,
           limits: torch.Tensor, skip_counter: torch.Tensor,
           mean_weights: torch.Tensor) -> torch.Tensor:
    """Write `value` into this step's row of `ring`, keeping the old entry of every non-finite
    channel, and return the ring's mean.

    Args:
        ring: (m, C) buffer, updated in place.
        value: (C,) new statistic, the ring's dtype.
        magnitude: (C,) |value| (`value` itself for a statistic that cannot be negative).
        limits: (m, 1): the dtype's largest value in this step's row, 0 in the others.
            `magnitude < limits` then holds exactly for the finite channels of this step's row
            (NaN compares false; the largest finite value itself counts as not finite).
        skip_counter: () int64, incremented in place when any channel of `value` is not finite.
        mean_weights: (m,), every entry 1/m.

    Returns:
        (C,) the mean over the ring's rows after the write.
    """
    written = torch.lt(magnitude, limits)
    torch.where(written, value, ring, out=ring)
    skip_counter.add_(torch.count_nonzero(written).lt_(value.shape[0]))
    # A matrix-vector product is the mean in one op; autocast would run it in half precision.
    device = ring.device.type
    with (torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device)
          else contextlib.nullcontext()):
        return torch.mv(ring.t(), mean_weights)


class _Step(NamedTuple):
    """What one training step's backward needs besides the saved tensors."""

    module: "MABN2d"  # its ψ ring, skip counter and constants
    limits: torch.Tensor  # (m, 1) write limits of this step's ring row (see `record`)
    averaged: torch.Tensor  # () bool: the rings' means instead of this batch's statistics


class _MABNFunction(torch.autograd.Function):
    """y = γ·r·x/√(s²+ε) + β with MABN's averaged backward.

    The forward statistics are inputs computed by the module: s = r/√(s²+ε), 1/√(s²+ε) and s².
    The backward computes ψ, records it in the backward ring and uses the ring's average once the
    warm-up is over.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, s, inv_std, var, step: _Step):
        slope = weight * s
        zero = step.module._zero
        # Eval-mode batch norm with mean 0, variance 0 and ε = 1 is the affine map slope·x + β in
        # one pass that keeps x's dtype and memory format and computes in float32.
        y = F.batch_norm(x, zero, zero, slope, bias, False, 0.0, 1.0)
        ctx.save_for_backward(x, weight, slope, s, inv_std, var)
        # The ring and counter are module buffers written by the backward: reached through the
        # module, outside autograd's saved-tensor version checks.
        ctx.step = step
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, slope, s, inv_std, var = ctx.saved_tensors
        step = ctx.step
        module = step.module
        # dγ = r/σ·Σ dy·x and dβ = Σ dy in one pass.
        grad_weight, grad_bias = channel_sums(grad_out, x, s, module._one, module._zero, True)
        # ψ = mean(g·ẑ) = γ·r/σ·mean(dy·x) = γ·dγ/(N·H·W)
        psi = torch.addcmul(module._zero, grad_weight, weight, value=x.shape[1] / x.numel())
        psi_mean = record(module.psi_buffer, psi, psi.abs(), step.limits,
                          module.skipped_backward_stats, module._ring_weights)
        psi_bar = torch.where(step.averaged, psi_mean, psi)
        # dx = (g − ẑ·ψ̄)/σ = slope·dy − (ψ̄/σ²)·x, with ψ̄/σ² as eval-mode batch norm of ψ̄
        # whose γ is 1/σ.
        psi_over_var = F.batch_norm(psi_bar.view(1, -1), module._zero, var, inv_std, None, False,
                                    0.0, module.eps)
        grad_x = grad_out * slope.view(1, -1, 1, 1).to(grad_out.dtype)
        grad_x.addcmul_(x, psi_over_var.view(1, -1, 1, 1).to(x.dtype), value=-1)
        return (grad_x, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), None, None, None,
                None)


def _setting(name: str) -> property:
    """A read-only view of a field of the layer's `MABNSettings`: the layer's constants are built
    from them once."""
    return property(lambda self: getattr(self._settings, name),
                    doc=f"{name} (see `MABNSettings`); fixed at construction.")


def triton_ticket_shape(num_features: int) -> Tuple[int, int]:
    """Shape of the int32 tickets of the Triton path (see `mabn_det.layers.mabn_triton`): row 0
    for the forward reduction, row 1 for the backward; in each, the layer's ticket and one per
    channel tile (at most C), padded to 16 bytes so that both rows start aligned."""
    return 2, 4 * math.ceil((1 + num_features) / 4)


class MABN2d(nn.Module):
    """Moving Average Batch Normalization over (N, C, H, W) inputs.

    Training step t (counted from 1, per channel, reductions over N, H, W):

    - χ = mean(x²) goes into slot t mod m of a forward ring; s² = χ while t ≤ m or t < warmup_iters,
      else the ring's mean.
    - ẑ = x/√(s²+ε); y = γ·r·ẑ + β with r = 1 while t ≤ max(renorm_warmup_iters, warmup_iters), else
      clip(√(s²+ε)/√(running_var+ε), 1/renorm_clip, renorm_clip), a constant for autograd.
    - running_var ← (1 − momentum)·running_var + momentum·s².
    - Backward: g = dy·γ·r; ψ = mean(g·ẑ) goes into a backward ring and is averaged like χ;
      dx = (g − ẑ·ψ̄)/√(s²+ε).

    Eval mode applies y = γ·x/√(running_var+ε) + β, a per-channel affine map. A non-finite χ or ψ
    (NaN input, AMP's overflowing gradients) never enters a ring or running_var; the
    ``skipped_forward_stats`` / ``skipped_backward_stats`` counters record it. An empty batch
    changes no buffer.

    State: the parameters ``weight`` (γ) and ``bias`` (β), (C,); the buffers ``iteration`` (t, ()
    int64), ``chi_buffer`` and ``psi_buffer`` (the rings, (m, C)), ``running_var`` (C,) and the
    two skip counters (() int64). ``last_renorm``, the last training step's r, (C,) (1 before the
    first), is a diagnostic: a buffer that moves with the module but is not saved, like the
    constants the training step reads (``_zero``, ``_one``, ... built once from the settings).
    Version history of the saved state: 1 (nn.Module's default, the layer up to 2026-12-06) and
    2 (the version is declared) hold the same tensors, so a version-1 checkpoint loads as it is;
    `_load_from_state_dict` is where a later version converts older ones.

    Args:
        num_features: C, the number of channels.
        **settings: the fields of `MABNSettings` (buffer_size, warmup_iters, renorm_warmup_iters,
            renorm_clip, momentum, eps, kernel); those not given take its defaults, the paper's
            detection settings. All but ``kernel`` are fixed at construction. ``kernel`` chooses
            how a training step is computed:

            - ``"torch"``: PyTorch ops (see docs/benchmarks.md for how many); the reference
              implementation, and the only one for CPU tensors.
            - ``"triton"``: for CUDA tensors, four fused Triton kernels per layer-step (two forward,
              two backward; see `mabn_det.layers.mabn_triton`), statistics in float32, outputs in
              the input's dtype, NCHW and channels_last. Inputs the kernels do not cover (float64,
              float64 parameters, ≥ 2³¹ elements) take the PyTorch path. CPU tensors take the
              PyTorch path, except under ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, which
              is how the tests check the kernels without a GPU).
            - ``"auto"`` (default): currently ``"torch"`` everywhere. The Triton path is opt-in
              until its CUDA tests have passed on a real GPU; then "auto" will pick it for CUDA.

            Both paths keep the same buffers, so checkpoints move freely between them; eval mode
            is always one `F.batch_norm` call. Triton is imported only when the Triton path runs.

    Raises:
        TypeError, ValueError: a setting of the wrong type or out of range (see `MABNSettings`).
    """

    _version = 2

    buffer_size = _setting("buffer_size")
    warmup_iters = _setting("warmup_iters")
    renorm_warmup_iters = _setting("renorm_warmup_iters")
    renorm_clip = _setting("renorm_clip")
    momentum = _setting("momentum")
    eps = _setting("eps")

    def __init__(self, num_features: int, **settings):
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be ≥ 1, got {num_features!r}")
        self._settings = MABNSettings.from_user(str, **settings)
        self.num_features = num_features
        self.kernel = self._settings.kernel

        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        m = self.buffer_size
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.register_buffer("chi_buffer", torch.zeros(m, num_features))
        self.register_buffer("psi_buffer", torch.zeros(m, num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("skipped_forward_stats", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped_backward_stats", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_renorm", torch.ones(num_features), persistent=False)
        self._register_constants(torch.float32, torch.device("cpu"))

    def _register_constants(self, dtype: torch.dtype, device: torch.device) -> None:
        """The tensors a training step reads besides its state, as non-persistent buffers of the
        statistics' dtype: built from the settings here and whenever the module moves or changes
        dtype, never during a step."""
        c, m, clip = self.num_features, self.buffer_size, self.renorm_clip
        f = dict(dtype=dtype, device=device)
        self.register_buffer("_zero", torch.zeros(c, **f), persistent=False)
        self.register_buffer("_one", torch.ones(c, **f), persistent=False)
        self.register_buffer("_ring_weights", torch.full((m,), 1.0 / m, **f), persistent=False)
        # Row k: the limits of `record` when step t has t mod m = k.
        limits = torch.zeros(m, m, **f).fill_diagonal_(torch.finfo(dtype).max)
        self.register_buffer("_slot_limits", limits, persistent=False)
        # The rings' means are used once t > max(m, warmup_iters − 1); r ≠ 1 once
        # t > max(renorm_warmup_iters, warmup_iters).
        ends = [max(m, self.warmup_iters - 1), max(self.renorm_warmup_iters, self.warmup_iters)]
        self.register_buffer("_phase_ends", torch.tensor(ends, device=device), persistent=False)
        # The clip bounds of r in rows 1-2, after a row of ones: (1, 1) before renormalisation
        # starts, (1/clip, clip) after.
        bounds = torch.ones(2, 3, c, **f)
        bounds[1, 1], bounds[1, 2] = 1.0 / clip, clip
        self.register_buffer("_renorm_bounds", bounds, persistent=False)
        # Zero between launches of the Triton path, which therefore never allocates them (inside
        # a CUDA-graph capture, say).
        self.register_buffer("_triton_tickets", torch.zeros(
            triton_ticket_shape(c), dtype=torch.int32, device=device), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # Rebuilt rather than converted, so that 1/m and 1/clip are exact in a wider dtype.
        self._register_constants(self.running_var.dtype, self.running_var.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (N, C, H, W). Returns: (N, C, H, W), x's dtype."""
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(
                f"MABN2d expects input of shape (N, {self.num_features}, H, W), "
                f"got {tuple(x.shape)}"
            )
        if not self.training:
            return F.batch_norm(x, self._zero, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        if x.numel() == 0:
            # An empty batch (a mask head with no foreground RoIs) holds no statistics.
            return (x * self.weight.view(1, -1, 1, 1).to(x.dtype)
                    + self.bias.view(1, -1, 1, 1).to(x.dtype))
        if self._uses_triton(x):
            from . import mabn_triton  # imports Triton: only when the Triton path runs

            return mabn_triton.mabn_train_step(self, x)
        return self._train_forward(x)

    @property
    def kernel(self) -> str:
        """"auto" | "triton" | "torch": see the class docstring. May be changed at any time."""
        return self._kernel

    @kernel.setter
    def kernel(self, value: str) -> None:
        self._kernel = MABNSettings(kernel=value).kernel

    def _uses_triton(self, x: torch.Tensor) -> bool:
        """Whether this training step runs the Triton kernels (decided from metadata alone)."""
        if self._kernel == "torch" or (self._kernel == "auto" and not _AUTO_PICKS_TRITON):
            return False
        if x.device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") != "1":
                return False  # a CPU tensor must never reach a compiled kernel
        elif x.device.type != "cuda":
            return False
        from . import mabn_triton

        return mabn_triton.supports(self, x)

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.iteration.add_(1)
        limits = self._slot_limits.index_select(0, torch.remainder(t, self.buffer_size).view(1))
        limits = limits.view(-1, 1)
        averaged, renorm_on = torch.gt(t, self._phase_ends)
        stats_x = x.detach()
        sum_sq, _ = channel_sums(stats_x, stats_x, self._one, self._one, self._zero, False)
        chi = torch.add(self._zero, sum_sq, alpha=self.num_features / x.numel())
        chi_mean = record(self.chi_buffer, chi, chi, limits, self.skipped_forward_stats,
                          self._ring_weights)
        var = torch.where(averaged, chi_mean, chi)
        # Rows 1/σ, lo/σ, hi/σ (σ = √(s²+ε), (lo, hi) the bounds of r) as eval-mode batch norm
        # of the bounds' rows with variance s²; then r/σ = clip(1/√(running_var+ε), lo/σ, hi/σ),
        # which is 1/σ until renormalisation starts.
        bounds = torch.where(renorm_on, self._renorm_bounds[1], self._renorm_bounds[0])
        inv_std, low, high = F.batch_norm(bounds, self._zero, var, None, None, False, 0.0,
                                          self.eps)
        inv_running_std = F.batch_norm(self._one.view(1, -1), self._zero, self.running_var, None,
                                       None, False, 0.0, self.eps)[0]
        s = torch.clamp(inv_running_std, low, high)
        torch.div(s, inv_std, out=self.last_renorm)
        # 1/σ > 0 exactly when s² is finite: a non-finite s² leaves running_var as it is.
        updated = torch.lerp(self.running_var, var, self.momentum)
        torch.where(torch.gt(inv_std, self._zero), updated, self.running_var,
                    out=self.running_var)
        step = _Step(self, limits, averaged)
        return _MABNFunction.apply(x, self.weight, self.bias, s, inv_std, var, step)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        name = prefix.rstrip(".") or "MABN2d"
        version = local_metadata.get("version")
        if version is not None and version > self._version:
            error_msgs.append(
                f"{name}: checkpoint holds MABN2d state of version {version}, written by a newer "
                f"mabn_det; this one reads versions up to {self._version}"
            )
            return
        ring = state_dict.get(prefix + "chi_buffer")
        if ring is not None and ring.shape[0] != self.buffer_size:
            error_msgs.append(
                f"{name}: checkpoint has MABN buffer_size {ring.shape[0]}, this module has "
                f"buffer_size {self.buffer_size}; build the model with the checkpoint's size"
            )
            return
        if prefix + "iteration" in state_dict and ring is None:
            # Detectron2's checkpointer drops tensors whose shape differs before loading; a step
            # counter without its rings would average zeros after the warm-up.
            error_msgs.append(
                f"{name}: checkpoint has an MABN step counter but no {prefix}chi_buffer "
                f"(was it saved with a buffer_size other than {self.buffer_size}?)"
            )
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, buffer_size={self.buffer_size}, "
                f"warmup_iters={self.warmup_iters}, "
                f"renorm_warmup_iters={self.renorm_warmup_iters}, renorm_clip={self.renorm_clip}, "
                f"momentum={self.momentum}, eps={self.eps}"
                + (f", kernel={self.kernel!r}" if self.kernel != "auto" else ""))
