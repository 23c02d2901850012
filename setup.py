"""mabn_det: Moving Average Batch Normalization (Yan et al., ICLR 2020) for Detectron2.

One distribution, two packages. `mabn_det` is the plugin (layer, config, registered builders and
heads, trainer, export); `pip install -e .` installs only what it needs. `mabn_experiments` (the
synthetic shapes set, the demo, the norm study, the Fashion-MNIST proxy, their plots) ships beside
it but runs only with its extra: without it, importing the package raises an ImportError naming
`pip install -e ".[experiments]"`. Each part declares what its code imports, which
tests/test_packaging.py checks against the installed metadata.

Detectron2 itself is not on PyPI and is therefore not listed: `make setup` (or
`python tools/install_detectron2.py`) installs it, with the run-time packages its wheel needs.
"""
from setuptools import find_packages, setup

PLUGIN = [
    "torch>=2.0",
    "numpy",
    "tqdm",
    # Detectron2 needs these at run time and not every build of it declares them: no build declares
    # torchvision (ROIAlign, NMS), PyPI's sal-detectron2 omits fvcore and iopath, and the Trainer's
    # COCO evaluation runs pycocotools.
    "torchvision",
    "fvcore",
    "iopath",
    "pycocotools",
]
EXPERIMENTS = [
    "pillow",
    "matplotlib",
    "scipy",
    # Photographs bundled with scikit-image are backgrounds of the synthetic shapes set.
    "scikit-image",
]
# The fused CUDA path (MABN2d(kernel="triton")); CUDA builds of torch on Linux already require it.
TRITON = ['triton; platform_system == "Linux"']
# benchmarks/: bench_inference.py exports to ONNX and draws with the experiments' plotting.
BENCH = ["onnx", "onnxruntime", *EXPERIMENTS]
# Everything the test suite imports: it runs the experiments, the benchmarks' smoke tests and the
# Triton kernels under Triton's CPU interpreter.
TEST = ["pytest", "pytest-timeout", "packaging", *BENCH, *TRITON]

setup(
    name="mabn_det",
    version="0.1.0",
    description="Moving Average Batch Normalization for Detectron2: small-batch detection "
    "training without cross-GPU synchronisation",
    license="Apache-2.0",
    packages=find_packages(include=("mabn_det", "mabn_det.*",
                                    "mabn_experiments", "mabn_experiments.*")),
    python_requires=">=3.10",
    install_requires=PLUGIN,
    extras_require={"experiments": EXPERIMENTS, "triton": TRITON, "bench": BENCH, "test": TEST},
)
