"""The norm study's report, rebuilt from the run records alone: `RESULTS/results.md` (a summary table
over conditions, then each condition's calibration, tables and runs) and one
`RESULTS/<condition>/ap_curves.png` per condition (AP against iterations)."""
import glob
import json
import os
import statistics
from typing import Dict, List, Sequence, Tuple

from .conditions import CALIBRATION_GAP, CONDITIONS, Condition
from .plots import plot_ap_curves
from .runs import markdown_table, mean_and_std
from .study import ARMS, IMAGES_PER_STEP

__all__ = ["REPORT_NAME", "CURVES_NAME", "read_records", "write_report"]

REPORT_NAME = "results.md"
CURVES_NAME = "ap_curves.png"


def read_records(results_dir: str, condition: str) -> List[Dict]:
    """Every run record of `condition` in `results_dir`, in ARMS then seed order."""
    records = []
    for path in glob.glob(os.path.join(results_dir, condition, "runs", "*.json")):
        with open(path) as f:
            records.append(json.load(f))
    order = list(ARMS)
    return sorted(records, key=lambda r: (order.index(r["arm"]), r["seed"]))


def _mean_cell(values: Sequence[float]) -> str:
    if not values:
        return "–"
    mean, std = mean_and_std(values)
    return f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f} (1 seed)"


def _seconds_cell(seconds: Sequence[float | None]) -> str:
    """The mean of the timed runs' seconds per iteration, or "–" where no run was timed."""
    timed = [s for s in seconds if s is not None]
    return f"{statistics.fmean(timed):.2f}" if timed else "–"


def _by_arm(records: List[Dict]) -> Dict[str, List[Dict]]:
    by_arm: Dict[str, List[Dict]] = {}
    for record in records:
        by_arm.setdefault(record["arm"], []).append(record)
    return by_arm


def calibration(condition: Condition, records_by_condition: Dict[str, List[Dict]]
                ) -> Tuple[bool | None, str]:
    """Whether `condition` can rank norms (its BN@16 learns the task and BN@2 trails it clearly;
    None until both have runs), and the sentences saying why. A condition `calibrated_by` another
    takes that one's verdict."""
    if condition.calibrated_by:
        ranks, why = calibration(CONDITIONS[condition.calibrated_by], records_by_condition)
        return ranks, (f"This condition runs no BN@2: the calibration is that of "
                       f"`{condition.calibrated_by}`, on the same data. {why}")
    if condition.calibration_target is None:
        return None, "No calibration: this condition does not compare BN@16 with BN@2."
    by_arm = _by_arm(records_by_condition.get(condition.name, []))
    big, small = by_arm.get("BN@16", []), by_arm.get("BN@2", [])
    if not big or not small:
        return None, "Calibration: waiting for BN@16 and BN@2."
    big_ap, small_ap = (statistics.fmean(r["bbox_AP"] for r in rs) for rs in (big, small))
    target = condition.calibration_target
    reaches = big_ap >= target
    separates = big_ap - small_ap >= CALIBRATION_GAP
    verdict = ("this condition can rank norms" if reaches and separates else
               "this condition cannot rank norms: " + (
                   f"BN@16 is below {target:.0f} box AP" if not reaches else
                   f"BN@2 trails BN@16 by less than {CALIBRATION_GAP:.0f} box AP"))
    return reaches and separates, (
        f"Calibration (BN@16 ≥ {target:.0f} box AP, BN@2 ≥ {CALIBRATION_GAP:.0f} below it): "
        f"BN@16 {big_ap:.1f}, BN@2 {small_ap:.1f} box AP (means over {len(big)} and "
        f"{len(small)} seeds): {verdict}.")


