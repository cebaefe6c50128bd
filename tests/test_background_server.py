"""Prefect's own background server, kept between commands (`prefect server start --background`):
commands find it through PREFECT_HOME with no PREFECT_API_URL set, and `prefect server stop`
leaves no process behind. The real Prefect CLI and server, the real console script."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import FAQ

BIN = Path(sys.executable).parent


def _free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


class Background:
    def __init__(self, home: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(home)}
        subprocess.run([str(BIN / "prefect"), "server", "start", "--background", "--host", "127.0.0.1", "--port",
                        self.port], env=self.env, capture_output=True, check=True, timeout=60)
        self.pid = int((home / "server.pid").read_text())
        deadline = time.monotonic() + 120
        while not self.answers() and time.monotonic() < deadline:
            time.sleep(0.3)

    def answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        subprocess.run([str(BIN / "prefect"), "server", "stop"], env=self.env, capture_output=True, check=False,
                       timeout=60)

    def processes_left(self) -> list[int]:
        """The server's pid while alive, and any process whose command line names its port."""
        left = []
        for entry in (e for e in Path("/proc").iterdir() if e.name.isdigit()):
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue  # exited meanwhile
            if int(entry.name) == self.pid or self.port.encode() in argv:
                left.append(int(entry.name))
        return left


@pytest.fixture(scope="module")
def background(tmp_path_factory):
    server = Background(tmp_path_factory.mktemp("prefect-home"))
    yield server
    server.stop()


def test_a_command_without_prefect_api_url_runs_on_the_background_server(background, releases, tmp_path):
    assert background.answers()
    done = subprocess.run([str(BIN / "docsrag"), "ingest", "--release", str(releases / FAQ), "--json"],
                          env={**background.env, "DOCSRAG_HOME": str(tmp_path)}, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.splitlines()[-1])
    runs = httpx.post(f"{background.url}/flow_runs/filter", json={}, timeout=10).json()
    assert [r["name"] for r in runs] == [f"ingest {summary['version']} (49 new)"]
    assert runs[0]["state_type"] == "COMPLETED"
    # A temporary server would share PREFECT_HOME's database (the run above would be there too) but
    # costs its start: 3.6-5.9 s of prefect-api on 2 cores, against 0.35-0.6 s with the kept server.
    assert summary["stages"]["prefect-api"] < 2.0, summary["stages"]


def test_stop_leaves_no_process(background):
    background.stop()
    deadline = time.monotonic() + 30
    while background.processes_left() and time.monotonic() < deadline:
        time.sleep(0.2)  # uvicorn's graceful shutdown takes a second or two
    assert background.processes_left() == []
    assert not background.answers()
