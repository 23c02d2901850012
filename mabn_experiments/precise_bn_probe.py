"""Why PreciseBN statistics can lower an MABN model's AP: one checkpoint of a study run, evaluated
with its training statistics, with PreciseBN statistics everywhere, and with PreciseBN statistics
in one part of the model at a time; and, per channel, how much PreciseBN changes each MABN2d's
output scale.

MABN's training forward already uses ``running_var``: with r = √(s²+ε)/√(running_var+ε) unclipped,
y = γ·r·x/√(s²+ε) + β = γ·x/√(running_var+ε) + β, which is the inference map. Replacing
``running_var`` by a re-estimate therefore rescales channel c's output by
√(running_var_c+ε)/√(precise_c+ε), a forward the network never trained with. This probe measures
that rescaling and what it costs, part by part; with --frozen-forwards, it then goes on with
training forwards whose weights stay fixed and traces the rescaling, to tell a lag behind moving
weights from the noise of the moving averages themselves.

    python -m mabn_experiments.precise_bn_probe RUN_DIR/model_0000599.pth --run-dir RUN_DIR \\
        --dataset-dir OUT/datasets/study_3000_96px_seed1 --out docs/study/precise_bn \\
        --frozen-forwards 400
"""
import argparse
import json
import os
import tempfile
from typing import Dict, Sequence

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage
from detectron2.utils.logger import setup_logger
from matplotlib.figure import Figure
from tqdm import tqdm

from mabn_det.config import load_config
from mabn_det.engine import Trainer, precise_mabn_statistics
from mabn_det.layers import MABN2d

from .plots import save_with_legends
from .runs import describe_machine, markdown_table
from .shapes import register_shapes_split
from .study import coco_aps

__all__ = ["PARTS", "output_gain", "probe"]


# Parts of Detectron2's Mask R-CNN FPN, by module-name prefix, in forward order.
PARTS = {
    "ResNet": "backbone.bottom_up.",
    "FPN": "backbone.",
    "RPN": "proposal_generator.",
    "box head": "roi_heads.box_head.",
    "mask head": "roi_heads.mask_head.",
}


def part_of(layer_name: str) -> str:
    """The entry of PARTS whose prefix `layer_name` starts with (the first, in PARTS order)."""
    for part, prefix in PARTS.items():
        if layer_name.startswith(prefix):
            return part
    raise ValueError(f"MABN2d {layer_name!r} is in none of the parts {list(PARTS)}")


def output_gain(training_var: torch.Tensor, precise_var: torch.Tensor, eps: float) -> torch.Tensor:
    """Factor by which PreciseBN scales each channel's normalised output (before γ and β).

    Args:
        training_var, precise_var: (C,) running_var before and after the re-estimate.
        eps: the layer's ε.

    Returns:
        (C,) √(training_var+ε)/√(precise_var+ε).
    """
    return ((training_var + eps) / (precise_var + eps)).sqrt()


def _evaluate(cfg, model, layers: Dict[str, MABN2d],
              statistics: Dict[str, torch.Tensor]) -> Dict[str, float]:
    with torch.no_grad():
        for name, var in statistics.items():
            layers[name].running_var.copy_(var)
    results = Trainer.test(cfg, model)
    return coco_aps(results)


def _precise_statistics(cfg, model, layers: Dict[str, MABN2d], batches: int
                        ) -> Dict[str, torch.Tensor]:
    # Seeded: the heads' training RoIs are drawn, and the estimate should repeat.
    seed_all_rng(cfg.SEED)
    with precise_mabn_statistics(model, Trainer.build_precise_bn_loader(cfg), batches):
        return {name: m.running_var.clone() for name, m in layers.items()}


def _median_gains(layers: Dict[str, MABN2d], precise: Dict[str, torch.Tensor]) -> Dict[str, float]:
    return {name: output_gain(m.running_var, precise[name], m.eps).median().item()
            for name, m in layers.items()}


