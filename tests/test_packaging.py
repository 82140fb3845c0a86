"""Packaging metadata: the version is single-sourced and the metadata is complete (cheap: no wheel
is built; `pip wheel . --no-build-isolation --no-deps` is the documented build)."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import Requirement
from setuptools.config.pyprojecttoml import read_configuration

import torchrec_tt
from torchrec_tt import version

ROOT = Path(__file__).resolve().parent.parent


def _pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            pkg, _, ver = line.partition("==")
            pins[pkg.lower()] = ver
    return pins


def test_version_is_single_sourced() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", torchrec_tt.__version__)
    assert torchrec_tt.__version__ == version.__version__
    # What the build reads (setuptools expands pyproject's dynamic version as pip does).
    project = read_configuration(ROOT / "pyproject.toml")["project"]
    assert project["version"] == torchrec_tt.__version__
    assert "version=" not in (ROOT / "setup.py").read_text()
    assert f"## {torchrec_tt.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_metadata_is_complete() -> None:
    config = read_configuration(ROOT / "pyproject.toml")
    project = config["project"]
    assert project["name"] == "torchrec-tt"
    assert project["requires-python"] == ">=3.11"
    assert project["license"] == "BSD-3-Clause"
    assert "BSD 3-Clause" in (ROOT / "LICENSE").read_text()
    assert {"setuptools>=77", "wheel", "torch"} <= set(config["build-system"]["requires"])
    assert (ROOT / "torchrec_tt" / "py.typed").exists()
    # Every runtime requirement of requirements/ is declared, at a range holding its pin.
    declared = {Requirement(d).name.lower(): Requirement(d) for d in project["dependencies"]}
    runtime = {**_pins("torch.txt"), **_pins("no-deps.txt"), **_pins("base.txt")}
    for pkg in ("torch", "torchrec", "tensordict", "torchmetrics", "tqdm", "pyre-extensions",
                "typing-inspect", "iopath", "numpy"):
        assert pkg in declared, pkg
        assert declared[pkg].specifier.contains(runtime[pkg]), (pkg, declared[pkg], runtime[pkg])
