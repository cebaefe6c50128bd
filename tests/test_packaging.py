"""Installing the project: pip builds its metadata with setuptools; nothing it prints should be ours to fix."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

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


def locked_versions() -> dict[str, str]:
    """name -> version of each requirement of requirements.lock that applies to this interpreter."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith((" ", "#", "-")):
            requirement = Requirement(line.rstrip(" \\"))
            if requirement.marker is None or requirement.marker.evaluate():
                pins[canonicalize_name(requirement.name)] = str(requirement.specifier).removeprefix("==")
    return pins


@pytest.mark.skipif(os.environ.get("DOCSRAG_TEST_LATEST") == "1",
                    reason="make test-latest runs the suite on the newest versions the ranges allow, not the lock")
def test_the_installed_versions_are_the_locked_ones():
    """`make test` installs requirements.lock: what the suite passes with is what a clean clone gets."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    locked = locked_versions()
    assert {"prefect", "sqlalchemy", "pymilvus", "milvus-lite", "fastapi", "pydantic", "torch"} <= set(locked)
    assert {name: (pin, installed(name)) for name, pin in locked.items() if installed(name) != pin} == {}


def test_the_lock_keeps_sqlalchemy_below_2_1_and_the_cpu_torch():
    """SQLAlchemy 2.1 stops Prefect 3.8's scheduler (no schedule fires, the error only in the server's
    log); a torch without +cpu drags in gigabytes of CUDA."""
    from packaging.version import Version

    locked = locked_versions()
    assert Version(locked["sqlalchemy"]) < Version("2.1") and locked["torch"].endswith("+cpu")
    assert not [name for name in locked if name.startswith("nvidia-")]