def _precise_bn_effect_table(by_arm: Dict[str, List[Dict]], iterations: Sequence[int]) -> str:
    rows = []
    for arm, runs in by_arm.items():
        effects: Dict[int, List[float]] = {}
        for run in runs:
            for e in run["evaluations"]:
                if "bbox_AP_precise_bn" in e:
                    effects.setdefault(e["iteration"], []).append(
                        e["bbox_AP_precise_bn"] - e["bbox_AP"])
        if not effects:
            continue
        cells = []
        for it in iterations:
            values = effects.get(it, [])
            if len(values) < len(runs):
                cells.append("–")
            elif len(values) == 1:
                cells.append(f"{values[0]:+.1f}")
            else:
                cells.append(f"{statistics.fmean(values):+.1f} ({min(values):+.1f}, "
                             f"{max(values):+.1f})")
        rows.append([arm, len(runs), *cells])
    return markdown_table(["arm", "seeds", *map(str, iterations)], rows)


def _condition_section(condition: Condition, records: List[Dict], beside: Dict[str, List[Dict]],
                       calibration_note: str) -> List[str]:
    """The report's section on `condition`; `beside` maps labels to other conditions' runs shown
    with its own; `calibration_note` says whether the condition can rank norms."""
    by_arm = {**_by_arm(records), **beside}
    masks = condition.has_masks
    rows, precise_rows = [], []
    for arm, runs in by_arm.items():
        settings = ARMS[runs[0]["arm"]]
        rows.append([arm, settings.norm, settings.images_per_statistic or "–",
                     _mean_cell([r["bbox_AP"] for r in runs]),
                     *([_mean_cell([r["segm_AP"] for r in runs])] if masks else []),
                     ", ".join(f"{r['bbox_AP']:.1f}" for r in runs),
                     ", ".join(str(r["seed"]) for r in runs),
                     _seconds_cell([r["seconds_per_iteration"] for r in runs])])
        if masks and arm not in beside and all("bbox_AP_precise_bn" in r for r in runs):
            precise_rows.append([arm, ", ".join(str(r["seed"]) for r in runs),
                                 *(_mean_cell([r[k] for r in runs]) for k in (
                                     "bbox_AP", "bbox_AP_precise_bn", "segm_AP",
                                     "segm_AP_precise_bn"))])
    lines = [f"## {condition.name}: {condition.title}", "",
             f"Config `configs/tiny/{condition.config_file}`"
             + (f" with `{' '.join(condition.opts)}`" if condition.opts else "")
             + f"; arms {', '.join(condition.arms)}; seeds "
             f"{', '.join(map(str, condition.seeds))}.", "",
             calibration_note, "",
             f"Final COCO AP on the validation set ({records[0]['iterations']} iterations; "
             "mean ± sample std over seeds):", "",
             markdown_table(["arm", "norm", "images per statistic", "box AP",
                             *(["mask AP"] if masks else []), "box AP per seed", "seeds",
                             "s/iteration"], rows)]
    curve_rows = []
    for arm, runs in by_arm.items():
        points: Dict[int, List[float]] = {}
        for run in runs:
            for e in run["evaluations"]:
                points.setdefault(e["iteration"], []).append(e["bbox_AP"])
        curve_rows.append((arm, {it: statistics.fmean(v) for it, v in points.items()
                                 if len(v) == len(runs)}))
    iterations = sorted({it for _, curve in curve_rows for it in curve})
    if beside:
        lines += ["", f"Shown beside this condition's arms: {', '.join(beside)}."]
    lines += ["", "Box AP at each evaluation (mean over the arm's seeds):", "",
              markdown_table(["arm", *map(str, iterations)],
                             [[arm, *(f"{curve[it]:.1f}" if it in curve else "–"
                                      for it in iterations)] for arm, curve in curve_rows])]
    if precise_rows:
        lines += ["", "MABN arms evaluated with their moving-average statistics and with PreciseBN "
                  "statistics (evaluation only; the training is the same run):", "",
                  markdown_table(["arm", "seeds", "box AP", "box AP, PreciseBN", "mask AP",
                                  "mask AP, PreciseBN"], precise_rows),
                  "", "PreciseBN's effect at each evaluation: box AP with PreciseBN statistics "
                  "minus box AP with the moving-average statistics, mean over seeds (lowest, "
                  "highest):", "", _precise_bn_effect_table(_by_arm(records), iterations)]
    lines += ["", "The runs (wall time: the training with its evaluations, summed over the "
              "sessions of a resumed run; the machine may have been busy with other work, which "
              "changes times but not results):", "",
              markdown_table(["arm", "seed", "date", "machine", "threads", "wall time",
                              "s/iteration", "code"],
                             [[r["arm"], r["seed"], r["date"], r["machine"], r["threads"],
                               f"{r['wall_seconds'] / 60:.0f} min",
                               _seconds_cell([r["seconds_per_iteration"]]),
                               (r.get("code_commit") or "–")[:12]
                               + ("" if r.get("code_clean", True) else " (changed)")]
                              for r in records]),
              "", f"Each record's `command` re-runs it: `python tools/reproduce_run.py "
              f"docs/study/{condition.name}/runs/<arm>_seed<k>.json` checks out its `code_commit`, "
              "runs the command there and compares the new record with the committed one.", "",
              f"![AP against iterations, {condition.name}]({condition.name}/{CURVES_NAME})", ""]
    return lines