def probe(cfg, checkpoint: str, batches: int, frozen_forwards: int = 0,
          trace_every: int = 50) -> Dict:
    """Evaluate `checkpoint` with its training statistics, PreciseBN statistics everywhere and
    PreciseBN statistics in each part of PARTS alone; summarise the output gain per layer; then,
    if `frozen_forwards` > 0, trace the gains while the weights stay fixed.

    Args:
        cfg: the run's config, its datasets registered, TEST.PRECISE_BN off.
        checkpoint: a checkpoint of that run.
        batches: training batches PreciseBN averages over.
        frozen_forwards: training forwards without weight updates after the evaluations: the
            rings and running_var move on as in training, the weights do not. What remains
            between running_var and the PreciseBN estimate then is not a lag behind the weights.
        trace_every: forwards between two points of that trace.

    Returns:
        {"iteration": iterations trained, "evaluations": [{"statistics", "bbox_AP",
        "segm_AP"}], "layers": [{"name", "part",
        "channels", "gain_min", "gain_median", "gain_max", "far_channels"}], "frozen_trace":
        [{"forwards", "median_gain": {layer name: median over channels}}]}, where far_channels
        counts channels whose gain is outside [1/2, 2]; layers come by part (PARTS order), then
        in the model's order; the trace starts at 0 forwards.
    """
    model = Trainer.build_model(cfg)
    iteration = DetectionCheckpointer(model).load(checkpoint).get("iteration")
    if iteration is None:
        raise ValueError(f"{checkpoint} holds no 'iteration': expected a checkpoint that "
                         "Detectron2's trainer wrote")
    mabn = {name: m for name, m in model.named_modules() if isinstance(m, MABN2d)}
    training = {name: m.running_var.clone() for name, m in mabn.items()}
    precise = _precise_statistics(cfg, model, mabn, batches)

    layers = []
    for name, m in sorted(mabn.items(), key=lambda item: list(PARTS).index(part_of(item[0]))):
        gain = output_gain(training[name], precise[name], m.eps)
        layers.append({"name": name, "part": part_of(name), "channels": gain.numel(),
                       "gain_min": gain.min().item(), "gain_median": gain.median().item(),
                       "gain_max": gain.max().item(),
                       "far_channels": int(((gain < 0.5) | (gain > 2)).sum())})

    evaluations = [{"statistics": "training (running_var)", **_evaluate(cfg, model, mabn, training)},
                   {"statistics": "PreciseBN everywhere", **_evaluate(cfg, model, mabn, precise)}]
    parts = [p for p in PARTS if any(layer["part"] == p for layer in layers)]
    for part in parts:
        mixed = {name: precise[name] if part_of(name) == part else training[name]
                 for name in mabn}
        evaluations.append({"statistics": f"PreciseBN in {part} only",
                            **_evaluate(cfg, model, mabn, mixed)})

    trace = []
    if frozen_forwards:
        for name, var in training.items():
            mabn[name].running_var.copy_(var)
        trace.append({"forwards": 0, "median_gain": _median_gains(mabn, precise)})
        loader = iter(Trainer.build_train_loader(cfg))
        model.train()
        with EventStorage(), torch.no_grad():
            for done in tqdm(range(1, frozen_forwards + 1), desc="forwards, weights fixed"):
                model(next(loader))
                if done % trace_every == 0 or done == frozen_forwards:
                    precise = _precise_statistics(cfg, model, mabn, batches)
                    trace.append({"forwards": done, "median_gain": _median_gains(mabn, precise)})
    return {"iteration": iteration + 1, "evaluations": evaluations, "layers": layers,
            "frozen_trace": trace}


def deepest_per_stage(layers: Sequence[Dict]) -> Dict[str, str]:
    """Stage → name of its last layer in `layers` (a probe's "layers"); a ResNet layer's stage is
    "stem", "res2" … "res5", any other layer's is its part."""
    return {layer["name"].split(".")[2] if layer["part"] == "ResNet" else layer["part"]:
            layer["name"] for layer in layers}


