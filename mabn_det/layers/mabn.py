"""Moving Average Batch Normalization (Yan et al., ICLR 2020, arXiv 2001.06838).

MABN normalises by the second moment χ = mean(x²) (no mean subtraction: the conv before it is
weight-centred) and replaces both the forward statistic χ and the backward statistic ψ = mean(g·ẑ) by
simple moving averages over the last ``buffer_size`` steps. With ``buffer_size = m`` and 2 images per
GPU the layer sees the statistics of 2·m images, which is what makes small-batch training stable.

Everything is computed with tensor ops on the layer's own buffers: no `.item()`, no Python branch on a
tensor value, so a training step never waits for the device.
"""
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


def channel_sums(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel Σ a·b and Σ a over (N, H, W), accumulated in float32 (float64 for float64 inputs).

    Batch norm's backward reduction computes exactly these two sums in one fused pass over memory,
    in either memory format, accumulating half-precision inputs in float32 so that fp16 values near
    6e4 do not overflow; with mean 0 and inverse std 1 it returns them unchanged.

    Args:
        a, b: tensors of shape (N, C, H, W) and the same dtype.

    Returns:
        Two tensors of shape (C,).
    """
    acc_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    ones = torch.ones(a.shape[1], dtype=acc_dtype, device=a.device)
    zeros = torch.zeros_like(ones)
    _, sum_ab, sum_a = torch.ops.aten.native_batch_norm_backward(
        a, b, ones, None, None, zeros, ones, True, 0.0, [False, True, True]
    )
    return sum_ab, sum_a


def _as_channel_map(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def record_finite_(ring: torch.Tensor, slot: torch.Tensor, value: torch.Tensor,
                   skip_counter: torch.Tensor) -> None:
    """Write `value` into row `slot` of `ring`, keeping the old entry of every non-finite channel.

    Args:
        ring: (m, C) buffer, updated in place.
        slot: (1,) int64 row index.
        value: (C,) new statistic.
        skip_counter: () int64, incremented in place when any channel of `value` is not finite.
    """
    finite = torch.isfinite(value)
    kept = torch.where(finite, value.to(ring.dtype), ring.index_select(0, slot)[0])
    ring.index_copy_(0, slot, kept.unsqueeze(0))
    skip_counter.add_(~finite.all())


class _StepState(NamedTuple):
    """What one training step's backward needs besides x, γ and the forward statistics."""

    use_batch_stats: torch.Tensor  # () bool: ψ of this batch instead of the ring's mean
    slot: torch.Tensor  # (1,) int64: this step's row of the rings
    psi_buffer: torch.Tensor  # (m, C) backward ring, written in place
    skip_counter: torch.Tensor  # () int64, incremented when ψ is not finite
    zero_mean: torch.Tensor  # (C,) zeros in the statistics' dtype
    eps: float


class _MABNFunction(torch.autograd.Function):
    """y = γ·r·x/√(s²+ε) + β with MABN's averaged backward.

    The forward statistics (s², r) are inputs computed by the module; the backward computes ψ,
    records it in the backward ring and uses the ring's average once the warm-up is over.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, var, renorm, state: _StepState):
        # Eval-mode batch norm with mean 0 and variance s² is the affine map γ·r·x/√(s²+ε) + β in a
        # single fused pass that keeps x's dtype and memory format.
        y = F.batch_norm(x, state.zero_mean, var, weight * renorm, bias, False, 0.0, state.eps)
        ctx.save_for_backward(x, weight, var, renorm)
        # The ring and counter are module buffers written by the backward: kept by reference,
        # outside autograd's saved-tensor version checks.
        ctx.state = state
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, var, renorm = ctx.saved_tensors
        state = ctx.state
        sum_dy_x, sum_dy = channel_sums(grad_out, x)
        inv_std = torch.rsqrt(var + state.eps)
        grad_scale = weight * renorm * inv_std  # dy → g/σ
        # ψ = mean(g·ẑ) = γ·r/σ · mean(dy·x)
        psi = grad_scale * sum_dy_x / (x.numel() // x.shape[1])
        record_finite_(state.psi_buffer, state.slot, psi, state.skip_counter)
        psi_bar = torch.where(state.use_batch_stats, psi, state.psi_buffer.mean(0))
        # dx = (g − ẑ·ψ̄)/σ = (γ·r/σ)·dy − (ψ̄/σ²)·x
        grad_x = grad_out * _as_channel_map(grad_scale).to(grad_out.dtype)
        grad_x.addcmul_(x, _as_channel_map(psi_bar * inv_std * inv_std).to(x.dtype), value=-1)
        grad_weight = renorm * inv_std * sum_dy_x
        return grad_x, grad_weight.to(weight.dtype), sum_dy.to(weight.dtype), None, None, None


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

    Args:
        num_features: C, the number of channels.
        **settings: the fields of `MABNSettings` (buffer_size, warmup_iters, renorm_warmup_iters,
            renorm_clip, momentum, eps, kernel); those not given take its defaults, the paper's
            detection settings. ``kernel`` chooses how a training step is computed:

            - ``"torch"``: PyTorch ops (65 per layer-step); the reference implementation, and
              the only one for CPU tensors.
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

    def __init__(self, num_features: int, **settings):
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be ≥ 1, got {num_features!r}")
        checked = MABNSettings.from_user(str, **settings)
        self.num_features = num_features
        self.buffer_size = checked.buffer_size
        self.warmup_iters = checked.warmup_iters
        self.renorm_warmup_iters = checked.renorm_warmup_iters
        self.renorm_clip = checked.renorm_clip
        self.momentum = checked.momentum
        self.eps = checked.eps
        self.kernel = checked.kernel

        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.register_buffer("chi_buffer", torch.zeros(self.buffer_size, num_features))
        self.register_buffer("psi_buffer", torch.zeros(self.buffer_size, num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("skipped_forward_stats", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped_backward_stats", torch.zeros((), dtype=torch.long))
        self.register_buffer("_zero_mean", torch.zeros(num_features), persistent=False)
        # The last training step's r, (C,), kept by reference for diagnostics; not state.
        self.last_renorm: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (N, C, H, W). Returns: (N, C, H, W), x's dtype."""
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(
                f"MABN2d expects input of shape (N, {self.num_features}, H, W), "
                f"got {tuple(x.shape)}"
            )
        if not self.training:
            return F.batch_norm(x, self._zero_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        if x.numel() == 0:
            # An empty batch (a mask head with no foreground RoIs) holds no statistics.
            return (x * _as_channel_map(self.weight).to(x.dtype)
                    + _as_channel_map(self.bias).to(x.dtype))
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
        self.iteration.add_(1)
        t = self.iteration
        slot = torch.remainder(t, self.buffer_size).view(1)
        stats_x = x.detach()
        sum_sq, _ = channel_sums(stats_x, stats_x)
        chi = sum_sq / (x.numel() // self.num_features)
        record_finite_(self.chi_buffer, slot, chi, self.skipped_forward_stats)

        use_batch_stats = (t <= self.buffer_size) | (t < self.warmup_iters)
        var = torch.where(use_batch_stats, chi, self.chi_buffer.mean(0).to(chi.dtype))
        running_var = self.running_var.to(var.dtype)
        ratio = torch.sqrt((var + self.eps) / (running_var + self.eps))
        renorm_started = t > max(self.renorm_warmup_iters, self.warmup_iters)
        renorm = torch.where(
            renorm_started, ratio.clamp(1.0 / self.renorm_clip, self.renorm_clip), 1.0
        )
        updated = torch.where(torch.isfinite(var), running_var.lerp(var, self.momentum),
                              running_var)
        self.running_var.copy_(updated)
        self.last_renorm = renorm

        state = _StepState(use_batch_stats, slot, self.psi_buffer, self.skipped_backward_stats,
                           self._zero_mean.to(var.dtype), self.eps)
        return _MABNFunction.apply(x, self.weight, self.bias, var, renorm, state)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        ring = state_dict.get(prefix + "chi_buffer")
        if ring is not None and ring.shape[0] != self.buffer_size:
            error_msgs.append(
                f"{prefix.rstrip('.')}: checkpoint has MABN buffer_size {ring.shape[0]}, this module has "
                f"buffer_size {self.buffer_size}; build the model with the checkpoint's size"
            )
            return
        if prefix + "iteration" in state_dict and ring is None:
            # Detectron2's checkpointer drops tensors whose shape differs before loading; a step
            # counter without its rings would average zeros after the warm-up.
            error_msgs.append(
                f"{prefix.rstrip('.')}: checkpoint has an MABN step counter but no {prefix}chi_buffer "
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
