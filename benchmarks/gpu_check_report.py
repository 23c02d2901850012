"""The report of `make gpu-check`: JSON and Markdown, rewritten after every row.

It touches no GPU, so that the tests render it on any machine. A report holds the sections in
the order they run; each section holds its status, its rows as they arrive, its failures, its
estimated and measured seconds and the tail of its output.
"""
import json
import os
from typing import Dict, List

from mabn_experiments.runs import markdown_table

__all__ = ["Report", "render", "LAYER_TRAFFIC", "KERNEL_TRAFFIC"]

# Global-memory traffic of each fused kernel in units of one tensor of the input's size:
# K1 reads x; K2 reads x, writes y; K3 reads dy and x; K4 reads dy and x, writes dx.
KERNEL_TRAFFIC = {"K1 Σx²": 1, "K2 y": 2, "K3 Σdy·x, Σdy": 2, "K4 dx": 3}
# The least a fused forward+backward of any norm must move: x, y, dy, x again, dx. A layer's
# "effective GB/s" is this many tensor passes over its device time, whatever it really moved.
LAYER_TRAFFIC = 5


class Report:
    """The sections of one run, written as gpu_check.json and gpu_check.md under `output` after
    every change, so that a run cut short still leaves every row it measured.

    Args:
        output: the directory of the two files (created).
        title: the first line under the heading (date, machine, versions, command).
        plan: {"mode", "estimate_s", "budget_s"} of the run.
    """

    def __init__(self, output: str, title: str, plan: Dict):
        self.output, self.title, self.plan = output, title, plan
        self.sections: List[Dict] = []
        os.makedirs(output, exist_ok=True)

    def start(self, name: str, kind: str, estimate_s: float, command: str) -> Dict:
        section = {"name": name, "kind": kind, "status": "running", "estimate_s": estimate_s,
                   "seconds": None, "command": command, "rows": [], "failures": [],
                   "log_tail": ""}
        self.sections.append(section)
        self.write()
        return section

    def add_row(self, section: Dict, row: Dict) -> None:
        section["rows"].append(row)
        self.write()

    def finish(self, section: Dict, status: str, seconds: float, failures: List[str],
               log_tail: str = "") -> None:
        section.update(status=status, seconds=seconds, log_tail=log_tail)
        section["failures"] += failures
        self.write()

    @property
    def failed(self) -> bool:
        return any(section["status"] != "ok" or _failures(section)
                   for section in self.sections)

    def write(self) -> None:
        text = json.dumps({"title": self.title, **self.plan, "sections": self.sections}, indent=1)
        _replace(os.path.join(self.output, "gpu_check.json"), text)
        _replace(os.path.join(self.output, "gpu_check.md"),
                 render(self.title, self.plan, self.sections) + "\n")


def _replace(path: str, text: str) -> None:
    """Write through a temporary file, so that a reader never sees half a report."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _failures(section: Dict) -> List[str]:
    return section["failures"] + [f"{_row_label(row)}: {failure}" for row in section["rows"]
                                  for failure in row.get("failures", [])]


def _row_label(row: Dict) -> str:
    return " ".join(str(row[k]) for k in ("shape", "dtype", "layout", "norm") if k in row)


def _number(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _layer_cell(layer: Dict | None, bn: Dict | None) -> str:
    if not layer:
        return "–"
    if "error" in layer:
        return f"error: {layer['error']}"
    ratio = (f", {layer['device_us'] / bn['device_us']:.2f}× BN"
             if bn and bn.get("device_us") and layer.get("device_us") is not None else "")
    return (f"{_number(layer['device_us'], '.0f')} / {_number(layer['wall_us'], '.0f')} µs, "
            f"{_number(layer['gbps'], '.0f')} GB/s{ratio}")


def _cells(row: Dict, keys: List[str]) -> List[str]:
    """The row's values at `keys`, "–" where a row that failed early has none."""
    return [str(row.get(key, "–")) for key in keys]


def _section_lines(section: Dict) -> List[str]:
    kind, rows = section["kind"], section["rows"]
    if kind == "smoke":
        return [markdown_table(["layout", "shape", "dtype", "parity", "seconds"],
                               [_cells(r, ["layout", "shape", "dtype", "parity"])
                                + [_number(r.get("seconds"), ".1f")] for r in rows])]
    if kind == "checks":
        columns = ["shape", "dtype", "layout", "replays", "tickets", "iteration", "graph",
                   "parity"]
        return ["From one saved steady state: every replay bit-identical, tickets at 0, step "
                "counter +1; CUDA-graph replay = eager; largest difference to kernel=\"torch\" "
                "relative to the output's largest magnitude.", "",
                markdown_table(columns[:6] + ["CUDA graph", "parity"],
                               [_cells(r, columns) for r in rows])]
    if kind == "kernels":
        names = next((r["layer_names"] for r in rows if "layer_names" in r), [])
        lines = [f"Per training step (forward+backward, fresh inputs each step): device µs "
                 f"(profiler, kernels only) / wall µs (CUDA events), effective GB/s "
                 f"({LAYER_TRAFFIC} tensor passes / device time), ratio to BatchNorm2d.", "",
                 markdown_table(["shape", "dtype", "layout"] + names,
                                [_cells(r, ["shape", "dtype", "layout"])
                                 + [_layer_cell(r.get("layers", {}).get(n),
                                                r.get("layers", {}).get(names[0]))
                                    for n in names] for r in rows])]
        fused = [_cells(r, ["shape", "dtype", "layout"])
                 + [f"{k['us']:.1f} µs, {_number(k['gbps'], '.0f')} GB/s"
                    for k in r["triton_kernels"]] for r in rows if r.get("triton_kernels")]
        if fused:
            lines += ["", "The four fused kernels (effective GB/s: the bytes each must move / "
                      "its device time):", "",
                      markdown_table(["shape", "dtype", "layout"] + list(KERNEL_TRAFFIC), fused)]
        return lines
    if kind == "maskrcnn":
        return [f"{rows[0].get('setting', '')}.", "",
                markdown_table(["norm", "ms / iteration", "vs BN", "peak memory (GiB)"],
                               [_cells(r, ["norm", "ms", "vs_bn", "peak_gib"]) for r in rows])]
    return [f"`{r.get('command', '?')}`: {r.get('summary', '?')} "
            f"({_number(r.get('seconds'), '.0f')} s)" for r in rows]


def render(title: str, plan: Dict, sections: List[Dict]) -> str:
    """Markdown of the sections so far (pure: tested on CPU)."""
    lines = ["# MABN2d on CUDA: `make gpu-check`", "", title, "",
             f"Mode {plan['mode']}: estimated {plan['estimate_s']:.0f} s in a budget of "
             f"{plan['budget_s']:.0f} s.", ""]
    for section in sections:
        seconds = _number(section["seconds"], ".0f")
        lines += [f"## {section['name']}", "",
                  f"{section['status']}; {seconds} s (estimated {section['estimate_s']:.0f} s); "
                  f"`{section['command']}`", ""]
        if section["rows"]:
            lines += _section_lines(section) + [""]
    failures = [f"- {s['name']}: {f}" for s in sections for f in _failures(s)]
    return "\n".join(lines + ["## Failures", ""] + (failures or ["none"]))