def plot_gains(result: Dict, png_path: str, title: str) -> Figure:
    """Left: per MABN2d (grouped by part), the range and median of PreciseBN's output gain. Right
    (if the result has a frozen-weights trace): the median gain of each stage's deepest layer
    against the forwards made with the weights fixed."""
    layers, trace = result["layers"], result["frozen_trace"]
    fig = Figure(figsize=(13 if trace else 9, 4))
    axes = fig.subplots(1, 2 if trace else 1, squeeze=False)[0]
    x = np.arange(len(layers))
    for part in PARTS:
        index = [i for i, layer in enumerate(layers) if layer["part"] == part]
        if not index:
            continue
        low = np.array([layers[i]["gain_min"] for i in index])
        mid = np.array([layers[i]["gain_median"] for i in index])
        high = np.array([layers[i]["gain_max"] for i in index])
        axes[0].errorbar(x[index], mid, yerr=[mid - low, high - mid], fmt="o", markersize=3,
                         capsize=2, label=part)
    axes[0].set(xlabel="MABN2d layer, by part, in the model's order",
                ylabel="output gain √(running_var+ε)/√(precise+ε)\nmedian and range over channels",
                title="at the checkpoint")
    if trace:
        for stage, name in deepest_per_stage(layers).items():
            axes[1].plot([t["forwards"] for t in trace],
                         [t["median_gain"][name] for t in trace], "-o", markersize=3,
                         label=f"{stage} ({name.rsplit('.', 2)[-2]})")
        axes[1].set(xlabel="training forwards with the weights fixed",
                    ylabel="median output gain", title="weights fixed, statistics moving on")
    for ax in axes:
        ax.axhline(1.0, color="black", linewidth=0.8)
    return save_with_legends(fig, axes, png_path, title, legend_size=7)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint of a norm-study run with MABN")
    parser.add_argument("--run-dir", required=True,
                        help="the run's output directory (its config.yaml is used)")
    parser.add_argument("--dataset-dir", required=True,
                        help="the study's shapes dataset (OUT/datasets/study_...)")
    parser.add_argument("--batches", type=int, default=100,
                        help="training batches of the PreciseBN estimate (default: %(default)s, "
                             "as in the study)")
    parser.add_argument("--frozen-forwards", type=int, default=0,
                        help="after the evaluations, training forwards with the weights fixed, "
                             "tracing the gains (default: %(default)s, none)")
    parser.add_argument("--trace-every", type=int, default=50,
                        help="forwards between two points of that trace (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="directory for NAME.json, NAME.md, NAME.png")
    parser.add_argument("--name", help="file stem (default: the run directory's arm_seed and the "
                        "iterations the checkpoint trained)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logger(name="mabn_det")
    torch.set_num_threads(args.threads)
    for split in ("train", "val"):
        register_shapes_split(f"study_{split}", args.dataset_dir, split)
    cfg = load_config(os.path.join(args.run_dir, "config.yaml"))
    cfg.TEST.PRECISE_BN.ENABLED = False
    cfg.MODEL.DEVICE = "cpu"
    cfg.OUTPUT_DIR = tempfile.mkdtemp(prefix="precise_bn_probe_")
    cfg.freeze()

    result = probe(cfg, args.checkpoint, args.batches, args.frozen_forwards, args.trace_every)
    run = os.path.normpath(args.run_dir).split(os.sep)[-2:]
    name = args.name or f"{run[0]}_{run[1]}_iter{result['iteration']}"
    title = (f"{run[0]} {run[1]}, after iteration {result['iteration']}: PreciseBN over "
             f"{args.batches} batches")
    result.update(run=" ".join(run), batches=args.batches, machine=describe_machine())
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    table = markdown_table(["statistics", "box AP", "mask AP"],
                           [[e["statistics"], f"{e['bbox_AP']:.1f}", f"{e['segm_AP']:.1f}"]
                            for e in result["evaluations"]])
    by_part = markdown_table(
        ["part", "layers", "channels", "gain range", "channels with gain outside [½, 2]"],
        [[part, len(rows), sum(r["channels"] for r in rows),
          f"{min(r['gain_min'] for r in rows):.2f}–{max(r['gain_max'] for r in rows):.2f}",
          sum(r["far_channels"] for r in rows)]
         for part in PARTS if (rows := [r for r in result["layers"] if r["part"] == part])])
    tables = [table, by_part]
    if result["frozen_trace"]:
        deepest = deepest_per_stage(result["layers"])
        tables.append(markdown_table(
            ["forwards, weights fixed", *(f"{stage} median gain" for stage in deepest)],
            [[t["forwards"], *(f"{t['median_gain'][n]:.2f}" for n in deepest.values())]
             for t in result["frozen_trace"]]))
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(f"# {title}\n\n" + "\n\n".join(tables) + "\n")
    plot_gains(result, os.path.join(args.out, f"{name}.png"), title)
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
