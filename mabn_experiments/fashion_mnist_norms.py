"""Small-batch normalisation on Fashion-MNIST: BN@32 vs BN@2 vs GN@2 vs MABN@2, on CPU.

A CPU-sized proxy of the claim of Yan et al. (ICLR 2020): when each normalisation layer only sees
2 images, batch norm degrades and group norm does not recover it, while MABN -- second-moment
normalisation with statistics averaged over the last ``buffer_size`` micro-batches, after
weight-centred convs -- gets back to the accuracy of batch norm over 32 images.

Every arm trains the same 5-conv net (3×3 conv → norm → ReLU, 2×2 max-pool after the 2nd and 4th,
global average pool, linear) with the same data order, initialisation and schedule: SGD momentum
0.9, optimizer batch 32, lr 0.1 (``--lr``) with a linear warm-up over the first 5 % of steps then
cosine decay, weight decay 1e-4. Only the norm differs:

- ``BN@32``: BatchNorm2d, one batch of 32 per optimizer step.
- ``BN@2``: BatchNorm2d, 16 micro-batches of 2 with gradient accumulation per step (what 16 devices
  holding 2 images each would do without synchronised BN).
- ``GN@2``: GroupNorm with 8 groups, same 16 × 2 schedule.
- ``MABN@2``: MABN2d after CentredConv2d (the first conv included), same 16 × 2 schedule.
  MABN counts micro-batches, so its hyper-parameters are in micro-steps: buffer_size 16 (statistics
  of 16 × 2 = 32 images), warm-up and renormalisation warm-up over the first 5 % and 10 % of the
  run's micro-steps (750 and 1499 at the default 0.5 epoch, about 47 and 94 optimizer steps),
  renorm_clip 5, momentum 0.02.

Accuracy is measured in eval mode on the 10k test images. Each (arm, seed) runs in its own process
with one thread, two processes at a time.

Data: the Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``).

Run (about 10 minutes on 2 otherwise idle cores)::

    python -m mabn_experiments.fashion_mnist_norms                  # 4 arms × 2 seeds, 0.5 epoch
    python -m mabn_experiments.fashion_mnist_norms --quick          # smoke: 0.05 epoch, 1 seed
    python -m mabn_experiments.fashion_mnist_norms --arms BN@2 MABN@2 --seeds 3 --epochs 1

Writes ``OUT/results.md`` (Markdown table), ``OUT/results.json`` (per-run results) and
``OUT/accuracy.png`` (bar chart with the standard deviation over seeds), ``OUT`` from ``--out``.
"""
import argparse
import datetime
import gzip
import json
import math
import platform
import shlex
import socket
import statistics
import sys
import time
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Detectron2's import-time use of torch.jit.script warns once per process (each worker included).
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
from detectron2.layers import Conv2d  # noqa: E402
from mabn_det.layers import CentredConv2d, MABN2d  # noqa: E402
from mabn_experiments.plots import bar_chart  # noqa: E402
from mabn_experiments.runs import (describe_machine, markdown_table, mean_and_std,  # noqa: E402
                                   run_in_processes)

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
TRAIN_SIZE = 60_000
OPTIMIZER_BATCH = 32
ARM_NORM_BATCH = {"BN@32": 32, "BN@2": 2, "GN@2": 2, "MABN@2": 2}
GN_GROUPS = 8
# (out_channels, 2×2 max-pool after it) per 3×3 conv: two pools take 28×28 to 7×7. Pooling rather
# than stride-2 convs because it gave the BN@32 reference 86.5 % instead of 85.0 % (one seed).
CONV_PLAN = ((16, False), (32, True), (32, False), (64, True), (64, False))
DEFAULT_LR, MOMENTUM, WEIGHT_DECAY, WARMUP_FRACTION = 0.1, 0.9, 1e-4, 0.05
MABN_BUFFER, MABN_WARMUP_FRACTION, MABN_RENORM_FRACTION = 16, 0.05, 0.10
MABN_CLIP, MABN_MOMENTUM = 5.0, 0.02
EVAL_BATCH = 500
# Pixel statistics of the Fashion-MNIST training set, so the first conv sees zero-mean inputs.
PIXEL_MEAN, PIXEL_STD = 0.286, 0.353


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped idx file (the MNIST format: magic with the rank, big-endian dims, uint8 data).

    Raises:
        ValueError: if the file is not an unsigned-byte idx file or its size does not match its header.
    """
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, rank = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (header {raw[:4].hex()})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * rank)
    if data.size != math.prod(dims):
        raise ValueError(f"{path}: header says {dims} ({math.prod(dims)} bytes), has {data.size}")
    return data.reshape(dims)


@lru_cache(maxsize=1)
def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``train`` or ``t10k`` as normalised (N, 1, 28, 28) float images and int64 labels."""
    images = read_idx(DATA_DIR / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(DATA_DIR / f"{split}-labels-idx1-ubyte.gz")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return (x - PIXEL_MEAN) / PIXEL_STD, torch.from_numpy(labels.astype(np.int64))


def mabn_iters(total_micro_steps: int) -> tuple[int, int]:
    """MABN warm-up and renorm warm-up, in micro-steps, as fixed fractions of the run's length."""
    return (round(MABN_WARMUP_FRACTION * total_micro_steps),
            round(MABN_RENORM_FRACTION * total_micro_steps))


def make_conv(arm: str, c_in: int, c_out: int, total_micro_steps: int) -> Conv2d:
    """A 3×3 conv → norm → ReLU block with the norm of ``arm`` (no conv bias: the norm has one)."""
    kwargs = dict(kernel_size=3, padding=1, bias=False, activation=nn.ReLU())
    if arm.startswith("BN@"):
        return Conv2d(c_in, c_out, norm=nn.BatchNorm2d(c_out), **kwargs)
    if arm == "GN@2":
        return Conv2d(c_in, c_out, norm=nn.GroupNorm(GN_GROUPS, c_out), **kwargs)
    warmup, renorm_warmup = mabn_iters(total_micro_steps)
    # MABN drops the mean subtraction, which is only safe after a weight-centred conv.
    norm = MABN2d(c_out, buffer_size=MABN_BUFFER, warmup_iters=warmup,
                  renorm_warmup_iters=renorm_warmup, renorm_clip=MABN_CLIP, momentum=MABN_MOMENTUM)
    return CentredConv2d(c_in, c_out, norm=norm, **kwargs)


def build_net(arm: str, total_micro_steps: int) -> nn.Sequential:
    """The 5-conv net shared by all arms; ``arm`` only chooses the norm."""
    layers, c_in = [], 1
    for c_out, pool in CONV_PLAN:
        conv = make_conv(arm, c_in, c_out, total_micro_steps)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        layers.append(conv)
        if pool:
            layers.append(nn.MaxPool2d(2))
        c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10))


