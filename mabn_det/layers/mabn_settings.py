"""MABN's hyper-parameters, their defaults and their valid ranges, in one place.

`MABN2d` takes them as keyword arguments, `cfg.MODEL.MABN` holds them as YAML keys
(``buffer_size`` → ``BUFFER_SIZE``), and `mabn_det.lazy.mabn_norm` takes them in a LazyConfig; all
three build an `MABNSettings`, so the defaults and the checks exist once.
"""
import dataclasses
import numbers
from typing import Callable, Mapping

__all__ = ["KERNEL_CHOICES", "MABNSettings"]

# The values of the `kernel` setting (mabn_triton.KERNELS are the Triton kernels themselves).
KERNEL_CHOICES = ("auto", "triton", "torch")


@dataclasses.dataclass(frozen=True)
class MABNSettings:
    """The hyper-parameters of an MABN layer, checked when created.

    The defaults are the paper's detection settings (Yan et al. 2020).

    Attributes:
        buffer_size: m, the number of steps averaged by both moving averages (χ forward, ψ
            backward). With 2 images per GPU, 16 gives statistics over 32 images.
        warmup_iters: steps that normalise with the current batch's χ and ψ before averaging
            starts.
        renorm_warmup_iters: steps before batch renormalisation (r ≠ 1) starts; r = 1 up to
            max(renorm_warmup_iters, warmup_iters).
        renorm_clip: r = √(s²+ε)/√(running_var+ε) is clipped to [1/renorm_clip, renorm_clip].
        momentum: PyTorch convention, running_var ← (1 − momentum)·running_var + momentum·s²
            (the paper's decay 0.98 is momentum 0.02).
        eps: added to the second moment before the square root.
        kernel: how a training step is computed: "torch" (PyTorch ops, the reference), "triton"
            (fused Triton kernels for CUDA tensors) or "auto" (today "torch" everywhere); see
            `MABN2d`.

    Raises:
        TypeError: a value of the wrong type, naming the field.
        ValueError: a value out of range, naming the field, the value and the valid range.
    """

    buffer_size: int = 16
    warmup_iters: int = 100
    renorm_warmup_iters: int = 1000
    renorm_clip: float = 5.0
    momentum: float = 0.02
    eps: float = 1e-5
    kernel: str = "auto"

    def __post_init__(self):
        _check(dataclasses.asdict(self), str)
        for name in ("renorm_clip", "momentum", "eps"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @classmethod
    def from_user(cls, name_of: Callable[[str], str], **values) -> "MABNSettings":
        """`MABNSettings(**values)`, with errors naming each field as the user wrote it.

        Args:
            name_of: maps a field name to the name shown in an error, e.g.
                ``lambda f: f"cfg.MODEL.MABN.{f.upper()}"``.
            **values: fields of MABNSettings; the missing ones take their defaults.
        """
        fields = [field.name for field in dataclasses.fields(cls)]
        for name in values:
            if name not in fields:
                raise TypeError(f"{name_of(name)} is not an MABN setting; they are "
                                f"{', '.join(map(name_of, fields))}")
        _check({**dataclasses.asdict(cls()), **values}, name_of)
        return cls(**values)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check(values: Mapping[str, object], name_of: Callable[[str], str]) -> None:
    """Raise for the first field of `values` that is of the wrong type or out of range."""
    types = {"buffer_size": (_is_int, "an int"), "warmup_iters": (_is_int, "an int"),
             "renorm_warmup_iters": (_is_int, "an int"), "renorm_clip": (_is_real, "a number"),
             "momentum": (_is_real, "a number"), "eps": (_is_real, "a number"),
             "kernel": (lambda v: isinstance(v, str), "a str")}
    for name, (is_type, type_name) in types.items():
        if not is_type(values[name]):
            raise TypeError(f"{name_of(name)} must be {type_name}, got {values[name]!r}")
    v = values
    ranges = [
        ("buffer_size", v["buffer_size"] >= 1, "≥ 1"),
        ("warmup_iters", v["warmup_iters"] >= 0, "≥ 0"),
        ("renorm_warmup_iters", v["renorm_warmup_iters"] >= 0, "≥ 0"),
        ("renorm_clip", v["renorm_clip"] >= 1.0, "≥ 1 (r is clipped to [1/clip, clip])"),
        ("momentum", 0.0 < v["momentum"] <= 1.0, "in (0, 1]"),
        ("eps", v["eps"] > 0.0, "> 0"),
        ("kernel", v["kernel"] in KERNEL_CHOICES, f"one of {', '.join(map(repr, KERNEL_CHOICES))}"),
    ]
    for name, ok, expected in ranges:
        if not ok:
            raise ValueError(f"{name_of(name)} must be {expected}, got {v[name]!r}")
