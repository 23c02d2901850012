#!/usr/bin/env python
"""Install Detectron2 into the running Python environment, unless it already has one.

Detectron2 is not published on PyPI. PyPI's ``sal-detectron2==0.7.2`` is an unmodified build of
upstream detectron2 (main, 2024), but only as a CPython 3.10 wheel whose compiled ``_C`` extension
cannot load elsewhere. Nothing we use needs ``_C`` (ROIAlign and NMS come from torchvision), so this
script downloads that wheel, checks its sha256, drops the extension, retags the wheel as pure Python
and installs it.

Usage:
    python tools/install_detectron2.py            # no-op when `import detectron2` works
    python tools/install_detectron2.py --wheel F  # use an already downloaded wheel file
"""
import argparse
import glob
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "sal-detectron2==0.7.2"
SHA256 = "491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"
# detectron2.model_zoo imports pkg_resources (removed in setuptools 81); the wheel requires numpy<2;
# detectron2.data.transforms imports cv2, which no Detectron2 build declares (installed here, with
# Detectron2, so that an environment's own OpenCV build is never paired with a second one).
RUNTIME_PINS = ["setuptools<81", "numpy<2", "wheel", "opencv-python-headless"]


def pip(*args: str) -> None:
    subprocess.check_call([sys.executable, "-m", "pip", "--disable-pip-version-check", *args])


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(workdir: str) -> str:
    pip("download", "--no-deps", "--only-binary=:all:", "--python-version", "3.10",
        "-d", workdir, PACKAGE)
    wheels = glob.glob(os.path.join(workdir, "*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"expected one downloaded wheel in {workdir}, found {wheels}")
    return wheels[0]


def verify(wheel: str) -> None:
    actual = sha256_of(wheel)
    if actual != SHA256:
        raise SystemExit(
            f"refusing to install {wheel}: its sha256 is {actual}, expected {SHA256} "
            f"({PACKAGE}). Nothing was installed."
        )


def make_pure(wheel: str, workdir: str) -> str:
    """Unpack `wheel`, delete the compiled extension, retag it py3-none-any; return the new wheel."""
    unpacked = os.path.join(workdir, "unpacked")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(unpacked)
    dist_infos = [os.path.join(unpacked, d) for d in os.listdir(unpacked) if d.endswith(".dist-info")]
    if len(dist_infos) != 1:
        raise SystemExit(f"{wheel} should hold one .dist-info folder, found {dist_infos}")
    root = dist_infos[0]
    for so in glob.glob(os.path.join(unpacked, "detectron2", "_C*.so")):
        os.remove(so)
    wheel_meta = os.path.join(root, "WHEEL")
    with open(wheel_meta) as f:
        lines = f.read().splitlines()
    retagged = []
    for line in lines:
        if line.startswith("Tag:"):
            line = "Tag: py3-none-any"
        elif line.startswith("Root-Is-Purelib:"):
            line = "Root-Is-Purelib: true"
        retagged.append(line)
    with open(wheel_meta, "w") as f:
        f.write("\n".join(retagged) + "\n")
    # `wheel pack` rewrites RECORD, so the deleted .so is dropped from it too.
    outdir = os.path.join(workdir, "pure")
    os.makedirs(outdir)
    subprocess.check_call([sys.executable, "-m", "wheel", "pack", "-d", outdir, unpacked])
    (pure,) = glob.glob(os.path.join(outdir, "*.whl"))
    return pure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", help="a downloaded sal-detectron2 wheel (skips the download)")
    parser.add_argument("--force", action="store_true", help="install even if detectron2 imports")
    args = parser.parse_args()
    if not args.force and importlib.util.find_spec("detectron2") is not None:
        print("detectron2 is already installed; leaving it as it is.")
        return
    with tempfile.TemporaryDirectory() as workdir:
        wheel = args.wheel or download(workdir)
        verify(wheel)
        pip("install", "-q", *RUNTIME_PINS)
        pure = make_pure(wheel, workdir)
        pip("install", "-q", pure)
    print("detectron2 installed from", PACKAGE)


if __name__ == "__main__":
    main()
