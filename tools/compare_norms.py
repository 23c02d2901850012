#!/usr/bin/env python
"""The paper's comparison on the "study" shapes style: BN@16, BN@2, GN@2, MABN@2 and MABN@2 with a
buffer of 1 (same model, data, schedule and optimizer batch of 16; "@2" arms accumulate 8
micro-batches of 2 images).

    python tools/compare_norms.py --tiny                 # CPU, a minute: checks the pipeline
    python tools/compare_norms.py --out /work/study-output --commit    # the study, resumable
    python tools/compare_norms.py --report-only          # rebuild the report from the records

Each (arm, seed) trains in OUT/<arm>/seed<k>/ (logs, checkpoints at every evaluation, metrics),
resuming there if it was interrupted; a finished run writes RESULTS/runs/<arm>_seed<k>.json and is
skipped from then on. After each run the report (RESULTS/results.md, RESULTS/ap_curves.png) is
rebuilt, and with --commit the record and the report, and nothing else, are committed in the git
repository that holds RESULTS.
"""
import argparse
import os
import shlex
import sys

from mabn_det.config import load_config
from mabn_experiments.runs import commit_files, threads_per_job
from mabn_experiments.shapes import generate_shapes_dataset, shapes_dataset_exists
from mabn_experiments.study import ARMS, StudyRun, run_study, write_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STYLE = "study"
DATA_SEED = 1
# (train images, val images) of the generated set, and the config overrides of each mode.
FULL = dict(data=(3000, 300), opts=[], precise_bn_batches=100)
TINY = dict(data=(24, 6), precise_bn_batches=2,
            opts=["SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "2",
                  "TEST.EVAL_PERIOD", "2", "SOLVER.CHECKPOINT_PERIOD", "2",
                  "MODEL.MABN.WARMUP_ITERS", "1", "MODEL.MABN.RENORM_WARMUP_ITERS", "2",
                  "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
                  "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="4 iterations on 64 px images: checks the pipeline, ranks nothing")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default: %(default)s)")
    parser.add_argument("--threads", type=int,
                        help="torch threads per run (default: the cores divided by --jobs)")
    parser.add_argument("--config-file",
                        default=os.path.join(REPO, "configs", "tiny", "study_R18_FPN_shapes.yaml"))
    parser.add_argument("--out", help="training outputs and the generated data (default: "
                        "output/compare_norms, or output/compare_norms_tiny with --tiny)")
    parser.add_argument("--results", help="run records and report (default: docs/study in the "
                        "repository, or OUT/results with --tiny)")
    parser.add_argument("--precise-bn-batches", type=int,
                        help="training batches of the extra PreciseBN evaluation of MABN arms, 0 "
                        f"for none (default: {FULL['precise_bn_batches']})")
    parser.add_argument("--commit", action="store_true",
                        help="git-commit each finished run's record and the report")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild the report from the records, train nothing")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    mode = TINY if args.tiny else FULL
    out = os.path.abspath(args.out or ("output/compare_norms_tiny" if args.tiny
                                       else "output/compare_norms"))
    results = os.path.abspath(args.results or (os.path.join(out, "results") if args.tiny
                                               else os.path.join(REPO, "docs", "study")))
    os.makedirs(results, exist_ok=True)

    def commit(record, paths):
        if args.commit:
            final = f"{record['bbox_AP']:.1f} box / {record['segm_AP']:.1f} mask AP"
            commit_files(paths, f"study: {record['arm']} seed {record['seed']}, "
                         f"{record['iterations']} iterations: {final}")

    if args.report_only:
        paths = write_report(results)
        if args.commit:
            commit_files(paths, "study: report rebuilt from the run records")
        print(open(paths[0]).read())
        return
    opts = [*mode["opts"], *args.opts]
    size = load_config(args.config_file)
    size.merge_from_list(opts)
    num_train, num_val = mode["data"]
    image_size = size.INPUT.MIN_SIZE_TEST
    dataset_dir = os.path.join(out, "datasets",
                               f"{STYLE}_{num_train}_{image_size}px_seed{DATA_SEED}")
    if not shapes_dataset_exists(dataset_dir, num_train=num_train, num_val=num_val,
                                 image_size=image_size, seed=DATA_SEED, style=STYLE):
        generate_shapes_dataset(dataset_dir, num_train, num_val, image_size, seed=DATA_SEED,
                                style=STYLE)
    precise = (mode["precise_bn_batches"] if args.precise_bn_batches is None
               else args.precise_bn_batches)
    threads = args.threads or threads_per_job(args.jobs)
    runs = [StudyRun(arm, seed, os.path.abspath(args.config_file), dataset_dir,
                     os.path.join(out, arm, f"seed{seed}"), opts, threads, precise)
            for seed in args.seeds for arm in args.arms]
    command = shlex.join(["python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
    run_study(runs, results, args.jobs, command, on_result=commit)
    print(open(os.path.join(results, "results.md")).read())


if __name__ == "__main__":
    main()
