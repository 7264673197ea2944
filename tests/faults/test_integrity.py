"""Integrity (issue 14): no torch with CVE-2025-32434."""
import pytest
from packaging.requirements import Requirement

from ..conftest import ROOT


# 13. torch without CVE-2025-32434


def test_dependencies_exclude_torch_before_2_6():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = {r.name: r.specifier for r in map(Requirement, project["dependencies"])}
    assert "2.5.1" not in requirements["torch"] and "2.6.0" in requirements["torch"]
    assert "0.20.1" not in requirements["torchvision"] and "0.21.0" in requirements["torchvision"]
