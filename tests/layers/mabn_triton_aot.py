"""Ahead-of-time compilation of the MABN Triton kernels for sm_90 (H100/H200), without a GPU.

Used by tests/layers/test_mabn_triton.py; also a script that prints, for every variant the
benchmark shapes launch, registers, spills, vector loads and the ticket protocol's check:

    python tests/layers/mabn_triton_aot.py

ptxas (bundled with Triton) reports registers and spills; the interpreter checks none of this,
and it accepts some type errors that the compiler rejects.
"""
import os
import re
import subprocess
import tempfile
from typing import Dict, List, NamedTuple, Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget

from mabn_det.layers import mabn_triton

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_DATA_POINTERS = ("x_ptr", "dy_ptr", "u_ptr", "v_ptr", "out_ptr")
_INT64_POINTERS = ("iter_ptr", "step_ptr", "skip_ptr")
_FLOAT_SCALARS = ("count", "eps", "momentum", "clip")
# Mask R-CNN R50-FPN, 2 images of 800×1216 (benchmarks/bench_layers.py), plus the stem.
BENCH_SHAPES = {"stem": (2, 64, 400, 608), "res2": (2, 256, 200, 336), "res3": (2, 512, 100, 168),
                "res4": (2, 1024, 50, 84), "res5": (2, 2048, 25, 42),
                "box head": (1024, 256, 7, 7), "mask head": (128, 256, 14, 14)}
H100_PROGRAMS = 4 * 132


class Variant(NamedTuple):
    kernel: str  # key of mabn_triton.KERNELS
    dtype: torch.dtype
    constexprs: Tuple[Tuple[str, int], ...]
    # The integer arguments that are multiples of 16, which Triton's launcher specialises on
    # (data pointers are always 16-byte aligned: fresh PyTorch allocations).
    multiples_of_16: Tuple[str, ...]

    @property
    def label(self) -> str:
        blocks = ",".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in self.constexprs)
        aligned = f", 16 | {' '.join(self.multiples_of_16)}" if self.multiples_of_16 else ""
        return f"{self.kernel}[{_TRITON_DTYPES[self.dtype]}, {blocks}{aligned}]"

    @property
    def vectorisable(self) -> bool:
        """Whether the streaming loads can be 128-bit: contiguous runs of 16 bytes."""
        values = dict(self.constexprs)
        if "ROW_ALIGN" in values:  # NCHW: 16 bytes of a row, as H·W / ROW_ALIGN · ROW_ALIGN
            return values["ROW_ALIGN"] * self.dtype.itemsize >= 16 or "HW_Q" in self.multiples_of_16
        return "C" in self.multiples_of_16  # NHWC: rows of C channels


class Compiled(NamedTuple):
    registers: int
    spill_bytes: int  # stores + loads
    vector_loads: int  # ld.global.v4 / .v2 in the PTX
    ptx: str


def _signature(fn, variant: Variant):
    constexprs = dict(variant.constexprs)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            if name in _DATA_POINTERS:
                signature[name] = "*" + _TRITON_DTYPES[variant.dtype]
            elif name in _INT64_POINTERS:
                signature[name] = "*i64"
            elif name == "ticket_ptr":
                signature[name] = "*i32"
            else:
                signature[name] = "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in variant.multiples_of_16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def compile_variant(variant: Variant) -> Compiled:
    fn = mabn_triton.KERNELS[variant.kernel]
    signature, attrs = _signature(fn, variant)
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
                    len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]\.", ptx)), ptx)


# PTX instructions the ticket protocol rests on (see mabn_triton's docstring).
_BARRIER = re.compile(r"^\s*(?:@%p\d+\s+)?(?:bar|barrier)\.sync\b")
_TICKET = re.compile(r"\batom\.(?:[\w]+\.)*acq_rel\.(?:[\w]+\.)*add\.[us]32\b")
_RESET = re.compile(r"\batom\.(?:[\w]+\.)*exch\.b32\b")
_RELAXED = re.compile(r"\.relaxed\.")
_ANY_ATOMIC = re.compile(r"\b(?:atom|red)\.")
_COMBINE_LOAD = re.compile(r"\bld\.global\.cg\.")
_GLOBAL_ACCESS = re.compile(r"\b(?:ld|st)\.global\.")


