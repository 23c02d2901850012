"""Ahead-of-time compilation of the MABN Triton kernels for sm_90 (H100/H200), without a GPU.

Used by tests/layers/test_mabn_triton.py; also a script that prints registers and spills:

    python tests/layers/mabn_triton_aot.py          # the variants the test compiles
    python tests/layers/mabn_triton_aot.py --all    # every variant the benchmark shapes launch

ptxas (bundled with Triton) reports registers and spills; the interpreter checks none of this,
and it accepts some type errors that the compiler rejects.
"""
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, NamedTuple, Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget

from mabn_det.layers import mabn_triton

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_DATA_POINTERS = ("x_ptr", "y_ptr", "dy_ptr", "dx_ptr")
_INT64_POINTERS = ("iter_ptr", "step_ptr", "skip_ptr")
_FLOAT_SCALARS = ("count", "eps", "momentum", "clip")
_SIZE_ARGS = ("N", "C", "HW", "R", "NC")
# Mask R-CNN R50-FPN, 2 images of 800×1216 (benchmarks/bench_layers.py), plus the stem.
BENCH_SHAPES = {"stem": (2, 64, 400, 608), "res2": (2, 256, 200, 336), "res3": (2, 512, 100, 168),
                "res4": (2, 1024, 50, 84), "res5": (2, 2048, 25, 42),
                "box head": (1024, 256, 7, 7), "mask head": (128, 256, 14, 14)}
H100_PROGRAMS = 4 * 132


class Variant(NamedTuple):
    kernel: str  # key of mabn_triton.KERNELS
    dtype: torch.dtype
    constexprs: Tuple[Tuple[str, int], ...]
    aligned: bool  # pointers 16-byte aligned and sizes multiples of 16 (Triton's specialisation)

    @property
    def label(self) -> str:
        blocks = ",".join(f"{k[6:]}={v}" for k, v in self.constexprs)
        return (f"{self.kernel}[{_TRITON_DTYPES[self.dtype]}, {blocks}"
                f"{', aligned' if self.aligned else ''}]")


class Compiled(NamedTuple):
    registers: int
    spill_bytes: int  # stores + loads
    vector_loads: int  # ld.global.v4 / .v2 in the PTX


def _signature(fn, dtype: torch.dtype, aligned: bool):
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name.startswith("BLOCK_"):
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            if name in _DATA_POINTERS:
                signature[name] = "*" + _TRITON_DTYPES[dtype]
            elif name in _INT64_POINTERS:
                signature[name] = "*i64"
            elif name == "ticket_ptr":
                signature[name] = "*i32"
            else:
                signature[name] = "*fp32"
            if aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if aligned and name in _SIZE_ARGS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def compile_variant(variant: Variant) -> Compiled:
    fn = mabn_triton.KERNELS[variant.kernel]
    signature, attrs = _signature(fn, variant.dtype, variant.aligned)
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=dict(variant.constexprs),
                                    attrs=attrs)
    options = mabn_triton.launch_options(variant.kernel)
    compiled = triton.compile(src, target=TARGET, options=options)
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        # The flags Triton's own NVIDIA backend passes (register allocation differs without them).
        result = subprocess.run([PTXAS, "-lineinfo", "-v", "--regAllocOptLevel=2",
                                 "--gpu-name=sm_90a", path, "-o", path + ".cubin"],
                                capture_output=True, text=True, check=True)
    registers = int(re.search(r"Used (\d+) registers", result.stderr).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    return Compiled(registers, int(spills.group(1)) + int(spills.group(2)),
                    len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]\.", ptx)))


def plan_variants(shape, channels_last: bool, dtype: torch.dtype,
                  buffer_size: int = 16) -> List[Variant]:
    """The four kernels one training step launches for this input, as the JIT would specialise
    them (up to Triton's other specialisations, e.g. of integer arguments equal to 1)."""
    plan = mabn_triton.Plan(shape, channels_last, buffer_size, H100_PROGRAMS)
    n, c, h, w = shape
    aligned = c % 16 == 0 if channels_last else (h * w) % 16 == 0
    layout = "nhwc" if channels_last else "nchw"
    reduce = tuple(sorted({**plan.reduce_blocks, **plan.update_blocks}.items()))
    elementwise = tuple(sorted(plan.elementwise_blocks.items()))
    return [Variant(f"fwd_reduce_{layout}", dtype, reduce, aligned),
            Variant(f"affine_{layout}", dtype, elementwise, aligned),
            Variant(f"bwd_reduce_{layout}", dtype, reduce, aligned),
            Variant(f"dx_{layout}", dtype, elementwise, aligned)]


def checked_variants() -> List[Variant]:
    """Each kernel at its largest tiles (the most registers) in float32 and bfloat16 (float16
    compiles to the same code as bfloat16 but for the conversions; `--all` includes it), plus
    the H·W = 49 NCHW tiles of the box head, where loads cannot be vectorised."""
    variants = []
    for dtype in (torch.float32, torch.bfloat16):
        variants += plan_variants(BENCH_SHAPES["res2"], False, dtype)
        variants += plan_variants(BENCH_SHAPES["res2"], True, dtype)
    variants += plan_variants(BENCH_SHAPES["box head"], False, torch.bfloat16)
    return variants


def all_bench_variants() -> List[Variant]:
    unique: Dict[Variant, None] = {}
    for shape in BENCH_SHAPES.values():
        for channels_last in (False, True):
            for dtype in _TRITON_DTYPES:
                for v in plan_variants(shape, channels_last, dtype):
                    unique[v] = None
    return list(unique)


def main() -> None:
    variants = all_bench_variants() if "--all" in sys.argv else checked_variants()
    print(f"Triton {triton.__version__}, sm_90a, reductions {mabn_triton.REDUCE_OPTIONS}, "
          f"element-wise {mabn_triton.ELEMENTWISE_OPTIONS}\n")
    print("| kernel variant | registers | spill bytes | vector loads |\n|---|---|---|---|")
    for v in variants:
        r = compile_variant(v)
        print(f"| {v.label} | {r.registers} | {r.spill_bytes} | {r.vector_loads} |")


if __name__ == "__main__":
    main()
