"""benchmarks/bench_inference.py on a tiny R18: the variants compute the same function where they
should, the RoI counts are fixed, and the ONNX graphs show what the README claims about fusion."""
import importlib
import os
import subprocess
import sys
import types

import pytest
import torch

pytest.importorskip("onnxruntime")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    """The benchmark's modules as one namespace (they are scripts beside each other, not a
    package)."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        modules = [importlib.import_module(name) for name in
                   ("inference_models", "inference_onnx", "bench_inference")]
    finally:
        sys.path.pop(0)
    return types.SimpleNamespace(**{k: v for m in modules for k, v in vars(m).items()
                                    if not k.startswith("__")})


@pytest.fixture(scope="module")
def tiny(bench):
    torch.set_num_threads(2)
    setting = bench.Setting(2, 64, 96, 6, 3)
    photos = bench.photographs(bench.CALIBRATION_PHOTOS[:2], setting.height, setting.width)
    return setting, photos, bench.build_variants(setting, bench.TINY_OPTS, photos)


def test_tiny_run_writes_the_report(bench, tmp_path):
    result = bench.main(["--tiny", "--no-quantization", "--output", str(tmp_path)])
    report = (tmp_path / "results.md").read_text()
    assert report.startswith("# Inference benchmark")
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert f"; code {head[:12]}" in report  # a result names the code that measured it
    programs = {row["program"] for row in result["timings_ms"]}
    assert programs == {"backbone+FPN", "heads", "whole model"}


def test_converted_variants_compute_the_unconverted_function(bench, tiny):
    _, photos, variants = tiny
    with torch.no_grad():
        x = bench.normalise(variants[bench.FOLDED], photos)
        reference = bench.BackboneFPN(variants[bench.AS_TRAINED])(x)
        for v in (bench.FOLDED, bench.AS_FROZEN):
            for got, want in zip(bench.BackboneFPN(variants[v])(x), reference):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max())


def test_whole_model_has_the_fixed_number_of_detections(bench, tiny):
    setting, photos, variants = tiny
    with torch.no_grad():
        for v, model in variants.items():
            out = model.inference(bench.model_inputs(photos))
            assert [len(o["instances"]) for o in out] == [setting.detections] * len(photos), v


def test_onnx_export_fuses_frozen_bn_and_keeps_group_norm(bench, tiny, tmp_path):
    setting, photos, variants = tiny
    stats = {}
    for v in (bench.FOLDED, bench.GN):
        program = bench.BackboneFPN(variants[v])
        x = bench.normalise(variants[v], photos)
        path = str(tmp_path / f"{v[1]}.onnx")
        bench.export_onnx(program, (x,), ["images"], path)
        session = bench.ort_session(path, threads=2)
        with torch.no_grad():
            want = program(x[:1])
        got = session.run(None, {"images": x[:1].numpy()})  # batch 1 through a batch-2 export
        for g, w in zip(got, want):
            torch.testing.assert_close(torch.from_numpy(g), w, rtol=1e-3, atol=1e-3 * w.abs().max())
        stats[v] = bench.graph_stats(path)
    assert stats[bench.FOLDED]["norm"] == {}
    assert stats[bench.GN]["norm"].get("InstanceNormalization", 0) > 0
    assert stats[bench.FOLDED]["conv"] == stats[bench.GN]["conv"]
