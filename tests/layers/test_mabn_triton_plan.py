"""The launch plan of the MABN Triton kernels at production shapes, checked in pure Python.

The interpreted tests run the kernels on tiny inputs; here the grids and tiles that `Plan` chooses
for Mask R-CNN R50-FPN (the 64- and 128-channel convs inside res2 and res3, res2-res5, box and
mask heads; 1 and 2 images; NCHW and NHWC) are walked program by program, mirroring the kernels'
index arithmetic: every element must be read by exactly one program of each kernel, and every
offset the kernels compute, masked lanes included, must fit an int32. The reductions' owner paths
are checked too: the single-split variant exactly when a tile has one program, and a short
combine otherwise. Run with -s to see each plan's waves, lane use and combine passes.
"""
import numpy as np
import pytest

triton = pytest.importorskip("triton")

from mabn_det.layers import mabn_triton  # noqa: E402

H100_PROGRAMS = 4 * 132  # what the plan targets on an H100/H200 (4 programs per SM)
BUFFER_SIZE = 16
INT32_LIMIT = 2**31
# Passes of a tile owner's combine over the S partial sums (BLOCK_S rows each): at most 17, at 64
# channels in NHWC (one channel tile, 528 splits).
MAX_COMBINE_PASSES = 17


def production_shapes(images: int):
    """R50-FPN at 800×1216 for `images` images; the heads see 512 RoIs and 64 detections each."""
    return {"res2 conv1-2": (images, 64, 200, 336), "res3 conv1-2": (images, 128, 100, 168),
            "res2": (images, 256, 200, 336), "res3": (images, 512, 100, 168),
            "res4": (images, 1024, 50, 84), "res5": (images, 2048, 25, 42),
            "box head": (512 * images, 256, 7, 7), "mask head": (64 * images, 256, 14, 14)}


class Walk:
    """Coverage counts of one kernel's programs over a tensor, the largest offset they compute
    and the lanes they spend (in bounds or not)."""

    def __init__(self, shape):
        self.counts = np.zeros(shape, dtype=np.uint8)
        self.max_offset = 0
        self.lanes = 0

    def visit(self, index, lanes: int, max_offset: int) -> None:
        self.counts[index] += 1
        self.lanes += lanes
        self.max_offset = max(self.max_offset, max_offset)

    def problems(self, name: str):
        out = []
        if not (self.counts == 1).all():
            out.append(f"{name}: {int((self.counts == 0).sum())} elements never read, "
                       f"{int((self.counts > 1).sum())} read more than once")
        if self.max_offset >= INT32_LIMIT:
            out.append(f"{name}: an offset reaches {self.max_offset} ≥ 2³¹")
        return out


def _span(block: int, start: int, size: int):
    """The in-bounds slice of a block of `block` indices from `start`, and its last index."""
    return slice(start, min(start + block, size)), start + block - 1


def walk_reduction(plan: mabn_triton.Plan, shape) -> Walk:
    """K1/K3: program (tile, split) visits its tiles split, split + S, ... ."""
    n, c, h, w = shape
    hw = h * w
    splits = plan.splits  # S, the kernels' argument; the grid has reduce_grid[1] split programs
    if plan.channels_last:
        rows, b = n * hw, plan.reduce_blocks
        walk = Walk((rows, c))
        row_tiles = triton.cdiv(rows, b["BLOCK_R"])
        for ct in range(plan.reduce_grid[0]):
            cs, c_last = _span(b["BLOCK_CT"], ct * b["BLOCK_CT"], c)
            for split in range(plan.reduce_grid[1]):
                for tile in range(split, row_tiles, splits):
                    rs, r_last = _span(b["BLOCK_R"], tile * b["BLOCK_R"], rows)
                    walk.visit((rs, cs), b["BLOCK_R"] * b["BLOCK_CT"], r_last * c + c_last)
        return walk
    b = plan.reduce_blocks
    assert plan.reduce_grid[0] == c  # program_id(0) is the channel: each channel once
    walk = Walk((n, c, hw))
    hw_blocks = triton.cdiv(hw, b["BLOCK_HW"])
    tiles = triton.cdiv(n, b["BLOCK_N"]) * hw_blocks
    for split in range(plan.reduce_grid[1]):
        for tile in range(split, tiles, splits):
            nb, hb = divmod(tile, hw_blocks)
            ns, n_last = _span(b["BLOCK_N"], nb * b["BLOCK_N"], n)
            hs, hw_last = _span(b["BLOCK_HW"], hb * b["BLOCK_HW"], hw)
            # Every channel's program visits this tile: C programs in one visit.
            walk.visit((ns, slice(None), hs), c * b["BLOCK_N"] * b["BLOCK_HW"],
                       (n_last * c + c - 1) * hw + hw_last)
    return walk


