"""The Markdown report, ratio plot and state-dict sizes of benchmarks/bench_inference.py."""
import os
from typing import Dict, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from inference_models import (AS_FROZEN, AS_TRAINED, EAGER, EXPORTED, FOLDED, FROZEN, GN, ORT,
                              TORCHSCRIPT, Setting)


def speed_table(rows: Dict[Tuple[str, str, str], float], program: str,
                settings: Sequence[Setting], runtimes: Sequence[str],
                variants: Sequence[str]) -> str:
    """Markdown: one row per variant, per (setting, runtime) ms and ratio to (a)."""
    cols = [(s.name, rt) for s in settings for rt in runtimes
            if any((program, s.name, rt, v) in rows for v in variants)]
    head = "| variant | " + " | ".join(f"{s}, {rt}" for s, rt in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for v in variants:
        if not any((program, s, rt, v) in rows for s, rt in cols):
            continue
        cells = []
        for s, rt in cols:
            ms = rows.get((program, s, rt, v))
            ref = rows.get((program, s, rt, FOLDED))
            cells.append("–" if ms is None else f"{ms:.0f} ms ({ms / ref:.2f}×)")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_ratios(rows: Dict[Tuple[str, str, str, str], float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({k[:3] for k in rows}, key=lambda k: list(rows).index(k + (FOLDED,)))
    variants = [v for v in (AS_FROZEN, GN, FROZEN, AS_TRAINED)
                if any(g + (v,) in rows for g in groups)]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(groups)), 4.8))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        ys = [rows[g + (v,)] / rows[g + (FOLDED,)] if g + (v,) in rows else np.nan for g in groups]
        ax.bar(np.arange(len(groups)) + (i - (len(variants) - 1) / 2) * width, ys, width, label=v)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(np.arange(len(groups)))
    short = {EAGER: "eager", TORCHSCRIPT: "TS", ORT: "ORT"}
    ax.set_xticklabels([f"{p}\n{s.replace('batch ', 'b').replace(', ', ' ')}\n{short.get(rt, rt)}"
                        for p, s, rt in groups], fontsize=7)
    ax.set_ylabel("time / time of (a) MABN folded")
    ax.legend(fontsize=8)
    ax.set_title("Inference time relative to MABN folded into the convs (lower is faster)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)



def state_dict_sizes(variants: Dict[str, nn.Module], out_dir: str) -> Dict[str, float]:
    """MiB of each exported variant's saved state dict (the PyTorch checkpoint a user ships)."""
    sizes = {}
    for v in EXPORTED:
        path = os.path.join(out_dir, "state_dict.pth")
        torch.save(variants[v].state_dict(), path)
        sizes[v] = os.path.getsize(path) / 2**20
        os.remove(path)
    return sizes



def render(header, settings, rows, graphs, quant_rows, cuda_note, variants, elapsed, sizes) -> str:
    lines = ["# Inference benchmark: MABN or GN?", "", header, "",
             "Settings: " + "; ".join(s.describe() for s in settings) + ".", ""]
    runtimes = [EAGER, TORCHSCRIPT, ORT] + sorted({k[2] for k in rows if k[2].startswith("CUDA")})
    for program in ("backbone+FPN", "heads", "whole model"):
        lines += [f"## {program}: median ms (ratio to (a))", "",
                  speed_table(rows, program, settings, runtimes, list(variants)), ""]
    if graphs:
        lines += ["## Exported ONNX graphs", "",
                  "| program | variant | graph | compute nodes | Conv | norm nodes | "
                  "layout reorders | MiB |", "|---|---|---|---|---|---|---|---|"]
        for name, stages in graphs.items():
            program, v = name.split(" ", 1)
            for stage, g in stages.items():
                norms = ", ".join(f"{op} {n}" for op, n in g["norm"].items()) or "none"
                lines.append(f"| {program} | {v} | {stage} | {g['nodes']} | {g['conv']} | "
                             f"{norms} | {g['reorders']} | {g['mb']:.1f} |")
        lines.append("")
    lines += ["## PyTorch state dict (whole model)", "", "| variant | MiB |", "|---|---|"]
    lines += [f"| {v} | {mb:.1f} |" for v, mb in sizes.items()] + [""]
    if quant_rows:
        lines += [f"## int8 in ONNX Runtime: backbone+FPN, {settings[0].name}", "",
                  "| variant | model | ms | vs its fp32 | max rel. error of p2–p6 vs fp32 | MiB |",
                  "|---|---|---|---|---|---|"]
        for r in quant_rows:
            lines.append(f"| {r['variant']} | {r['model']} | {r['ms']:.0f} | "
                         f"{r['ms'] / r['ms_fp32']:.2f}× | {r['error']:.4f} | {r['mb']:.1f} |")
        lines.append("")
    lines += [cuda_note, "", f"Total run time: {elapsed:.0f} s."]
    return "\n".join(lines)
