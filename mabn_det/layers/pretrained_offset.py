"""What a weight-centred conv adds back to compute a loaded, uncentred conv exactly, fading to zero.

A conv converted from a BatchNorm checkpoint (`mabn_det.bn_checkpoint`) cannot hold the loaded
filters as they are: CentredConv2d subtracts each filter's mean m in its forward, which changes its
output by −m·(sum of the input over the kernel window). The offset adds m back, and the BN mean μ as
a bias −μ, so the converted model computes what the BN model did; both then fade linearly to zero
during fine-tuning, after which the conv is a plain CentredConv2d feeding MABN again.
"""
import torch
from torch import nn

__all__ = ["PretrainedOffset"]


class PretrainedOffset(nn.Module):
    """The per-filter mean and bias that a CentredConv2d adds to its centred weight, scaled by α.

    With t the training forwards done so far (this one excluded) and T = ``fade_iters``::

        α = max(0, 1 − t/T)
        conv(x) = conv2d(x, W − mean(W) + α·filter_mean, b + α·bias)

    So the first training forward and every evaluation before fine-tuning compute the loaded conv
    exactly (α = 1), and from forward T on the conv is centred with no added bias (α = 0). t counts
    training forwards, as MABN2d's warm-ups do (with gradient accumulation, micro-batches); eval
    forwards leave it alone. Every quantity is a buffer, so checkpoints carry the fade and a
    resumed run continues it exactly; none is a parameter: Detectron2's trainers build the
    optimizer before they load weights, so nothing created while loading could be trained.

    Buffers:
        filter_mean: (C_out, 1, 1, 1), m: each loaded filter's mean.
        bias: (C_out,), the loaded BN's −running_mean (the conv had no bias of its own).
        iteration: () int64, t.
        fade_iters: () int64, T ≥ 1.

    Args:
        out_channels: C_out of the conv it belongs to; the buffers start at zero (α·0 adds nothing),
            to be filled by `load_state_dict` or `fill_`.
    """

    def __init__(self, out_channels: int):
        super().__init__()
        self.register_buffer("filter_mean", torch.zeros(out_channels, 1, 1, 1))
        self.register_buffer("bias", torch.zeros(out_channels))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.register_buffer("fade_iters", torch.ones((), dtype=torch.long))

    @torch.no_grad()
    def fill_(self, filter_mean: torch.Tensor, bias: torch.Tensor, fade_iters: int) -> None:
        """Start a fade: α = 1 now, 0 after `fade_iters` training forwards.

        Args:
            filter_mean: (C_out, 1, 1, 1).
            bias: (C_out,).
            fade_iters: T, an int ≥ 1.

        Raises:
            ValueError: naming `fade_iters` when it is not an int ≥ 1.
        """
        if isinstance(fade_iters, bool) or not isinstance(fade_iters, int) or fade_iters < 1:
            raise ValueError(f"fade_iters must be an int ≥ 1, got {fade_iters!r}")
        self.filter_mean.copy_(filter_mean)
        self.bias.copy_(bias)
        self.iteration.zero_()
        self.fade_iters.fill_(fade_iters)

    def scale(self) -> torch.Tensor:
        """Returns: α, a () tensor in the dtype of ``filter_mean``."""
        done = self.iteration.to(self.filter_mean.dtype) / self.fade_iters
        return (1 - done).clamp(min=0)

    def forward(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """Add α·offset to a conv's centred weight and bias; count a training forward.

        Args:
            weight: (C_out, C_in/groups, kh, kw), the centred weight.
            bias: (C_out,) or None, the conv's own bias.

        Returns:
            (weight, bias) to convolve with; bias is never None.
        """
        alpha = self.scale()  # a new tensor: the count below does not change it
        if self.training:
            self.iteration.add_(1)
        weight = weight + alpha * self.filter_mean.to(weight.dtype)
        added = alpha * self.bias.to(weight.dtype)
        return weight, added if bias is None else bias + added

    def extra_repr(self) -> str:
        # Reads two buffers back from the device: repr is not on the training path.
        return (f"{self.bias.numel()}, iteration={int(self.iteration)}, "
                f"fade_iters={int(self.fade_iters)}")