def lr_at(step: int, total_steps: int, base_lr: float) -> float:
    """Linear warm-up to ``base_lr`` over the first WARMUP_FRACTION of steps, then cosine decay to 0."""
    warmup = max(1, round(WARMUP_FRACTION * total_steps))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               norm_batch: int) -> float:
    """One optimizer step over (x, y), split into micro-batches of ``norm_batch``; returns the loss."""
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for xs, ys in zip(x.split(norm_batch), y.split(norm_batch)):
        # Summed per-image losses over the batch size: the gradient of the mean over all 32 images.
        loss = F.cross_entropy(net(xs), ys, reduction="sum") / len(x)
        loss.backward()
        total += loss.item()
    opt.step()
    return total


@torch.no_grad()
def evaluate(net: nn.Module) -> float:
    """Top-1 accuracy (%) of ``net`` in eval mode on the 10k test images."""
    net.eval()
    x, y = load_split("t10k")
    correct = sum(int((net(xb).argmax(1) == yb).sum()) for xb, yb in
                  zip(x.split(EVAL_BATCH), y.split(EVAL_BATCH)))
    return 100.0 * correct / len(y)


def run_one(task: tuple[str, int, float, float]) -> dict:
    """Train one (arm, seed, epochs, lr) with one thread and return its result record."""
    arm, seed, epochs, lr = task
    torch.set_num_threads(1)
    start = time.time()
    steps = int(epochs * TRAIN_SIZE / OPTIMIZER_BATCH)
    norm_batch = ARM_NORM_BATCH[arm]
    micro_steps = steps * (OPTIMIZER_BATCH // norm_batch)
    x, y = load_split("train")
    # The seed alone fixes the data order and the initial weights, so the arms see the same of both.
    order = torch.randperm(TRAIN_SIZE, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    net = build_net(arm, micro_steps)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=MOMENTUM,
                          weight_decay=WEIGHT_DECAY)
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        idx = order[(step * OPTIMIZER_BATCH) % TRAIN_SIZE:][:OPTIMIZER_BATCH]
        losses.append(train_step(net, opt, x[idx], y[idx], norm_batch))
    return {"arm": arm, "seed": seed, "norm_batch": norm_batch, "optimizer_batch": OPTIMIZER_BATCH,
            "steps": steps, "accuracy": evaluate(net),
            "final_train_loss": statistics.fmean(losses[-50:]), "seconds": time.time() - start}


def run_all(arms: list[str], seeds: int, epochs: float, lr: float, workers: int) -> list[dict]:
    """Run every (arm, seed), ``workers`` processes at a time."""
    tasks = [(arm, seed, epochs, lr) for seed in range(seeds) for arm in arms]
    return run_in_processes(run_one, tasks, workers, desc="Fashion-MNIST runs")


def summarise(results: list[dict], arms: list[str]) -> list[dict]:
    """Per-arm mean and standard deviation of accuracy over seeds (std 0 for a single seed)."""
    rows = []
    for arm in arms:
        accs = [r["accuracy"] for r in results if r["arm"] == arm]
        mean, std = mean_and_std(accs)
        rows.append({"arm": arm, "norm_batch": ARM_NORM_BATCH[arm], "accs": accs, "mean": mean,
                     "std": std})
    return rows


def results_table(rows: list[dict]) -> str:
    """The results as a Markdown table."""
    return markdown_table(
        ["arm", "norm batch", "optimizer batch", "accuracy % (mean ± std)", "per seed"],
        [[r["arm"], r["norm_batch"], OPTIMIZER_BATCH, f"{r['mean']:.2f} ± {r['std']:.2f}",
          ", ".join(f"{a:.2f}" for a in r["accs"])] for r in rows])


def environment() -> str:
    """Command, date, host, machine and library versions, for reproducibility."""
    return "\n".join([
        f"command: {shlex.join([sys.executable] + sys.argv)}",
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"host: {socket.gethostname()}, {describe_machine()}",
        f"python {platform.python_version()}, torch {torch.__version__}",
    ])


def settings(epochs: float, lr: float, arms: list[str]) -> str:
    """The shared schedule and the MABN hyper-parameters of this run."""
    steps = int(epochs * TRAIN_SIZE / OPTIMIZER_BATCH)
    warmup, renorm_warmup = mabn_iters(steps * OPTIMIZER_BATCH // 2)
    text = (f"schedule: {epochs} epoch = {steps} optimizer steps of {OPTIMIZER_BATCH}, SGD momentum "
            f"{MOMENTUM}, lr {lr} (warm-up {WARMUP_FRACTION:.0%}, cosine), wd {WEIGHT_DECAY}, "
            f"{len(CONV_PLAN)} convs {[c for c, _ in CONV_PLAN]} (max-pool after "
            f"{[i + 1 for i, (_, pool) in enumerate(CONV_PLAN) if pool]}), GN groups {GN_GROUPS}")
    if "MABN@2" in arms:
        text += (f"\nMABN2d: buffer_size {MABN_BUFFER}, warmup_iters {warmup}, renorm_warmup_iters "
                 f"{renorm_warmup} (micro-steps of 2 images), renorm_clip {MABN_CLIP}, "
                 f"momentum {MABN_MOMENTUM}; all convs weight-centred")
    return text


def parse_args() -> argparse.Namespace:
    """Command-line options; ``--quick`` changes the defaults of --epochs and --seeds only."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arms", nargs="+", default=list(ARM_NORM_BATCH), choices=list(ARM_NORM_BATCH))
    p.add_argument("--seeds", type=int, help="seeds per arm (default 2, --quick 1)")
    p.add_argument("--epochs", type=float, help="fraction of an epoch (default 0.5, --quick 0.05)")
    p.add_argument("--lr", type=float, default=DEFAULT_LR,
                   help=f"peak learning rate, the same for every arm (default {DEFAULT_LR})")
    p.add_argument("--workers", type=int, default=2, help="processes at a time (default 2)")
    p.add_argument("--out", type=Path, default=Path("output/fashion_mnist"))
    p.add_argument("--quick", action="store_true", help="smoke test: 0.05 epoch, 1 seed")
    args = p.parse_args()
    args.arms = list(dict.fromkeys(args.arms))  # a repeated arm would run twice
    args.seeds = args.seeds if args.seeds is not None else (1 if args.quick else 2)
    args.epochs = args.epochs if args.epochs is not None else (0.05 if args.quick else 0.5)
    if args.seeds < 1:
        p.error(f"--seeds must be ≥ 1, got {args.seeds}")
    if args.lr <= 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    if args.workers < 1:
        p.error(f"--workers must be ≥ 1, got {args.workers}")
    if int(args.epochs * TRAIN_SIZE / OPTIMIZER_BATCH) < 1:
        p.error(f"--epochs must give at least one step of {OPTIMIZER_BATCH} images, "
                f"got {args.epochs}")
    return args


def main() -> int:
    """Check the data, run the benchmark and write the results; returns the exit status."""
    args = parse_args()
    missing = [p.name for p in (DATA_DIR / f"{s}-{k}-idx{r}-ubyte.gz"
                                for s in ("train", "t10k") for k, r in (("images", 3), ("labels", 1)))
               if not p.exists()]
    if missing:
        print(f"Fashion-MNIST not found in {DATA_DIR} (missing {', '.join(missing)}); install it "
              "with:\n    apt-get install dataset-fashion-mnist", file=sys.stderr)
        return 1
    header = environment() + "\n" + settings(args.epochs, args.lr, args.arms)
    print(header, flush=True)
    start = time.time()
    results = run_all(args.arms, args.seeds, args.epochs, args.lr, args.workers)
    rows = summarise(results, args.arms)
    table = results_table(rows)
    print(f"\n{table}\n\nwall time: {time.time() - start:.0f}s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(f"```\n{header}\n```\n\n{table}\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    bar_chart([r["arm"] for r in rows], [r["mean"] for r in rows], [r["std"] for r in rows],
              "test accuracy (%)", str(args.out / "accuracy.png"),
              f"Fashion-MNIST, optimizer batch {OPTIMIZER_BATCH}", zoom=True)
    print(f"wrote {args.out}/results.md, results.json, accuracy.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
