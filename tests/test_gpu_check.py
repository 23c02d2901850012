"""benchmarks/gpu_check.py without a GPU: it refuses in one line, its sections survive each other's
failures, its report renders after every row, and its quick mode fits 4 minutes by its estimate."""
import importlib
import json
import os
import subprocess
import sys
import types

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.py")


@pytest.fixture(scope="module")
def gpu():
    """The check's three modules as one namespace (scripts beside each other, not a package)."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        names = ("gpu_check", "gpu_check_sections", "gpu_check_report")
        return types.SimpleNamespace(**{name: importlib.import_module(name) for name in names})
    finally:
        sys.path.pop(0)


def test_without_cuda_says_so_in_one_line_and_fails(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, SCRIPT, "--quick", "--output", str(tmp_path)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stdout.strip().splitlines() == [result.stdout.strip()]
    assert "no CUDA device" in result.stdout
    assert "Traceback" not in result.stderr


def _fake(rows, then=""):
    """The command of a section process that prints `rows` and then runs `then`."""
    lines = [f"print('GPU_CHECK_ROW ' + {json.dumps(json.dumps(row))}, flush=True)"
             for row in rows]
    return [sys.executable, "-c", "\n".join(["import os, time"] + lines + [then])]


def test_a_broken_section_leaves_the_other_sections_rows_in_the_report(gpu, tmp_path):
    check = {"shape": "res5", "dtype": "bf16", "layout": "NHWC", "replays": "30/30",
             "tickets": "0", "iteration": "+1", "graph": "same bits", "parity": "1.0e-03",
             "failures": []}
    smoke = {"shape": "(2, 64, 32, 48)", "dtype": "fp32", "layout": "NCHW", "parity": "0.0e+00",
             "seconds": 3.0, "failures": []}
    Section = gpu.gpu_check.Section
    sections = [
        Section("smoke", "smoke", _fake([smoke, {**smoke, "layout": "NHWC"}]), 1.0),
        # A sticky CUDA error: one row, then the process dies.
        Section("checks", "checks", _fake([check], "os._exit(3)"), 1.0),
        Section("kernels", "kernels", _fake([], "raise SystemExit(0)"), 1.0),
        Section("maskrcnn", "maskrcnn", _fake([{"norm": "BN", "setting": "2 images",
                                                "ms": "100.0", "vs_bn": "1.000×",
                                                "peak_gib": "5.00", "failures": []}]), 1.0),
        # A hang after one row, ended by the budget.
        Section("tests", "tests", _fake([{"command": "pytest -k cuda", "summary": "3 passed",
                                          "seconds": 1.0, "failures": []}], "time.sleep(600)"),
                1.0),
        Section("never", "tests", _fake([]), 100.0),
    ]
    # The hang lasts until the budget is spent: a short one, still seconds more than the other
    # sections (interpreters that print and exit) take.
    report = gpu.gpu_check_report.Report(str(tmp_path), "a title", {
        "mode": "quick", "estimate_s": 105.0, "budget_s": 8.0})
    gpu.gpu_check.run(sections, report, budget_s=8.0)
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {s["name"]: s["status"] for s in saved["sections"]}
    assert status == {"smoke": "ok", "checks": "crashed", "kernels": "ok", "maskrcnn": "ok",
                      "tests": "timed out", "never": "skipped"}
    assert [len(s["rows"]) for s in saved["sections"]] == [2, 1, 0, 1, 1, 0]
    assert report.failed
    text = (tmp_path / "gpu_check.md").read_text()
    assert "| res5 | bf16 | NHWC | 30/30 | 0 | +1 | same bits | 1.0e-03 |" in text
    assert "| BN | 100.0 | 1.000× | 5.00 |" in text and "`pytest -k cuda`: 3 passed" in text
    assert "- checks: the process exited with 3" in text
    assert "- tests: timed out after" in text and "- never: skipped: estimated 100 s" in text


def test_report_renders_kernel_rows_and_row_failures(gpu, tmp_path):
    report = gpu.gpu_check_report.Report(str(tmp_path), "t", {
        "mode": "full", "estimate_s": 1.0, "budget_s": 2.0})
    section = report.start("kernels", "kernels", 1.0, "gpu_check_sections.py kernels")
    fused = [{"kernel": k, "name": k, "us": 10.0, "gbps": 900.0}
             for k in gpu.gpu_check_report.KERNEL_TRAFFIC]
    names = ["BatchNorm2d", "GroupNorm(32)", "MABN2d torch", "MABN2d Triton"]
    layers = {"BatchNorm2d": {"device_us": 40.0, "wall_us": 55.0, "gbps": 1000.0},
              "GroupNorm(32)": {"error": "RuntimeError: boom"},
              "MABN2d Triton": {"device_us": 44.0, "wall_us": 60.0, "gbps": None}}
    report.add_row(section, {"shape": "res5", "dtype": "bf16", "layout": "NHWC",
                             "layer_names": names, "layers": layers, "triton_kernels": fused,
                             "failures": ["GroupNorm(32): RuntimeError: boom"]})
    report.add_row(section, {"shape": "res4", "dtype": "fp32", "layout": "NCHW",
                             "failures": ["CUDA error: an illegal memory access"]})
    report.finish(section, "ok", 1.5, [])
    text = (tmp_path / "gpu_check.md").read_text()
    assert "44 / 60 µs, – GB/s, 1.10× BN" in text and "error: RuntimeError: boom" in text
    assert "10.0 µs, 900 GB/s" in text and "| res4 | fp32 | NCHW | – |" in text
    assert "- kernels: res4 fp32 NCHW: CUDA error: an illegal memory access" in text
    assert report.failed


def test_quick_mode_fits_four_minutes_by_its_own_estimate(gpu):
    quick = gpu.gpu_check.plan_sections("quick", list(gpu.gpu_check.ORDER))
    assert [s.name for s in quick] == ["smoke NCHW", "smoke NHWC", "checks", "kernels",
                                       "maskrcnn", "tests"]
    assert sum(s.estimate_s for s in quick) <= 240
    assert all(s.estimate_s <= 30 for s in quick[:2])  # a smoke step per layout
    full = gpu.gpu_check.plan_sections("full", list(gpu.gpu_check.ORDER))
    assert sum(s.estimate_s for s in full) > sum(s.estimate_s for s in quick)
    # The shapes span 64 to 2048 channels.
    assert {64, 128, 256, 2048} <= {shape[1] for shape in gpu.gpu_check_sections.SHAPES.values()}


def test_timed_steps_rotate_through_fresh_inputs_and_never_divide_by_zero(gpu):
    sections = gpu.gpu_check_sections
    pairs = sections._fresh_inputs((2, 8, 4, 4), torch.float32, torch.channels_last, "cpu")
    assert len(pairs) >= 2 and not torch.equal(pairs[0][0], pairs[1][0])
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in pairs)
    assert sections._gbps(10**9, 5, 10_000.0) == pytest.approx(500.0)  # 5 GB in 10 ms
    assert sections._gbps(10**9, 5, 0.0) is None


CHECK_ON_CPU = """
import json, sys, torch
sys.path.insert(0, "benchmarks")
import gpu_check_sections as s
rows = [s.check_config((2, 8, 6, 6), torch.float32, torch.contiguous_format, "cpu", 2,
                       graph=False),
        s.check_config((2, 8, 3, 4), torch.bfloat16, torch.channels_last, "cpu", 2, graph=False)]
print(json.dumps(rows))
"""


def test_production_checks_pass_on_the_interpreted_kernels():
    # The checks section's logic (replays from a saved state, tickets, step counter, parity with
    # the PyTorch path) on tiny inputs, with the kernels run by Triton's CPU interpreter.
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, "-c", CHECK_ON_CPU], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for row in json.loads(result.stdout.strip().splitlines()[-1]):
        assert row["failures"] == []
        assert (row["replays"], row["tickets"], row["iteration"]) == ("2/2", "0", "+1")
