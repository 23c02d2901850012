#!/usr/bin/env python
"""The norm study: BN@16, BN@2, GN@2, MABN@2 (and MABN@2 with a buffer of 1) in every condition of
mabn_experiments/conditions.py (same model, data, schedule and optimizer batch of 16 within a
condition; "@2" arms accumulate 8 micro-batches of 2 images).

    python tools/compare_norms.py --tiny                          # CPU, minutes: the pipeline
    python tools/compare_norms.py --condition plain trees --commit  # the study, resumable
    python tools/compare_norms.py --report-only                   # rebuild the report
    python tools/reproduce_run.py docs/study/plain/runs/BN@2_seed0.json   # re-run one record

Runs go seed by seed, so every condition and arm gets its first seed before any gets a second.
Each (condition, arm, seed) trains in OUT/<condition>/<arm>/seed<k>/ (logs, a checkpoint at every
evaluation, metrics), resuming there if it was interrupted; a finished run writes
RESULTS/<condition>/runs/<arm>_seed<k>.json, with its code commit and the command that re-runs it,
and is skipped from then on. After each run the report is rebuilt (RESULTS/results.md,
RESULTS/<condition>/ap_curves.png); with --commit the record and the report, nothing else, are
committed in the git repository that holds RESULTS.
"""
import argparse
import os
import shlex

from mabn_experiments.conditions import CONDITIONS, TINY_OPTS, prepare_dataset
from mabn_experiments.runs import commit_files, threads_per_job
from mabn_experiments.study import ARMS, StudyRun, extract_backbone, run_study, started_threads
from mabn_experiments.study_report import REPORT_NAME, write_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = "tools/compare_norms.py"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--condition", nargs="+", choices=list(CONDITIONS),
                        default=list(CONDITIONS), help="default: all")
    parser.add_argument("--tiny", action="store_true",
                        help="4 iterations on 64 px images: checks the pipeline, ranks nothing")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS),
                        help="only these of each condition's arms")
    parser.add_argument("--seeds", nargs="+", type=int, help="only these of each condition's seeds")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default: %(default)s)")
    parser.add_argument("--threads", type=int,
                        help="torch threads per new run (default: the cores divided by --jobs); "
                        "results depend on it in the last bits, so a record names it and an "
                        "interrupted run resumes with the count it started with")
    parser.add_argument("--out", help="training outputs and the generated data (default: "
                        "output/compare_norms, or output/compare_norms_tiny with --tiny)")
    parser.add_argument("--results", help="run records and report (default: docs/study in the "
                        "repository, or OUT/results with --tiny)")
    parser.add_argument("--commit", action="store_true",
                        help="git-commit each finished run's record and the report")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild the report from the records, train nothing")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser.parse_args(argv)


class Planner:
    """Makes the StudyRuns that the arguments ask for, sharing each condition's data."""

    def __init__(self, args: argparse.Namespace, out: str, threads: int):
        self.args, self.out, self.threads = args, out, threads
        self._datasets = {}

    def run(self, name: str, arm: str, seed: int) -> StudyRun:
        """The run of (condition `name`, `arm`, `seed`)."""
        condition, args = CONDITIONS[name], self.args
        if name not in self._datasets:
            self._datasets[name] = prepare_dataset(condition, os.path.join(self.out, "datasets"),
                                                   tiny=args.tiny)
        output_dir = os.path.join(self.out, name, arm, f"seed{seed}")
        # An interrupted run resumes with the thread count it started with (results depend on it).
        threads = started_threads(output_dir) or self.threads
        opts = [*condition.opts, *(TINY_OPTS if args.tiny else ()), *args.opts]
        precise = (2 if args.tiny and condition.precise_bn_batches
                   else condition.precise_bn_batches)
        command = ["python", TOOL, "--condition", name, "--arms", arm, "--seeds", str(seed),
                   "--threads", str(threads), *(["--tiny"] if args.tiny else []), *args.opts]
        backbone = (self.backbone_path(condition.pretrained_from)
                    if condition.pretrained_from else "")
        return StudyRun(name, arm, seed, condition.config_path, condition.data,
                        self._datasets[name], output_dir, opts, threads, precise,
                        shlex.join(command), backbone)

    def requested(self) -> list:
        """Every run the arguments ask for: seed by seed, then condition, then arm."""
        args = self.args
        seeds = sorted({s for name in args.condition for s in CONDITIONS[name].seeds}
                       | set(args.seeds or ()))
        return [self.run(name, arm, seed) for seed in seeds for name in args.condition
                if seed in (args.seeds or CONDITIONS[name].seeds)
                for arm in CONDITIONS[name].arms if not args.arms or arm in args.arms]

    def backbone_path(self, source: str) -> str:
        """Where the pretrained backbone of condition `source` is written."""
        return os.path.join(self.out, source, "backbone.pth")

    def pretraining(self, runs: list) -> list:
        """(source run, backbone path) of every pretrained backbone that `runs` start from: the
        source condition's BN@16, seed 0."""
        sources = {CONDITIONS[r.condition].pretrained_from for r in runs} - {None}
        return [(self.run(name, "BN@16", 0), self.backbone_path(name)) for name in sorted(sources)]


def main(argv=None) -> None:
    args = parse_args(argv)
    out = os.path.abspath(args.out or ("output/compare_norms_tiny" if args.tiny
                                       else "output/compare_norms"))
    results = os.path.abspath(args.results or (os.path.join(out, "results") if args.tiny
                                               else os.path.join(REPO, "docs", "study")))
    os.makedirs(results, exist_ok=True)
    if args.report_only:
        paths = write_report(results)
        if args.commit:
            commit_files(paths, "study: report rebuilt from the run records")
        print(open(paths[0]).read())
        return

    def on_result(record, path):
        report = write_report(results)
        if args.commit:
            aps = " / ".join(f"{record[k]:.1f} {name}" for k, name in (
                ("bbox_AP", "box"), ("segm_AP", "mask")) if k in record)
            commit_files([path, *report], f"study {record['condition']}: {record['arm']} seed "
                         f"{record['seed']}, {record['iterations']} iterations: {aps} AP")

    planner = Planner(args, out, args.threads or threads_per_job(args.jobs))
    runs = planner.requested()
    # The runs before the first that starts from a pretrained backbone train beside the runs
    # that make those backbones; the rest follow once the backbones are written.
    sources = planner.pretraining(runs)
    missing = [source for source, _ in sources
               if not os.path.exists(os.path.join(source.output_dir, "model_final.pth"))]
    split = next((i for i, run in enumerate(runs) if run.pretrained_backbone), len(runs))
    run_study([*missing, *runs[:split]], results, args.jobs, on_result=on_result, needed=missing)
    for source, backbone in sources:
        extract_backbone(os.path.join(source.output_dir, "model_final.pth"), backbone)
    run_study(runs[split:], results, args.jobs, on_result=on_result)
    print(open(os.path.join(results, REPORT_NAME)).read())


if __name__ == "__main__":
    main()
