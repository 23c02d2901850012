import json

import pytest
import torch
from detectron2.utils.env import seed_all_rng

from mabn_det.engine import Trainer
from mabn_det.engine.hooks import update_mabn_stats
from mabn_det.layers import MABN2d
from mabn_experiments.conditions import CONDITIONS, TINY_OPTS
from mabn_experiments.precise_bn_probe import PARTS, main, output_gain, part_of
from mabn_experiments.shapes import generate_shapes_dataset, register_shapes_split
from mabn_experiments.study import StudyRun, study_config


def test_output_gain_is_the_rescaling_of_the_normalised_output():
    x = torch.tensor([1.0, -2.0, 0.5])
    training, precise, eps = torch.tensor([4.0, 1.0, 0.0]), torch.tensor([1.0, 4.0, 0.0]), 1e-5
    gain = output_gain(training, precise, eps)
    assert torch.allclose(x / (precise + eps).sqrt(), gain * x / (training + eps).sqrt())
    assert torch.allclose(gain, torch.tensor([2 * (4 + eps) ** 0.5 / (4 + 4 * eps) ** 0.5, 0.5, 1]))


def test_every_layer_name_has_one_part():
    assert part_of("backbone.bottom_up.res2.0.conv1.norm") == "ResNet"
    assert part_of("backbone.fpn_output3.norm") == "FPN"
    assert part_of("roi_heads.mask_head.mask_fcn1.norm") == "mask head"
    with pytest.raises(ValueError, match="'heads.norm' is in none of the parts"):
        part_of("heads.norm")


def test_probe_finds_the_part_whose_statistics_precise_bn_changes(tmp_path):
    data = str(generate_shapes_dataset(tmp_path / "data", 8, 4, 64, seed=1, progress=False,
                                       style="study"))
    for split in ("train", "val"):
        register_shapes_split(f"study_{split}", data, split)
    run_dir = tmp_path / "out" / "MABN@2" / "seed0"
    run = StudyRun("photometric", "MABN@2", 0, CONDITIONS["photometric"].config_path, "study",
                   data, str(run_dir), TINY_OPTS, 1, 2)
    cfg = study_config(run)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(cfg.dump())

    # An untrained model normalises with its batch statistics (r = 1), so its PreciseBN estimate
    # does not depend on running_var: setting the ResNet's running_var to 4·precise makes
    # PreciseBN scale exactly those layers' outputs by 2.
    model = Trainer.build_model(cfg)
    seed_all_rng(cfg.SEED)  # as the probe does: the heads' training RoIs are drawn
    update_mabn_stats(model, Trainer.build_precise_bn_loader(cfg), 2)
    for name, m in model.named_modules():
        if isinstance(m, MABN2d) and name.startswith(PARTS["ResNet"]):
            m.running_var.mul_(4).add_(3 * m.eps)
    checkpoint = run_dir / "model_0000003.pth"
    torch.save({"model": model.state_dict(), "iteration": 3}, checkpoint)

    weights_only = run_dir / "weights.pth"
    torch.save({"model": model.state_dict()}, weights_only)
    with pytest.raises(ValueError, match="weights.pth holds no 'iteration'"):
        main([str(weights_only), "--run-dir", str(run_dir), "--dataset-dir", data,
              "--out", str(tmp_path / "probe")])

    main([str(checkpoint), "--run-dir", str(run_dir), "--dataset-dir", data, "--batches", "2",
          "--frozen-forwards", "2", "--trace-every", "1", "--out", str(tmp_path / "probe")])
    result = json.loads((tmp_path / "probe" / "MABN@2_seed0_iter4.json").read_text())
    assert {"MABN@2_seed0_iter4.md", "MABN@2_seed0_iter4.png"} <= {
        p.name for p in (tmp_path / "probe").iterdir()}
    assert result["iteration"] == 4 and result["batches"] == 2
    parts = {layer["part"] for layer in result["layers"]}
    assert {"ResNet", "FPN", "box head", "mask head"} <= parts
    for layer in result["layers"]:
        expected = 2.0 if layer["part"] == "ResNet" else 1.0
        assert layer["gain_min"] == pytest.approx(expected, rel=1e-4), layer["name"]
        assert layer["gain_max"] == pytest.approx(expected, rel=1e-4), layer["name"]
        assert layer["far_channels"] == 0
    # The trace starts from the checkpoint's gains; the forwards then move running_var.
    trace = result["frozen_trace"]
    assert [t["forwards"] for t in trace] == [0, 1, 2]
    assert trace[0]["median_gain"] == {layer["name"]: layer["gain_median"]
                                       for layer in result["layers"]}
    assert trace[2]["median_gain"] != trace[0]["median_gain"]
    statistics = [e["statistics"] for e in result["evaluations"]]
    assert statistics == ["training (running_var)", "PreciseBN everywhere",
                          *(f"PreciseBN in {p} only" for p in PARTS if p in parts)]
