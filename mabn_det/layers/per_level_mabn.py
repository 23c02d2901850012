"""MABN for a head shared by the feature levels: one set of statistics per level, one γ and β."""
import torch
from detectron2.layers import CycleBatchNormList
from torch import nn

from .mabn import MABN2d

__all__ = ["PerLevelMABN2d"]


class PerLevelMABN2d(nn.Module):
    """L MABN2d layers, one per feature level, sharing γ and β; each call uses the next level's.

    RetinaNet's head runs the same convs on every FPN level in each forward. One MABN2d there would
    take its L calls per step for L steps, so its rings would average statistics of different levels
    (whose scales differ) and its warm-up counters would run L times too fast. Here each level has
    its own MABN2d, with its own χ and ψ rings, ``running_var``, step counter and skip counters,
    while γ and β are the same two Parameters in every level and the convs stay shared: Detectron2's
    `CycleBatchNormList` design for BN. The gradients of γ and β sum over the levels.

    The level is chosen by cycling, as in `CycleBatchNormList`: call ``forward`` a multiple of L
    times per step, in level order (RetinaNetHead does). The per-level layers are ordinary MABN2d
    modules named ``<this>.levels.<level>``, so the diagnostics hook, the optimizer's norm groups
    and `convert_to_inference_form` see each of them.

    Args:
        num_levels: L, the number of feature levels.
        num_features: C, the number of channels.
        **mabn_kwargs: keyword arguments of MABN2d (buffer_size, warmup_iters, ...).
    """

    def __init__(self, num_levels: int, num_features: int, **mabn_kwargs):
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"num_levels must be ≥ 1, got {num_levels!r}")
        self.levels = nn.ModuleList(MABN2d(num_features, **mabn_kwargs) for _ in range(num_levels))
        for level in list(self.levels)[1:]:
            level.weight = self.weight
            level.bias = self.bias
        self._next_level = 0

    @property
    def weight(self) -> nn.Parameter:
        """γ, (C,), shared by all levels."""
        return self.levels[0].weight

    @property
    def bias(self) -> nn.Parameter:
        """β, (C,), shared by all levels."""
        return self.levels[0].bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (N, C, H, W), the features of the next level. Returns: (N, C, H, W)."""
        y = self.levels[self._next_level](x)
        self._next_level = (self._next_level + 1) % len(self.levels)
        return y

    @classmethod
    def replace_cycle_batch_norms(cls, module: nn.Module, **mabn_kwargs) -> nn.Module:
        """Replace, in place, every `CycleBatchNormList` in `module` with a new PerLevelMABN2d of
        the same number of levels and channels (γ = 1, β = 0 and empty statistics, as when built).

        This is how an MABN RetinaNet head is built: Detectron2's RetinaNetHead builds per-level BN
        for NORM "BN", and its subnets hold those norms only as children of an nn.Sequential.

        Returns:
            `module`, for chaining.
        """
        for name, child in module.named_children():
            if isinstance(child, CycleBatchNormList):
                setattr(module, name, cls(len(child), child[0].num_features, **mabn_kwargs))
            else:
                cls.replace_cycle_batch_norms(child, **mabn_kwargs)
        return module

    def extra_repr(self) -> str:
        return f"levels={len(self.levels)}, shared γ and β"
