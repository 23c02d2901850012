"""tools/install_detectron2.py refuses a wheel whose hash is wrong, before installing anything, and
together with the plugin's requirements installs everything the plugin loads."""
import importlib.metadata
import json
import subprocess
import sys

from packaging.requirements import Requirement

from tests.common import FIRST_PARTY, REPO, distribution_key, load_tool


def _pip_freeze():
    return subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True,
                          check=True).stdout


def test_wrong_wheel_is_refused_and_nothing_changes(tmp_path):
    fake = tmp_path / "sal_detectron2-0.7.2-cp310-none-any.whl"
    fake.write_bytes(b"not the wheel we expect")
    before = _pip_freeze()
    result = subprocess.run(
        [sys.executable, f"{REPO}/tools/install_detectron2.py", "--force", "--wheel", str(fake)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561" in result.stderr
    assert "Nothing was installed" in result.stderr
    assert _pip_freeze() == before


def test_existing_detectron2_is_kept():
    result = subprocess.run([sys.executable, f"{REPO}/tools/install_detectron2.py"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "already installed" in result.stdout


def _requirement_closure(roots) -> set:
    """Normalised names of `roots` and of the installed distributions they require, transitively."""
    seen, queue = set(), [Requirement(r) for r in roots]
    while queue:
        requirement = queue.pop()
        name = distribution_key(requirement.name)
        if name in seen or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            queue.extend(Requirement(r) for r in importlib.metadata.requires(name) or [])
        except importlib.metadata.PackageNotFoundError:
            pass
    return seen


def test_what_the_plugin_loads_is_declared_or_installed_with_detectron2():
    """A fresh clone's set-up installs everything `import mabn_det` and its trainer load: each
    distribution they load is required by mabn_det, by the installed Detectron2, by
    tools/install_detectron2.py's pins, or by one of those, transitively."""
    code = ("import json, sys\nimport mabn_det\nfrom mabn_det.engine import Trainer\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=REPO, check=True)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    providers = importlib.metadata.packages_distributions()
    (detectron2,) = providers["detectron2"]
    plugin = [r for r in importlib.metadata.requires("mabn_det") or [] if "extra ==" not in r]
    pins = load_tool("install_detectron2").RUNTIME_PINS
    closure = _requirement_closure([*plugin, *pins, detectron2])
    undeclared = {module: providers[module] for module in loaded
                  if module in providers and module not in FIRST_PARTY
                  and not {distribution_key(d) for d in providers[module]} & closure}
    assert not undeclared, f"loaded, but no requirement brings them: {undeclared}"
