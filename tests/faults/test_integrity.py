"""Integrity (issue 14): files that honour the umask, no torch with CVE-2025-32434."""
import os
import stat

import pytest
import torch
from packaging.requirements import Requirement

from hclafter.checkpoint import atomic_write_text, save_checkpoint

from ..conftest import ROOT


# 12. files honour the umask


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_honour_the_umask(umask, tmp_path):
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "config.yaml", "seed: 0\n")
        save_checkpoint(tmp_path / "model.safetensors", {"w": torch.zeros(2)})
    finally:
        os.umask(previous)
    for name in ("config.yaml", "model.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask


# 13. torch without CVE-2025-32434


def test_dependencies_exclude_torch_before_2_6():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = {r.name: r.specifier for r in map(Requirement, project["dependencies"])}
    assert "2.5.1" not in requirements["torch"] and "2.6.0" in requirements["torch"]
    assert "0.20.1" not in requirements["torchvision"] and "0.21.0" in requirements["torchvision"]
