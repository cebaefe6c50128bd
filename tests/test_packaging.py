"""Installing the project: pip builds its metadata with setuptools; nothing it prints should be ours to fix."""

from __future__ import annotations

import shutil
import subprocess
import sys

from tests.conftest import ROOT


def test_metadata_builds_without_deprecation_warnings(tmp_path):
    """The licence as an SPDX expression (PEP 639, setuptools >= 77): the TOML table form made
    every `pip install -e .` print a SetuptoolsDeprecationWarning."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    for package in ("flows", "flows/cli", "tasks"):
        (tmp_path / package).mkdir(parents=True)
        (tmp_path / package / "__init__.py").touch()
    (tmp_path / "flows" / "page.html").touch()
    out = tmp_path / "metadata"
    out.mkdir()
    done = subprocess.run([sys.executable, "-W", "always", "-c",
                           f"from setuptools import build_meta; build_meta.prepare_metadata_for_build_wheel({str(out)!r})"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "Deprecat" not in done.stderr, done.stderr
    metadata = next(out.glob("*.dist-info/METADATA")).read_text()
    assert "License-Expression: Apache-2.0" in metadata
