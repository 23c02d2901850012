"""The installed `mabn_det` distribution declares what each part of the repository imports.

Read from the installed metadata (what `pip install -e ".[extra]"` acts on) and from the source
(every import statement, parsed): the plugin's imports must be covered by its own requirements, and
each extra's code by the plugin's requirements plus that extra's. Detectron2 is exempt: it is not on
PyPI, and tools/install_detectron2.py installs it.
"""
import ast
import importlib.metadata
import os
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

from tests.common import FIRST_PARTY, REPO, distribution_key

# Import names whose distribution is named otherwise.
DISTRIBUTION_OF = {"cv2": "opencv-python-headless", "PIL": "pillow", "skimage": "scikit-image",
                   "sklearn": "scikit-learn", "yaml": "pyyaml"}
# Not a PyPI requirement: installed by tools/install_detectron2.py when missing.
EXEMPT = {"detectron2"}
TRITON_PATH = os.path.join("mabn_det", "layers", "mabn_triton.py")
# (code, the extra it runs under; None = the plugin alone). mabn_triton.py runs only when
# kernel="triton" is asked for, so Triton is an extra of its own.
PARTS = [
    ("mabn_det", None),
    (TRITON_PATH, "triton"),
    ("mabn_experiments", "experiments"),
    ("tools", "experiments"),
    ("benchmarks", "bench"),
    ("tests", "test"),
]


def python_files(path: str):
    path = os.path.join(REPO, path)
    if path.endswith(".py"):
        yield path
        return
    for root, _, files in os.walk(path):
        yield from (os.path.join(root, f) for f in sorted(files) if f.endswith(".py"))


def imported_top_level_names(path: str, skip: tuple = ()) -> dict:
    """{top-level module name: first file importing it} over the absolute imports under `path`."""
    names = {}
    for file in python_files(path):
        if os.path.relpath(file, REPO) in skip:
            continue
        local = {f[:-3] for f in os.listdir(os.path.dirname(file)) if f.endswith(".py")}
        with open(file) as f:
            tree = ast.parse(f.read(), file)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top not in local:  # scripts importing their neighbours (benchmarks/)
                    names.setdefault(top, os.path.relpath(file, REPO))
    return names


def declared(extra: str | None) -> set:
    """Normalised names of what `pip install mabn_det[extra]` installs on this platform."""
    names = set()
    for text in importlib.metadata.requires("mabn_det") or []:
        requirement = Requirement(text)
        environment = {"extra": extra or ""}
        if requirement.marker is None or requirement.marker.evaluate(environment):
            names.add(distribution_key(requirement.name))
    return names


def undeclared_imports(path: str, extra: str | None) -> dict:
    """{distribution: importing file} for the imports under `path` that mabn_det[extra] lacks."""
    covered = declared(extra)
    skip = (TRITON_PATH,) if extra is None else ()
    missing = {}
    for name, file in imported_top_level_names(path, skip).items():
        if name in sys.stdlib_module_names or name in EXEMPT:
            continue
        if name in FIRST_PARTY:
            # Importing the experiments package needs its extra.
            needed = declared("experiments") if name == "mabn_experiments" else set()
            missing.update({d: file for d in needed - covered})
            continue
        distribution = distribution_key(DISTRIBUTION_OF.get(name, name))
        if distribution not in covered:
            missing[distribution] = file
    return missing


@pytest.mark.parametrize("path, extra", PARTS, ids=[p for p, _ in PARTS])
def test_requirements_cover_imports(path, extra):
    missing = undeclared_imports(path, extra)
    assert not missing, (
        f"{path} imports distributions that mabn_det[{extra or ''}] does not declare: {missing}. "
        "Declare them in setup.py; if they are, the installed metadata is stale: re-run "
        "`make setup`")


def test_plugin_declares_no_numpy_pin_and_nothing_of_the_experiments():
    plugin = [Requirement(r) for r in importlib.metadata.requires("mabn_det") or []
              if "extra ==" not in r]
    names = {distribution_key(r.name) for r in plugin}
    assert not {r.name: str(r.specifier) for r in plugin if distribution_key(r.name) == "numpy"
                and r.specifier}, "the plugin must not pin numpy"
    assert names.isdisjoint({"scikit-image", "scipy", "matplotlib", "opencv-python-headless",
                             "tensorboard", "onnx", "onnxruntime"}), names


def test_experiments_without_their_extra_name_the_install_command():
    """With scikit-image hidden, `import mabn_experiments` fails with the pip command."""
    code = (
        "import importlib.metadata as md, sys\n"
        "real = md.distribution\n"
        "def fake(name):\n"
        "    if name == 'scikit-image':\n"
        "        raise md.PackageNotFoundError(name)\n"
        "    return real(name)\n"
        "md.distribution = fake\n"
        "import mabn_experiments\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "scikit-image" in result.stderr and 'pip install -e ".[experiments]"' in result.stderr
