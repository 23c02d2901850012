#!/usr/bin/env python
"""The paper's comparison on the shapes set: BN@16, BN@2, GN@2, MABN@2 (same model, data, schedule
and optimizer batch of 16; "@2" arms accumulate 8 micro-batches of 2 images).

    python tools/compare_norms.py --tiny                       # CPU, ≤ 15 min: checks the pipeline
    python tools/compare_norms.py --arms BN@2 MABN@2 --seeds 0 1 --jobs 4   # a piece, on a GPU
    python tools/compare_norms.py --report-only                # merge the pieces in --out

Each run writes OUT/<arm>/seed<k>/; the report (results.md, bbox_AP.png, segm_AP.png, curves.png)
covers every run found in OUT.
"""
import argparse
import os

from mabn_experiments.shapes import generate_shapes_dataset, shapes_dataset_exists
from mabn_experiments.study import ARMS, run_study, summarise

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (train images, val images, image size) of the generated set, and the schedule overrides.
FULL = dict(data=(6000, 500, 128), opts=[])
TINY = dict(data=(400, 60, 96), opts=["SOLVER.MAX_ITER", "12", "SOLVER.STEPS", "()",
                                      "SOLVER.WARMUP_ITERS", "4", "TEST.EVAL_PERIOD", "0",
                                      "MODEL.MABN.WARMUP_ITERS", "2",
                                      "MODEL.MABN.RENORM_WARMUP_ITERS", "6",
                                      "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96",
                                      "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a CPU run of minutes (pipeline check)")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--config-file",
                        default=os.path.join(REPO, "configs", "tiny", "study_R18_FPN_shapes.yaml"))
    parser.add_argument("--out", help="default: output/compare_norms[_tiny]")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args()
    mode = TINY if args.tiny else FULL
    out = args.out or ("output/compare_norms_tiny" if args.tiny else "output/compare_norms")
    num_train, num_val, size = mode["data"]
    dataset_dir = os.path.join("datasets", f"shapes_study_{num_train}_{size}")
    if not args.report_only:
        if not shapes_dataset_exists(dataset_dir, num_train=num_train, num_val=num_val,
                                     image_size=size, seed=1):
            generate_shapes_dataset(dataset_dir, num_train, num_val, size, seed=1)
        run_study(args.config_file, dataset_dir, out, args.arms, args.seeds,
                  [*mode["opts"], *args.opts], args.jobs)
    title = f"shapes {num_train} images at {size} px{' (tiny: pipeline check only)' if args.tiny else ''}"
    print(summarise(out, title))


if __name__ == "__main__":
    main()
