"""mabn_det: Moving Average Batch Normalization (Yan et al., ICLR 2020) for Detectron2.

Two packages: `mabn_det`, the plugin (layer, config, registered builders and heads, trainer,
export), and `mabn_experiments` beside it (synthetic shapes set, demo, norm study, plots), which
alone needs scikit-image, SciPy, matplotlib and OpenCV.

Detectron2 itself is not on PyPI and is therefore not listed below; `make setup` (or
`python tools/install_detectron2.py`) installs it when it is missing.
"""
from setuptools import find_packages, setup

setup(
    name="mabn_det",
    version="0.1.0",
    description="Moving Average Batch Normalization for Detectron2: small-batch detection "
    "training without cross-GPU synchronisation",
    packages=find_packages(exclude=("configs", "tests", "tests.*")),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.0",
        "torchvision",
        # Detectron2 imports these without declaring them.
        "fvcore",
        "iopath",
        "pycocotools",
        "numpy<2",
        # The rest is for mabn_experiments. Plots:
        "matplotlib",
        # Detectron2's Visualizer (prediction pictures) imports cv2.
        "opencv-python-headless",
        "tqdm",
        "tensorboard",
        # Natural photographs used as backgrounds of the synthetic shapes set.
        "scikit-image",
    ],
    # onnxruntime in "test" too: the smoke test of bench_inference.py would otherwise skip in CI.
    extras_require={"test": ["pytest", "pytest-timeout", "onnx", "onnxruntime"],
                    # benchmarks/bench_inference.py
                    "bench": ["onnx", "onnxruntime"]},
)
