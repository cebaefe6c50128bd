"""A new user's first command, as they run it: `.venv/bin/docsrag ingest` outside `make`, with none of
Prefect's settings in the environment, on a machine whose model cache is empty (so the ONNX
export and the precision measurement happen during the command), without internet.

What must not reach the terminal: Prefect's "Failed to send telemetry" error, the exporter's
warnings, the progress bar's final line twice. What must: the precision kept and the Prefect server kept
in the background (its UI address), each said once."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.conftest import FAQ, ROOT

DOCSRAG = Path(sys.executable).parent / "docsrag"


class FirstRun(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, releases) -> FirstRun:
    home = tmp_path_factory.mktemp("user")
    # Only what a login shell has: no PREFECT_*, DO_NOT_TRACK, HF_* or DOCSRAG_* (conftest sets some).
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
           "DOCSRAG_HOME": str(home / "docsrag"), "DOCSRAG_MODEL_CACHE": str(home / "model-cache")}
    try:
        done = subprocess.run([str(DOCSRAG), "ingest", "--release", str(releases / FAQ)], env=env, cwd=home,
                              capture_output=True, text=True, timeout=600, check=False)
        yield FirstRun(done.returncode, done.stdout, done.stderr)
    finally:  # the Prefect server it kept in the background (tests/integration/cli/test_background_server.py)
        subprocess.run([str(DOCSRAG), "server", "stop"], env=env, cwd=home, capture_output=True, timeout=120)


def test_first_ingest_succeeds(first_run):
    assert first_run.returncode == 0, first_run.stderr[-3000:]
    assert "49 chunks (49 embedded" in first_run.stdout


def test_no_telemetry_error_without_prefect_settings(first_run):
    assert "telemetry" not in first_run.stderr.lower(), first_run.stderr[-3000:]


def test_the_onnx_export_prints_no_warnings(first_run):
    # Python's warnings (TracerWarning, UserWarning: ...), the quantizer's root-logger notes, the
    # loader's bar; the flow's own WARNING lines about the release (an include not found) stay.
    assert not re.search(r"\w+Warning: |WARNING:root:|Loading weights", first_run.stderr), first_run.stderr[-3000:]


def test_progress_bar_final_line_not_printed_twice(first_run):
    # stderr is a pipe here (a log, CI, `make run | tee`): each redraw lands as text of its own.
    assert first_run.stderr.count("49/49") <= 1, first_run.stderr[-3000:]


def test_the_kept_prefect_server_is_said_once_with_its_ui(first_run):
    assert first_run.stderr.count("its UI at http://127.0.0.1:") == 1, first_run.stderr[-3000:]


def test_the_precision_kept_is_said_once(first_run):
    assert first_run.stderr.count("embedding precision for this CPU") == 1, first_run.stderr[-3000:]


def test_export_runs_in_a_child_process(tmp_path):
    """torch, the tracer and the quantizer stay out of the command's process: their warnings go to a
    pipe (a thread silencing them raced with the command's imports), and their memory with them."""
    script = ("import sys; from pathlib import Path; from docsrag.tasks.embed import embedding, runtime; "
              "folder = Path(embedding._local_model_path('all-MiniLM-L6-v2')); "
              f"print(runtime.exported(folder, 'int8', Path({str(tmp_path)!r})).exists(), 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.stdout.split() == ["True", "False"], done.stderr[-3000:]
    assert done.stderr == ""
