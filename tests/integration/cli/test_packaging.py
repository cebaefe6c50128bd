"""Installing the project: pip builds its metadata with setuptools; nothing it prints should be ours to fix."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def test_metadata_builds_without_deprecation_warnings(tmp_path):
    """The licence as an SPDX expression (PEP 639, setuptools >= 77): the TOML table form made
    every `pip install -e .` print a SetuptoolsDeprecationWarning."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    for folder in ("docsrag", "flows", "tasks"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "metadata"
    out.mkdir()
    done = subprocess.run([sys.executable, "-W", "always", "-c",
                           f"from setuptools import build_meta; build_meta.prepare_metadata_for_build_wheel({str(out)!r})"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "Deprecat" not in done.stderr, done.stderr
    metadata = next(out.glob("*.dist-info/METADATA")).read_text()
    assert "License-Expression: Apache-2.0" in metadata


def test_the_wheel_holds_one_import_name(tmp_path):
    """Installing docsrag claims the name docsrag and nothing else (it claimed `tasks` and `flows`,
    which an invoke tasks.py or a Celery tasks/ package in the user's folder shadowed)."""
    import zipfile

    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    wheel = zipfile.ZipFile(next(tmp_path.glob("docsrag-*.whl")))
    names = wheel.namelist()
    assert {name.split("/")[0] for name in names if not name.startswith("docsrag-")} == {"docsrag"}
    top_level = next((n for n in names if n.endswith(".dist-info/top_level.txt")), None)
    assert top_level is None or wheel.read(top_level).decode().split() == ["docsrag"]
    assert {"docsrag/flows/api/page.html", "docsrag/tasks/core/settings.py", "docsrag/testing/llm_emulator.py",
            "docsrag/flows/cli/__init__.py", "docsrag/__main__.py"} <= set(names)


def test_a_first_ingest_works_from_a_folder_holding_an_invoke_tasks_py_and_a_flows_package(tmp_path, releases):
    """A user's folder with an invoke ``tasks.py`` (a Celery-style ``tasks/`` is the same case) and a
    ``flows/__init__.py``: docsrag imports only under its own name, and its child
    processes (the ONNX export) start isolated from the folder (``python -I``)."""
    (tmp_path / "tasks.py").write_text("raise SystemExit('the user tasks.py was imported')\n")
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "__init__.py").write_text("raise SystemExit('the user flows package was imported')\n")
    env = {**os.environ, "DOCSRAG_HOME": str(tmp_path / "home"), "PYTHONPATH": str(tmp_path),
           "DOCSRAG_MODEL_CACHE": str(tmp_path / "models"),  # a fresh cache: the model is exported here
           "DOCSRAG_EMBEDDING_PRECISION": "fp32", "DOCSRAG_MULTILINGUAL": "off"}
    done = subprocess.run([str(Path(sys.executable).parent / "docsrag"), "ingest", "--release",
                           str(releases / "milvus_docs_faq_2.4.x_en.zip"), "--json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


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
