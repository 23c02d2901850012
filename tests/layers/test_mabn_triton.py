"""The Triton path of MABN2d: exact to the PyTorch path, compiles for sm_90, chosen only when asked.

Without a GPU the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1, in subprocesses:
Triton reads the variable when the kernels are defined) and are compiled ahead of time for sm_90.
"""
import json
import os
import re
import subprocess
import sys
import time
import types

import pytest
import torch

from mabn_det.layers import MABN2d
from mabn_det.layers import mabn as mabn_module

triton = pytest.importorskip("triton")

from tests.layers import mabn_triton_interpreted as interpreted  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


# The interpreter runs on one core: the scenarios are split between this many processes run side
# by side (CI has two cores). Every other scenario of SCENARIOS' order goes to the same process,
# which splits their time about evenly.
SHARDS = 2


@pytest.fixture(scope="module")
def interpreted_report(tmp_path_factory):
    """The report of every scenario, merged from the SHARDS processes'."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    names, logs = list(interpreted.SCENARIOS), tmp_path_factory.mktemp("interpreted")
    start = time.perf_counter()
    processes = []
    for i in range(SHARDS):
        with open(logs / f"{i}.out", "w") as out, open(logs / f"{i}.err", "w") as err:
            processes.append(subprocess.Popen(
                [sys.executable, os.path.join(HERE, "mabn_triton_interpreted.py"),
                 *names[i::SHARDS]], stdout=out, stderr=err, env=env, cwd=REPO))
    try:
        for process in processes:
            process.wait(timeout=600)
    finally:
        for process in processes:
            process.kill()  # one still running after a failure or timeout; no-op otherwise
    report, guard = {}, {"launches": 0, "outside": [], "devices": []}
    for i, process in enumerate(processes):
        assert process.returncode == 0, (logs / f"{i}.err").read_text()[-4000:]
        shard = json.loads((logs / f"{i}.out").read_text().strip().splitlines()[-1])
        for key, value in shard.pop("device_guard").items():
            guard[key] += value
        report.update(shard)
    report["device_guard"] = guard
    print(f"interpreted run: {time.perf_counter() - start:.1f} s")
    return report


@pytest.mark.parametrize("scenario", list(interpreted.SCENARIOS))
def test_interpreted_kernels_match_torch_path(interpreted_report, scenario):
    result = interpreted_report[scenario]
    assert result["failures"] == [], "\n".join(result["failures"])
    # Every non-empty training step went through the kernels (the empty one never launches).
    assert result["triton_steps"] == result["steps"]


@pytest.mark.parametrize("scenario", interpreted.SHUFFLED)
def test_interpreted_kernels_do_not_depend_on_the_programs_order(interpreted_report, scenario):
    # Each launch's programs in a random order (several seeds): the same bits, tickets back at 0.
    shuffled = interpreted_report[scenario]["shuffled"]
    assert shuffled == [], "\n".join(shuffled)


def _scenario_plans():
    """(plan, shape, whether shuffled) of every interpreted scenario, with its own tile sizes."""
    from mabn_det.layers import mabn_triton

    saved = {k: getattr(mabn_triton, k) for k in interpreted.SMALL_TILES}
    plans = []
    try:
        for name, (layout, shape, dtype, tiles) in interpreted.SCENARIOS.items():
            for key, value in {**saved, **tiles}.items():
                setattr(mabn_triton, key, value)
            plan = mabn_triton.Plan(shape, layout == "nhwc", interpreted.LAYER["buffer_size"],
                                    mabn_triton.INTERPRETER_PROGRAMS,
                                    getattr(torch, dtype).itemsize)
            plans.append((plan, shape, name in interpreted.SHUFFLED))
    finally:
        for key, value in saved.items():
            setattr(mabn_triton, key, value)
    return plans


def test_interpreted_scenarios_cover_splits_tiles_and_update_loops():
    # Guards the test's own coverage: several programs per channel tile, several NHWC channel
    # tiles, a combine that accumulates a 2-D tile over several passes, one split per channel
    # tile (shuffled too) in both layouts, loops over the ring in the tiles' updates, segments of
    # NCHW rows with a masked tail, and NCHW rows aligned to more than one element.
    plans = _scenario_plans()
    nchw = [(p, shape) for p, shape, _ in plans if not p.channels_last]
    nhwc = [p for p, _, _ in plans if p.channels_last]
    assert any(p.splits > p.reduce_blocks["BLOCK_S"] > 1 and p.reduce_blocks["BLOCK_CT"] > 1
               for p in nhwc)
    assert any(p.splits > 1 for p, _ in nchw) and any(p.splits > 1 for p in nhwc)
    assert any(p.channel_tiles > 1 and p.splits > 1 for p in nhwc)
    for p, _, _ in plans:
        assert p.reduce_blocks["SINGLE_SPLIT"] == (p.splits == 1)
    assert any(p.splits == 1 for p, _ in nchw) and any(p.splits == 1 for p in nhwc)
    assert any(p.splits == 1 and shuffled for p, _, shuffled in plans)
    assert any(p.reduce_blocks["BLOCK_M"] < interpreted.LAYER["buffer_size"]
               for p, _, _ in plans)
    assert any((shape[2] * shape[3]) % p.reduce_blocks["BLOCK_HW"] for p, shape in nchw)
    assert any(p.row_align > 1 for p, _ in nchw)
    assert set(interpreted.SHUFFLED) <= set(interpreted.SCENARIOS)


def test_interpreted_kernels_launch_under_the_inputs_device(interpreted_report):
    guard = interpreted_report["device_guard"]
    assert guard["launches"] > 0 and guard["outside"] == []
    assert set(guard["devices"]) == {"cpu"}


def test_launch_device_is_the_inputs_cuda_device():
    # Constructing the guard touches no GPU: it names the device that launches will use.
    from mabn_det.layers import mabn_triton

    guard = mabn_triton.launch_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(mabn_triton.launch_device(torch.device("cpu")), torch.cuda.device)


# ------------------------------------------------------------------------------------------
# Ahead-of-time compilation for sm_90.
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def aot():
    module = pytest.importorskip("tests.layers.mabn_triton_aot")
    if not os.path.exists(module.PTXAS):
        pytest.skip(f"no ptxas at {module.PTXAS}")
    return module


def test_every_kernel_variant_compiles_for_sm90_and_keeps_the_ticket_protocol(aot):
    # Every variant that the R50-FPN shapes launch (stem, res2-res5, box and mask heads; NCHW and
    # NHWC; float32, float16, bfloat16; one split per channel tile and several): no spills, 128-bit
    # loads wherever rows allow them, and in the PTX the instructions the ticket protocol needs
    # (aot.protocol_problems).
    failures, table = [], []
    variants = aot.all_bench_variants()
    assert {dict(v.constexprs).get("SINGLE_SPLIT") for v in variants} == {None, False, True}
    for variant in variants:
        compiled = aot.compile_variant(variant)
        table.append(f"{variant.label}: {compiled.registers} registers, "
                     f"{compiled.spill_bytes} spill bytes, {compiled.vector_loads} vector loads")
        if compiled.spill_bytes:
            failures.append(table[-1])
        if variant.vectorisable and compiled.vector_loads == 0:
            failures.append(f"{table[-1]}: expected vectorised loads")
        failures += [f"{variant.label}: {p}" for p in aot.protocol_problems(variant, compiled.ptx)]
    print("\n".join(table))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("single_split", [False, True], ids=["splits", "single-split"])
def test_protocol_check_finds_a_broken_ticket_protocol(aot, single_split):
    variant = next(v for v in aot.all_bench_variants() if "bwd_reduce" in v.kernel
                   and dict(v.constexprs)["SINGLE_SPLIT"] == single_split)
    ptx = aot.compile_variant(variant).ptx
    assert aot.protocol_problems(variant, ptx) == []
    lines = ptx.splitlines()
    ticket = next(i for i, line in enumerate(lines) if "acq_rel.add" in line)
    barrier = max(i for i in range(ticket) if "bar.sync" in lines[i])
    broken = {
        "no barrier": "\n".join(lines[:barrier] + lines[barrier + 1:]),
        "relaxed ticket": ptx.replace("acq_rel.add", "relaxed.add", 1),
        "every thread draws": "\n".join(lines[:ticket] + [re.sub(r"@%p\d+\s+", "", lines[ticket])]
                                         + lines[ticket + 1:]),
        "no reset": "\n".join(line for line in lines if ".exch." not in line),
        "acq_rel reset": ptx.replace("relaxed.exch", "acq_rel.exch", 1),
        "float atomic": ptx.replace("ld.global.", "atom.global.gpu.relaxed.add.f32.", 1),
        "partial sums in one split" if single_split else "no combine":
            ptx.replace("ld.global.", "ld.global.cg.", 1) if single_split
            else ptx.replace("ld.global.cg.", "ld.global."),
    }
    for what, text in broken.items():
        assert aot.protocol_problems(variant, text), what


# ------------------------------------------------------------------------------------------
# Which path runs.
# ------------------------------------------------------------------------------------------

def test_kernel_argument_is_validated():
    with pytest.raises(ValueError, match=r"kernel must be one of 'auto', 'triton', 'torch', "
                                         r"got 'cuda'"):
        MABN2d(4, kernel="cuda")
    layer = MABN2d(4)
    assert layer.kernel == "auto"
    with pytest.raises(ValueError, match="got 'Triton'"):
        layer.kernel = "Triton"
    layer.kernel = "triton"
    assert "kernel='triton'" in repr(layer)


def _fake_cuda_input(shape=(2, 8, 4, 4), dtype=torch.float32):
    """What the dispatch reads of an input: device, dtype, shape, numel."""
    return types.SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype, shape=shape,
                                 numel=lambda: shape[0] * shape[1] * shape[2] * shape[3])


@pytest.mark.parametrize("kernel, expected", [("triton", True), ("auto", False),
                                              ("torch", False)])
def test_triton_path_is_chosen_for_cuda_only_when_asked(kernel, expected, monkeypatch):
    from mabn_det.layers import mabn_triton

    layer = MABN2d(8, kernel=kernel)
    # The layer's tensors as if moved to the GPU (supports() reads their dtype and device).
    on_gpu = types.SimpleNamespace(dtype=torch.float32, device=torch.device("cuda", 0))
    gpu_layer = types.SimpleNamespace(weight=on_gpu, bias=on_gpu, chi_buffer=on_gpu,
                                      psi_buffer=on_gpu, running_var=on_gpu, last_renorm=on_gpu,
                                      _triton_tickets=on_gpu)
    real_supports = mabn_triton.supports
    monkeypatch.setattr(mabn_triton, "supports", lambda module, x: real_supports(gpu_layer, x))
    assert layer._uses_triton(_fake_cuda_input()) is expected
    # Inputs the kernels do not cover take the PyTorch path.
    assert layer._uses_triton(_fake_cuda_input(dtype=torch.float64)) is False


def test_auto_stays_on_the_torch_path_until_cuda_tests_have_passed():
    assert mabn_module._AUTO_PICKS_TRITON is False


def test_cpu_tensors_never_reach_compiled_kernels(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from mabn_det.layers import mabn_triton

    def fail(module, x):
        raise AssertionError("the Triton path ran for a CPU tensor")

    monkeypatch.setattr(mabn_triton, "mabn_train_step", fail)
    layer = MABN2d(3, kernel="triton", buffer_size=2, warmup_iters=0)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    layer(x).sum().backward()
    assert layer._uses_triton(x) is False
    # Even with the variable set after this process imported the kernels compiled.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert mabn_triton.INTERPRETED is False
    assert layer._uses_triton(x) is False


def test_import_and_cpu_training_do_not_load_the_kernels():
    code = ("import sys, torch, mabn_det\n"
            "from mabn_det.layers import MABN2d\n"
            "layer = MABN2d(3, kernel='triton')\n"
            "layer(torch.randn(2, 3, 4, 4)).sum().backward()\n"
            "assert 'mabn_det.layers.mabn_triton' not in sys.modules\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True,
                            text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


# ------------------------------------------------------------------------------------------
# On a GPU (skipped without CUDA).
# ------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _cuda_steps(layer, inputs, grads):
    out = []
    for x, dy in zip(inputs, grads):
        layer.zero_grad()
        x = x.clone().requires_grad_()
        y = layer(x)
        y.backward(dy)
        out.append((y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
    return out


@needs_cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(2, 64, 32, 48), (16, 256, 7, 7), (2, 96, 25, 42)],
                         ids=["hw16", "hw49", "hw1050"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_cuda_triton_matches_torch(shape, channels_last, dtype, monkeypatch):
    from mabn_det.layers import mabn_triton

    calls = []
    original = mabn_triton.mabn_train_step
    monkeypatch.setattr(mabn_triton, "mabn_train_step",
                        lambda module, x: calls.append(1) or original(module, x))
    torch.manual_seed(0)
    kwargs = dict(buffer_size=3, warmup_iters=2, renorm_warmup_iters=5, renorm_clip=1.5)
    ref = MABN2d(shape[1], kernel="torch", **kwargs).cuda()
    tri = MABN2d(shape[1], kernel="triton", **kwargs).cuda()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    inputs = [(torch.randn(shape, device="cuda") * (1 + i % 3)).to(dtype).contiguous(
        memory_format=fmt) for i in range(8)]
    grads = [torch.randn(shape, device="cuda").to(dtype).contiguous(memory_format=fmt)
             for _ in range(8)]
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)
    for got, want in zip(_cuda_steps(tri, inputs, grads), _cuda_steps(ref, inputs, grads)):
        for g, w in zip(got, want):
            assert g.dtype == w.dtype
            torch.testing.assert_close(g.float(), w.float(), **tol)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(tri.state_dict()[key], value, rtol=1e-4, atol=1e-6)
    assert len(calls) == len(inputs)


@needs_cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_triton_launches_four_kernels_per_step(channels_last):
    from torch.profiler import ProfilerActivity, profile

    layer = MABN2d(64, kernel="triton", buffer_size=2, warmup_iters=0).cuda()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 64, 16, 16, device="cuda").contiguous(memory_format=fmt)
    x.requires_grad_()
    dy = torch.randn_like(x)

    def step():
        # Fresh gradients: accumulating into existing ones would launch add kernels of autograd's.
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(dy)

    step()  # compiles, allocates the tickets
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    # The four fused kernels and nothing else (no memset of the tickets, no copy, no add).
    assert len(kernels) == 4, kernels
    for name, launches in (("fwd_reduce", 1), ("scale_add", 2), ("bwd_reduce", 1)):
        assert sum(name in k for k in kernels) == launches, kernels
