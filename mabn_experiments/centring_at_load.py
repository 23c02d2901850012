"""What simple centring does to a trained BN detector before any fine-tuning.

The MABN authors started MABN from BN-pretrained weights by subtracting each conv filter's mean
(what the norm study's `MABN@2-centred` arm loads); `tools/convert_bn_checkpoint.py` instead keeps
the function exact at load. How much a pretrained ResNet loses to the centring alone is measured
here on BN@16 runs of the study: each model's own COCO AP on its own validation set, as trained and
with every conv filter of its ResNet centred (the FPN and heads as trained, BatchNorm in eval mode
with its running statistics), and the share of the ResNet filters' squared norm that their means
hold::

    python -m mabn_experiments.centring_at_load --out ../study-output

It reads OUT/<condition>/BN@16/seed0/model_final.pth of each `--condition` (trained by
`tools/compare_norms.py --out OUT`) and that condition's data under OUT/datasets (generated if
absent), prints a table and writes docs/study/centring_at_load.json (`--results`), beside the
study's run records it compares with.
"""
import argparse
import datetime
import json
import os
import tempfile

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.logger import setup_logger
from torch import nn

from mabn_det.config import load_config
from mabn_det.engine import Trainer

from .conditions import CONDITIONS, prepare_dataset, register_dataset
from .runs import code_commit, describe_machine, markdown_table
from .study import coco_aps, result_path

__all__ = ["centre_filters", "filter_mean_share", "measure"]

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_ARM = "BN@16"


def _resnet_convs(model: nn.Module) -> list[nn.Conv2d]:
    """The convs of the detector's bottom-up ResNet: what a pretrained backbone checkpoint holds."""
    convs = [m for m in model.backbone.bottom_up.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model.backbone.bottom_up).__name__} holds no conv")
    return convs


@torch.no_grad()
def centre_filters(model: nn.Module) -> int:
    """Subtract from each filter (output channel) of every ResNet conv of `model` its mean over
    input channels and kernel window, in place. Returns the number of convs centred."""
    convs = _resnet_convs(model)
    for conv in convs:
        conv.weight -= conv.weight.mean(dim=(1, 2, 3), keepdim=True)
    return len(convs)


@torch.no_grad()
def filter_mean_share(model: nn.Module) -> float:
    """Σ‖mean(W_o)·1‖² / Σ‖W_o‖² over the filters W_o of every ResNet conv: the part of the
    filters' squared norm that centring removes (0: centred already)."""
    removed = total = 0.0
    for conv in _resnet_convs(model):
        weight = conv.weight.double()
        fan_in = weight[0].numel()
        removed += float(weight.mean(dim=(1, 2, 3)).square().sum()) * fan_in
        total += float(weight.square().sum())
    return removed / total


def measure(condition: str, out: str, results_dir: str) -> dict:
    """Box (and mask) AP of `condition`'s BN@16 seed-0 model under OUT on its own validation set,
    as trained and with its ResNet's filters centred, beside the AP of its record in the study's
    `results_dir` (None where it has no record)."""
    run_dir = os.path.join(out, condition, SOURCE_ARM, "seed0")
    weights = os.path.join(run_dir, "model_final.pth")
    if not os.path.exists(weights):
        raise FileNotFoundError(f"{weights} is missing: train it with `python "
                                f"tools/compare_norms.py --condition {condition} --arms "
                                f"{SOURCE_ARM} --seeds 0 --out {out}`")
    spec = CONDITIONS[condition]
    names = (f"{condition}_train", f"{condition}_val")
    register_dataset(spec.data, prepare_dataset(spec, os.path.join(out, "datasets")), names)
    with tempfile.TemporaryDirectory() as scratch:
        cfg = load_config(os.path.join(run_dir, "config.yaml"),
                          ["DATASETS.TRAIN", f"('{names[0]}',)", "DATASETS.TEST",
                           f"('{names[1]}',)", "MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu",
                           "OUTPUT_DIR", scratch])
        cfg.freeze()
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model).load(weights)
        model.eval()
        as_trained = coco_aps(Trainer.test(cfg, model))
        share = filter_mean_share(model)
        convs = centre_filters(model)
        centred = coco_aps(Trainer.test(cfg, model))
    record_path = result_path(results_dir, condition, SOURCE_ARM, 0)
    record = None  # a model trained here whose record is not committed
    if os.path.exists(record_path):
        with open(record_path) as f:
            record = {k: v for k, v in json.load(f).items() if k.endswith("_AP")}
    return {"condition": condition, "source": f"{SOURCE_ARM} seed 0", "resnet_convs": convs,
            "filter_mean_share": round(share, 4), "record": record,
            "as_trained": as_trained, "centred": centred}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the --out of tools/compare_norms.py")
    parser.add_argument("--condition", nargs="+", default=["standard_pretraining", "plain"],
                        choices=[name for name, c in CONDITIONS.items() if SOURCE_ARM in c.arms],
                        help="default: %(default)s")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--results", default=os.path.join(_REPO, "docs", "study",
                                                          "centring_at_load.json"),
                        help="the JSON to write; the source runs' records are read from its "
                        "folder (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logger(name="mabn_experiments")
    torch.set_num_threads(args.threads)
    rows = [measure(condition, args.out, os.path.dirname(os.path.abspath(args.results)))
            for condition in args.condition]
    report = {"rows": rows, "threads": args.threads, "code_commit": code_commit(_REPO),
              "machine": describe_machine(),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
              "command": "python -m mabn_experiments.centring_at_load --out OUT --condition "
                         + " ".join(args.condition)}
    with open(args.results, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    print(markdown_table(
        ["source model", "ResNet filter-mean share", "box AP: record", "as trained", "centred",
         "mask AP: as trained", "centred"],
        [[f"{r['condition']} {r['source']}", f"{r['filter_mean_share']:.2%}",
          (r["record"] or {}).get("bbox_AP", "–"), r["as_trained"]["bbox_AP"],
          r["centred"]["bbox_AP"], r["as_trained"].get("segm_AP", "–"),
          r["centred"].get("segm_AP", "–")] for r in rows]))


if __name__ == "__main__":
    main()
