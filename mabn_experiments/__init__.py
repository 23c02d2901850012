"""Experiments around mabn_det, kept apart from the plugin: the synthetic shapes set, the demo
behind `make demo`, the norm study, the Fashion-MNIST proxy, and their plots. Nothing in `mabn_det`
imports this package.

It ships in the `mabn_det` distribution but needs the packages of its extra; importing it without
them raises an ImportError that names the install command.
"""
import importlib.metadata

EXTRA = "experiments"


def _missing_requirements(distribution: str = "mabn_det", extra: str = EXTRA) -> list[str]:
    """Names of the requirements of `distribution[extra]` that are not installed.

    Empty when `distribution` is not installed (run from a source tree): nothing to check against.
    """
    try:
        requirements = importlib.metadata.requires(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    missing = []
    for requirement in requirements:
        spec, _, marker = requirement.partition(";")
        if f'extra == "{extra}"' not in marker:
            continue
        name = spec.strip().split("[")[0]
        for operator in "<>=!~ (":
            name = name.split(operator)[0]
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


_missing = _missing_requirements()
if _missing:
    raise ImportError(
        f"mabn_experiments needs {', '.join(_missing)}, which the plugin alone does not install: "
        f'run `pip install -e ".[{EXTRA}]"` in the mabn_det checkout')
