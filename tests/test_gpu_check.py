"""benchmarks/gpu_check.py without a GPU: it refuses in one line, and its report renders."""
import importlib
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.py")


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        return importlib.import_module("gpu_check")
    finally:
        sys.path.pop(0)


def test_without_cuda_says_so_in_one_line_and_fails(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, SCRIPT, "--output", str(tmp_path)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stdout.strip().splitlines() == [result.stdout.strip()]
    assert "no CUDA device" in result.stdout
    assert "Traceback" not in result.stderr


CHECK_ON_CPU = """
import json, sys, torch
sys.path.insert(0, "benchmarks")
import gpu_check
rows = [gpu_check.check_config((2, 8, 6, 6), torch.float32, torch.contiguous_format, "cpu", 2,
                               graph=False),
        gpu_check.check_config((2, 8, 3, 4), torch.bfloat16, torch.channels_last, "cpu", 2,
                               graph=False)]
print(json.dumps(rows))
"""


def test_production_checks_pass_on_the_interpreted_kernels():
    # Section 2's logic (replays from a saved state, tickets, step counter, parity with the
    # PyTorch path) on tiny inputs, with the kernels run by Triton's CPU interpreter.
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, "-c", CHECK_ON_CPU], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for row in json.loads(result.stdout.strip().splitlines()[-1]):
        assert row["failures"] == []
        assert (row["replays"], row["tickets"], row["iteration"]) == ("2/2", "0", "+1")


def test_report_renders_every_section_and_lists_failures(gpu_check, tmp_path):
    report = gpu_check.Report(str(tmp_path), "2026-12-02; a GPU; torch X")
    report.add("tests", {"command": "pytest -k cuda tests/layers", "summary": "20 passed",
                         "seconds": 61.0, "failures": []})
    assert not report.failed
    check = {"shape": "res5", "dtype": "bf16", "layout": "NHWC", "replays": "29/30",
             "tickets": "0", "iteration": "+1", "graph": "same bits", "parity": "1.0e-03"}
    report.add("checks", {"rows": [check], "failures": ["res5 bf16 NHWC: 1 replays differ"]})
    kernels = [{"kernel": k, "name": k, "us": 10.0, "gbps": 900.0}
               for k in gpu_check.KERNEL_TRAFFIC]
    layers = {"BatchNorm2d": {"us": 40.0, "gbps": 1000.0},
              "GroupNorm(32)": {"error": "RuntimeError"},
              "MABN2d Triton": {"us": 44.0, "gbps": 909.0}}
    report.add("kernels", {"layers": ["BatchNorm2d", "GroupNorm(32)", "MABN2d torch",
                                      "MABN2d Triton"],
                           "rows": [{"shape": "res5", "dtype": "bf16", "layout": "NHWC",
                                     "layers": layers, "triton_kernels": kernels}],
                           "failures": []})
    report.add("maskrcnn", {"setting": "2 images 800×1216, median of 10", "failures": [],
                            "rows": [["BN", "100.0", "1.000×", "5.00"]]})
    assert report.failed
    text = (tmp_path / "gpu_check.md").read_text()
    assert "| res5 | bf16 | NHWC | 29/30 | 0 | +1 | same bits | 1.0e-03 |" in text
    assert "44 µs, 909 GB/s, 1.10×" in text and "error: RuntimeError" in text
    assert "10.0 µs, 900 GB/s" in text and "| BN | 100.0 |" in text
    assert "- checks: res5 bf16 NHWC: 1 replays differ" in text
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(saved["sections"]) == ["tests", "checks", "kernels", "maskrcnn"]


def test_achieved_bandwidth_counts_the_bytes_moved(gpu_check):
    # 5 passes over a 1 GB tensor in 10 ms: 500 GB/s.
    assert gpu_check.gbps(10**9, 5, 10_000.0) == pytest.approx(500.0)