def protocol_problems(variant: Variant, ptx: str) -> List[str]:
    """What the PTX of a kernel lacks of the ticket protocol; [] when nothing.

    A reduction takes the layer's ticket in each tile's owner and, with several splits
    (SINGLE_SPLIT False), its channel tile's ticket before: each an acquire-release integer add
    by a single (predicated) thread, preceded by a block barrier with no global memory access
    between them. With several splits it reads the partial sums of other programs with .cg loads
    (L2, not a stale L1 line), after a barrier that follows the tile's ticket (which is broadcast
    through shared memory); with one split it reads none. It puts every ticket back to 0 with a
    relaxed atomic exchange. No other atomics: no float atomics anywhere. The element-wise kernels
    have none.
    """
    lines = [line.split("//")[0] for line in ptx.splitlines()]
    atomics = [i for i, line in enumerate(lines) if _ANY_ATOMIC.search(line)]
    tickets = [i for i in atomics if _TICKET.search(lines[i])]
    resets = [i for i in atomics if _RESET.search(lines[i])]
    if "reduce" not in variant.kernel:
        return [f"{len(atomics)} atomics in an element-wise kernel"] if atomics else []
    single = dict(variant.constexprs)["SINGLE_SPLIT"]
    expected = 1 if single else 2
    problems = []
    if len(tickets) != expected or len(resets) != expected or len(atomics) != 2 * expected:
        others = len(atomics) - len(tickets) - len(resets)
        problems.append(f"expected {expected} acq_rel ticket adds, {expected} exchanges and "
                        f"nothing else, found {len(tickets)}, {len(resets)} and {others}")
    for i in tickets:
        # A scalar atomic runs in one thread (a predicate on the thread index), whose result the
        # others read from shared memory; unpredicated, every thread would draw a ticket.
        if not re.match(r"\s*@%p\d+\s", lines[i]):
            problems.append(f"the ticket at PTX line {i + 1} is not drawn by a single thread")
        before = next((j for j in range(i - 1, -1, -1)
                       if _BARRIER.search(lines[j]) or _GLOBAL_ACCESS.search(lines[j])), None)
        if before is None or not _BARRIER.search(lines[before]):
            problems.append(f"no block barrier between the last global access and the ticket "
                            f"at PTX line {i + 1}")
    problems += [f"the reset at PTX line {i + 1} is not relaxed" for i in resets
                 if not _RELAXED.search(lines[i])]
    combine = [i for i, line in enumerate(lines) if _COMBINE_LOAD.search(line)]
    if single:
        if combine:
            problems.append("a single-split kernel reads partial sums")
    elif not combine:
        problems.append("no .cg load of the partial sums")
    elif not tickets or combine[0] < tickets[0] or not any(
            _BARRIER.search(line) for line in lines[tickets[0]:combine[0]]):
        problems.append("the partial sums are not read after the tile's ticket and a barrier")
    if resets and tickets and min(resets) < tickets[0]:
        problems.append("a ticket is reset before any ticket is taken")
    return problems


def plan_variants(shape, channels_last: bool, dtype: torch.dtype,
                  buffer_size: int = 16) -> List[Variant]:
    """The four launches of one training step for this input, as the JIT would specialise them
    (up to Triton's other specialisations, e.g. of integer arguments equal to 1)."""
    plan = mabn_triton.Plan(shape, channels_last, buffer_size, H100_PROGRAMS, dtype.itemsize)
    n, c, h, w = shape
    if channels_last:
        layout, sizes = "nhwc", dict(R=n * h * w, C=c)
    else:
        layout, sizes = "nchw", dict(N=n, C=c, HW_Q=h * w // plan.row_align, NC=n * c)
    aligned = tuple(k for k, v in sizes.items() if v % 16 == 0)
    reduce = tuple(sorted(plan.reduce_blocks.items()))
    elementwise = tuple(sorted(plan.elementwise_blocks.items()))
    return [Variant(f"fwd_reduce_{layout}", dtype, reduce, aligned),
            Variant(f"scale_add_{layout}", dtype, elementwise + (("HAS_V", False),), aligned),
            Variant(f"bwd_reduce_{layout}", dtype, reduce, aligned),
            Variant(f"scale_add_{layout}", dtype, elementwise + (("HAS_V", True),), aligned)]


def all_bench_variants() -> List[Variant]:
    """Every variant the benchmark shapes launch: each shape, both layouts, every dtype."""
    unique: Dict[Variant, None] = {}
    for shape in BENCH_SHAPES.values():
        for channels_last in (False, True):
            for dtype in _TRITON_DTYPES:
                for v in plan_variants(shape, channels_last, dtype):
                    unique[v] = None
    return list(unique)


def main() -> None:
    print(f"Triton {triton.__version__}, sm_90a, reductions {mabn_triton.REDUCE_OPTIONS}, "
          f"element-wise {mabn_triton.ELEMENTWISE_OPTIONS}\n")
    print("| kernel variant | registers | spill bytes | vector loads | protocol |\n"
          "|---|---|---|---|---|")
    for v in all_bench_variants():
        r = compile_variant(v)
        problems = "; ".join(protocol_problems(v, r.ptx)) or "ok"
        print(f"| {v.label} | {r.registers} | {r.spill_bytes} | {r.vector_loads} | {problems} |")


if __name__ == "__main__":
    main()
