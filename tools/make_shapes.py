#!/usr/bin/env python
"""Generate the synthetic shapes instance-segmentation dataset (COCO format).

Usage:
    python tools/make_shapes.py --out datasets/shapes --train 2000 --val 500 --size 128 --seed 0
    python tools/make_shapes.py --style simple ...   # fewer, larger objects, no clutter
    python tools/make_shapes.py --style demo ...     # 3 classes told apart by outline and colour
    python tools/make_shapes.py --style study ...    # demo scenes, strong per-image photometry

Writes OUT/{train,val}/*.png and OUT/annotations/instances_{train,val}.json. Equal arguments give
byte-identical files. ``mabn_experiments.shapes.register_shapes_datasets()`` registers
``$DETECTRON2_DATASETS/shapes`` (default ``datasets/shapes``, the default --out) as ``shapes_train``
/ ``shapes_val``.
"""
import argparse

from mabn_experiments.shapes import (
    DEFAULT_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    SCENE_STYLES,
    default_shapes_dir,
    generate_shapes_dataset,
    require_integer_at_least,
)


def integer_at_least(minimum: int):
    """Argparse type accepting an int ≥ ``minimum``; argparse prefixes the flag to its errors."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = text
        try:
            require_integer_at_least("", value, minimum)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).strip()) from None
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``sys.argv[1:]`` when ``argv`` is None)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=default_shapes_dir(),
                        help="dataset directory (default: %(default)s)")
    parser.add_argument("--train", type=integer_at_least(1), default=2000,
                        help="number of training images (default: %(default)s)")
    parser.add_argument("--val", type=integer_at_least(1), default=500,
                        help="number of validation images (default: %(default)s)")
    parser.add_argument("--size", type=integer_at_least(MIN_IMAGE_SIZE), default=DEFAULT_IMAGE_SIZE,
                        help="side of the square images in pixels (default: %(default)s)")
    parser.add_argument("--seed", type=integer_at_least(0), default=0,
                        help="random seed; equal seeds give identical files (default: %(default)s)")
    parser.add_argument("--style", choices=sorted(SCENE_STYLES), default="standard",
                        help="standard: crowded, small objects, clutter; simple: fewer, larger "
                        "objects; demo: 3 colour-coded classes on grey; study: the demo's scenes "
                        "with strong per-image photometric changes (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Generate the dataset that the command line asks for."""
    args = parse_args(argv)
    out_dir = generate_shapes_dataset(
        args.out, args.train, args.val, args.size, args.seed, progress=not args.no_progress,
        style=args.style,
    )
    print(f"wrote {args.train} train + {args.val} val {args.style} images of {args.size} px "
          f"to {out_dir}")


if __name__ == "__main__":
    main()
