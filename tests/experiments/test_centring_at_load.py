import json
import os

import pytest
import torch
from torch import nn

from mabn_det.engine import Trainer
from mabn_experiments import centring_at_load
from mabn_experiments.centring_at_load import centre_filters, filter_mean_share
from mabn_experiments.conditions import CONDITIONS, TINY_OPTS, register_dataset
from mabn_experiments.shapes import generate_shapes_dataset
from mabn_experiments.study import StudyRun, study_config


def _detector() -> nn.Module:
    """A stand-in with Detectron2's layout: a ResNet at backbone.bottom_up, an FPN conv beside."""
    torch.manual_seed(0)
    model, backbone = nn.Module(), nn.Module()
    backbone.bottom_up = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                       nn.Conv2d(4, 5, 1, bias=False))
    backbone.lateral = nn.Conv2d(5, 5, 1)
    model.backbone = backbone
    with torch.no_grad():
        for conv in (backbone.bottom_up[0], backbone.bottom_up[3], backbone.lateral):
            conv.weight.add_(torch.arange(conv.out_channels).view(-1, 1, 1, 1) * 0.1)
    return model


def test_centring_zeroes_each_resnet_filter_mean_and_nothing_else():
    model = _detector()
    lateral = model.backbone.lateral.weight.clone()
    first = model.backbone.bottom_up[0].weight.clone()
    assert filter_mean_share(model) > 0.01
    assert centre_filters(model) == 2
    for conv in (model.backbone.bottom_up[0], model.backbone.bottom_up[3]):
        torch.testing.assert_close(conv.weight.mean(dim=(1, 2, 3)),
                                   torch.zeros(conv.out_channels), atol=1e-6, rtol=0)
    # Only each filter's mean was removed; the FPN's conv is no part of a pretrained ResNet.
    torch.testing.assert_close(model.backbone.bottom_up[0].weight,
                               first - first.mean(dim=(1, 2, 3), keepdim=True))
    assert torch.equal(model.backbone.lateral.weight, lateral)
    assert filter_mean_share(model) == pytest.approx(0.0, abs=1e-12)


def test_filter_mean_share_is_the_part_of_the_squared_norm_in_the_means():
    model = _detector()
    conv = nn.Conv2d(2, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 1.0, 3.0, -1.0]).view(2, 2, 1, 1))
    model.backbone.bottom_up = nn.Sequential(conv)
    # Filter means 1 and 1 over 2 weights each: 2 + 2 of 1 + 1 + 9 + 1.
    assert filter_mean_share(model) == pytest.approx(4 / 12)


def test_a_resnet_without_convs_is_refused():
    model = _detector()
    model.backbone.bottom_up = nn.Sequential(nn.ReLU())
    with pytest.raises(ValueError, match="holds no conv"):
        centre_filters(model)


def test_measure_evaluates_the_source_model_as_trained_then_centred(tmp_path, monkeypatch):
    """The tool end to end on a tiny BN@16 run of `plain`: it evaluates the trained model with its
    filters as saved, then centred, and writes both with the provenance."""
    data = str(generate_shapes_dataset(tmp_path / "data", 8, 4, 64, seed=1, progress=False,
                                       style="demo"))
    monkeypatch.setattr(centring_at_load, "prepare_dataset", lambda *args: data)
    out = tmp_path / "out"
    run = StudyRun("plain", "BN@16", 0, CONDITIONS["plain"].config_path, "demo", data,
                   str(out / "plain" / "BN@16" / "seed0"), TINY_OPTS, 1, 0)
    register_dataset("demo", data, ("study_train", "study_val"))
    cfg = study_config(run)
    os.makedirs(run.output_dir)
    with open(os.path.join(run.output_dir, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    saved = Trainer.build_model(cfg).state_dict()
    torch.save({"model": saved}, os.path.join(run.output_dir, "model_final.pth"))
    stem = "backbone.bottom_up.stem.conv1.weight"
    stem_means = []
    evaluate = Trainer.test.__func__

    def spy(cls, cfg, model, evaluators=None):
        stem_means.append(model.state_dict()[stem].mean(dim=(1, 2, 3)).abs().max().item())
        return evaluate(cls, cfg, model, evaluators)

    monkeypatch.setattr(Trainer, "test", classmethod(spy))
    results = tmp_path / "centring.json"
    centring_at_load.main(["--out", str(out), "--condition", "plain", "--results", str(results)])
    assert stem_means[0] == pytest.approx(saved[stem].mean(dim=(1, 2, 3)).abs().max().item())
    assert stem_means[0] > 1e-4 and stem_means[1] < 1e-6
    report = json.loads(results.read_text())
    row, = report["rows"]
    assert row["condition"] == "plain" and row["filter_mean_share"] > 0
    assert row["record"] is None  # no record of this run beside the results file
    assert set(row["as_trained"]) == set(row["centred"]) == {"bbox_AP", "segm_AP"}
    assert report["command"].endswith("--condition plain") and report["threads"] == 1