def walk_elementwise(plan: mabn_triton.Plan, shape) -> Walk:
    """K2/K4: a 1-D grid of row blocks × column blocks."""
    n, c, h, w = shape
    hw = h * w
    b = plan.elementwise_blocks
    if plan.channels_last:
        rows, cols = n * hw, c
        block_rows, block_cols, walk = b["BLOCK_R"], b["BLOCK_CT"], Walk((n * hw, c))
    else:
        rows, cols = n * c, hw
        block_rows, block_cols, walk = b["BLOCK_ROWS"], b["BLOCK_HW"], Walk((n * c, hw))
    col_blocks = triton.cdiv(cols, block_cols)
    for pid in range(plan.elementwise_grid[0]):
        rb, cb = divmod(pid, col_blocks)
        rs, r_last = _span(block_rows, rb * block_rows, rows)
        cs, c_last = _span(block_cols, cb * block_cols, cols)
        walk.visit((rs, cs), block_rows * block_cols, r_last * cols + c_last)
    return walk


@pytest.mark.parametrize("images", [1, 2])
def test_production_plans_cover_every_element_once_within_int32(images):
    problems, report = [], []
    for name, shape in production_shapes(images).items():
        for channels_last in (False, True):
            for element_size in (4, 2):
                plan = mabn_triton.Plan(shape, channels_last, BUFFER_SIZE, H100_PROGRAMS,
                                        element_size)
                label = (f"{name} {shape} {'NHWC' if channels_last else 'NCHW'} "
                         f"{8 * element_size}-bit")
                reduction, elementwise = walk_reduction(plan, shape), walk_elementwise(plan, shape)
                problems += reduction.problems(f"{label} reduction")
                problems += elementwise.problems(f"{label} element-wise")
                numel = int(np.prod(shape))
                reduce_programs = plan.reduce_grid[0] * plan.reduce_grid[1]
                passes = triton.cdiv(plan.splits, plan.reduce_blocks["BLOCK_S"])
                single = plan.reduce_blocks["SINGLE_SPLIT"]
                report.append(
                    f"{label}: reduction {plan.reduce_grid} = "
                    f"{reduce_programs / H100_PROGRAMS:.2f} waves, lane use "
                    f"{numel / reduction.lanes:.0%}, "
                    f"{'one split' if single else f'combine in {passes} passes'}; "
                    f"element-wise {plan.elementwise_grid[0]} "
                    f"programs = {plan.elementwise_grid[0] / H100_PROGRAMS:.1f} waves, lane use "
                    f"{numel / elementwise.lanes:.0%}; row align {plan.row_align}")
                if single != (plan.splits == 1) or plan.reduce_grid[1] != plan.splits:
                    problems.append(f"{label}: SINGLE_SPLIT {single} with {plan.splits} splits")
                if passes > MAX_COMBINE_PASSES:
                    problems.append(f"{label}: the combine takes {passes} passes")
                # The plan never leaves a partly filled second wave of reduction programs.
                if reduce_programs > H100_PROGRAMS and plan.splits > 1:
                    problems.append(f"{label}: {reduce_programs} reduction programs")
                # The kernels accept what supports() lets through.
                assert numel + mabn_triton.TILE * shape[1] < INT32_LIMIT
    print("\n".join(report))
    assert not problems, "\n".join(problems)
    # Both owner paths occur: one split per channel (res3-res5 NCHW) and a combine.
    assert any("one split" in line for line in report)
    assert any("combine in" in line for line in report)


def test_walk_finds_a_plan_that_misses_elements():
    # The check itself can fail: one element-wise program too few leaves elements unwritten.
    shape = (2, 1024, 50, 84)
    plan = mabn_triton.Plan(shape, False, BUFFER_SIZE, H100_PROGRAMS, 4)
    plan.elementwise_grid = (plan.elementwise_grid[0] - 1,)
    assert walk_elementwise(plan, shape).problems("short grid")
    plan = mabn_triton.Plan(shape, True, BUFFER_SIZE, H100_PROGRAMS, 4)
    plan.reduce_grid = (plan.reduce_grid[0], plan.splits - 1)  # one split short of S
    assert walk_reduction(plan, shape).problems("short split grid")