def _summary_table(records_by_condition: Dict[str, List[Dict]]) -> str:
    """One row per comparison of norms (the conditions with a calibration)."""
    comparisons = {name: records for name, records in records_by_condition.items()
                   if CONDITIONS[name].calibration_target is not None}
    arms = [arm for arm in ARMS if any(r["arm"] == arm for records in comparisons.values()
                                       for r in records)]
    rows = []
    for name, records in comparisons.items():
        by_arm = _by_arm(records)
        cells = []
        for arm in arms:
            runs = by_arm.get(arm, [])
            box = _mean_cell([r["bbox_AP"] for r in runs])
            if runs and CONDITIONS[name].has_masks:
                box += f" / {_mean_cell([r['segm_AP'] for r in runs])}"
            cells.append(box)
        ranks = calibration(CONDITIONS[name], records_by_condition)[0]
        source = CONDITIONS[name].calibrated_by
        rows.append([name, records[0]["iterations"], *cells,
                     {True: "yes", False: "no", None: "pending"}[ranks]
                     + (f" (as {source})" if source else "")])
    return markdown_table(["condition", "steps", *arms, "calibrated"], rows)


def write_report(results_dir: str) -> List[str]:
    """Rebuild `results_dir/results.md` and every condition's `ap_curves.png` from the run records.
    Returns the paths written."""
    records_by_condition = {name: records for name in CONDITIONS
                            if (records := read_records(results_dir, name))}
    lines = ["# The norm study: results", "",
             "Written by `tools/compare_norms.py` from the run records in `<condition>/runs/` "
             "(rebuild with `--report-only`). In every condition the arms share the model, data, "
             f"schedule and optimizer batch of {IMAGES_PER_STEP} images; \"@2\" arms accumulate "
             "8 micro-batches of 2 images, each normalised on its own.", "",
             "Summary: final box AP (box / mask AP where the task has masks), mean ± sample std "
             "over seeds; \"calibrated\": BN@2 clearly below BN@16, so the condition can rank "
             "norms (\"as X\": it runs no BN@2 and takes the verdict of X, on the same data).",
             "", _summary_table(records_by_condition), ""]
    paths = [os.path.join(results_dir, REPORT_NAME)]
    for name, records in records_by_condition.items():
        condition = CONDITIONS[name]
        beside = {}
        if condition.beside:
            other, arms = condition.beside
            beside = {f"{arm}, {other}": runs for arm, runs in
                      _by_arm(read_records(results_dir, other)).items() if arm in arms}
        lines += _condition_section(condition, records, beside,
                                    calibration(condition, records_by_condition)[1])
        png = os.path.join(results_dir, name, CURVES_NAME)
        plot_ap_curves({arm: [r["evaluations"] for r in runs]
                        for arm, runs in {**_by_arm(records), **beside}.items()}, png,
                       f"{name}: AP against iterations (line: mean over seeds; band: min to max)")
        paths.append(png)
    with open(paths[0], "w") as f:
        f.write("\n".join(lines))
    return paths
