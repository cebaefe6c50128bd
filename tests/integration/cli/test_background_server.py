"""Prefect's server kept in the background between commands, the default with no PREFECT_API_URL
(flows/cli/local_server.py): the first command starts it and says where its UI is, the next ones use it
and pay no server start, `docsrag server stop` leaves no process behind; a server Prefect's own
`prefect server start --background` started is found and stopped the same way. The real console
scripts, the real Prefect server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from docsrag.flows.cli import local_server
from docsrag.flows.cli.local_server import free_port
from tests.conftest import FAQ, servers_with_home

BIN = Path(sys.executable).parent
UI = re.compile(r"its UI at (http://127\.0\.0\.1:\d+)")


class Home:
    """A PREFECT_HOME and DOCSRAG_HOME of their own, with the defaults a user has (no PREFECT_API_URL,
    DOCSRAG_PREFECT_SERVER unset: kept)."""

    def __init__(self, root: Path):
        self.prefect_home = root / "prefect"
        self.env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "DOCSRAG_PREFECT_SERVER")} | {
            "PREFECT_HOME": str(self.prefect_home), "DOCSRAG_HOME": str(root / "docsrag")}

    def run(self, *args: str, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "docsrag"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False, cwd=cwd)

    def ingest(self, release: Path) -> tuple[dict, str]:
        done = self.run("ingest", "--release", str(release), "--json")
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.splitlines()[-1]), done.stderr

    def stop(self) -> None:
        self.run("server", "stop", timeout=120)

    def left(self) -> list[int]:
        deadline = time.monotonic() + 10
        while (found := servers_with_home(self.prefect_home)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return found


@pytest.fixture(scope="module")
def kept(tmp_path_factory, releases):
    """Two ingests in one home: the first starts the server, the second finds it."""
    home = Home(tmp_path_factory.mktemp("kept"))
    try:
        first = home.ingest(releases / FAQ)
        second = home.ingest(releases / FAQ)
        yield home, first, second
    finally:
        home.stop()


def test_the_first_command_starts_the_server_and_says_where_its_ui_is(kept):
    home, (_, said), _ = kept
    [ui] = UI.findall(said)
    assert httpx.get(ui, timeout=10).status_code == 200, "the UI is served there"
    assert "docsrag server stop" in said


def test_the_next_command_uses_it_and_pays_no_server_start(kept):
    home, (first, _), (second, said) = kept
    assert not UI.findall(said), "said once, by the command that started it"
    assert second["unchanged"]
    # A temporary server costs its start: 3.6-5.9 s of prefect-api on 2 cores, the kept one 0.35-0.6 s.
    assert second["stages"]["prefect-api"] < 2.0, second["stages"]
    [ui] = UI.findall(home.run("server", "status").stdout)
    runs = httpx.post(f"{ui}/api/flow_runs/filter", json={}, timeout=10).json()
    assert sorted(r["state_type"] for r in runs) == ["COMPLETED", "COMPLETED"], "both runs are in its UI"
    assert len(servers_with_home(home.prefect_home)) == 1


def test_the_kept_server_holds_none_of_docsrags_settings(kept):
    """Settings can carry secrets; a server kept running for days has no use for them."""
    home, _, _ = kept
    status = json.loads(home.run("server", "status", "--json").stdout)
    environ = Path(f"/proc/{status['pid']}/environ").read_bytes().split(b"\0")
    assert f"PREFECT_HOME={home.prefect_home}".encode() in environ
    assert [v for v in environ if v.upper().startswith(b"DOCSRAG_")] == []


def test_server_stop_leaves_no_process(kept):
    home, _, _ = kept
    done = home.run("server", "stop", timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("stopped Prefect's server"), done.stdout + done.stderr
    assert home.left() == []
    assert not (home.prefect_home / "server.pid").exists()
    assert home.run("server", "status").stdout.strip() == "no Prefect server runs in the background"


def test_commands_starting_at_once_over_a_stale_pid_file_start_one_server(tmp_path):
    """A pid file whose server is gone (a reboot, a kill) is replaced; of two commands that find no
    server at the same instant, one starts it and the other uses it."""
    home = Home(tmp_path)
    home.prefect_home.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    (home.prefect_home / "server.pid").write_text(str(gone.pid))
    try:
        with ThreadPoolExecutor(2) as pool:
            done = list(pool.map(lambda _: home.run("server", "start", timeout=300), range(2)))
        assert [d.returncode for d in done] == [0, 0], [d.stderr[-2000:] for d in done]
        assert len({UI.findall(d.stdout)[0] for d in done}) == 1, [d.stdout for d in done]
        assert len(servers_with_home(home.prefect_home)) == 1
    finally:
        home.stop()
    assert home.left() == []


def test_a_stale_pid_file_seen_by_two_starters_at_once_gives_one_server(tmp_path, monkeypatch):
    """The race behind the test above, made certain: both starters read the stale pid file before
    either removes it. The one that removed it second used to remove the pid file of the server the
    first had just started, and start a second server over it."""
    home = tmp_path / "prefect"
    home.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    (home / "server.pid").write_text(str(gone.pid))
    monkeypatch.setenv("PREFECT_HOME", str(home))
    both_read = threading.Barrier(2, timeout=5)
    order = iter(["first", "second"])
    real = local_server._being_written

    def read_then_wait(pid_file):
        seen = real(pid_file)
        try:
            both_read.wait()  # the two starters have both judged the stale pid file
        except threading.BrokenBarrierError:
            return seen  # only one starter judged it: the other waited its turn, as it should
        if next(order) == "second":  # ... and acts on it after the first has started its server
            deadline = time.monotonic() + 20
            while _pid_in(pid_file) in ("", str(gone.pid)) and time.monotonic() < deadline:
                time.sleep(0.05)
        return seen

    monkeypatch.setattr(local_server, "_being_written", read_then_wait)
    try:
        with ThreadPoolExecutor(2) as pool:
            servers = list(pool.map(lambda _: local_server.kept_server(), range(2)))
        assert len(servers_with_home(home)) == 1, servers
        assert len({s.url for s in servers}) == 1
    finally:
        for pid in servers_with_home(home):
            os.kill(pid, signal.SIGKILL)
    assert Home(tmp_path).left() == []


def test_a_port_taken_between_the_check_and_the_bind_is_not_taken_for_the_kept_server(tmp_path, monkeypatch):
    """Another home's server took the kept port after this home found it free (two commands of two
    homes at once: seen in the suite's two workers). Our server failed to bind and exited, while the
    other answered /health there: the command used the other home's server, and the next command,
    finding no server of its own, started one. What answers must be our own process."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class AnyServer(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    other = ThreadingHTTPServer(("127.0.0.1", free_port()), AnyServer)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    home = tmp_path / "prefect"
    home.mkdir()
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.setattr(local_server, "KEPT_PORT", other.server_address[1])
    found_free = iter([True])  # the kept port was free when looked at, and is taken at the bind
    monkeypatch.setattr(local_server, "port_free", lambda port: next(found_free, False))
    server = local_server.KeptServer(home / "server.pid")
    try:
        url = server.wait_ready()
        assert url != f"http://127.0.0.1:{other.server_address[1]}/api", "the other home's server"
        assert local_server.background_server(home).port == server.port  # the next command finds it
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    finally:
        server.stop()
        other.shutdown()


def _pid_in(pid_file: Path) -> str:
    try:
        return pid_file.read_text()
    except FileNotFoundError:
        return ""


def test_a_server_prefect_started_is_found_and_stopped(tmp_path):
    home = Home(tmp_path)
    subprocess.run([str(BIN / "prefect"), "server", "start", "--background", "--host", "127.0.0.1", "--port",
                    str(free_port())],
                   env=home.env, capture_output=True, check=False, timeout=120)
    try:
        status = home.run("server", "status").stdout
        assert "runs in the background" in status, status
    finally:
        home.stop()
    assert home.left() == []


def test_a_corrupt_database_is_one_clear_error_within_seconds(tmp_path):
    """uvicorn exits with 3 for any failed start; only a port taken since it was found free is
    worth a relaunch. A database that is not one used to be relaunched 10 times in 60 s and reported
    after 120 s as 'did not answer'."""
    home = Home(tmp_path)
    home.prefect_home.mkdir(parents=True)
    (home.prefect_home / "prefect.db").write_bytes(b"this is not a database" * 100)
    started = time.monotonic()
    try:
        done = home.run("server", "start", timeout=120)
    finally:
        home.stop()
    assert done.returncode == 1
    assert time.monotonic() - started < 30
    assert "exited with code 3" in done.stderr and "file is not a database" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) <= 10, done.stderr
    log = (home.prefect_home / "server.log").read_text()
    assert log.count("--- docsrag started Prefect's server") == 1  # launched once


def test_server_status_says_what_the_running_server_logged(tmp_path):
    """The errors a kept server logs since its start (a scheduler failing on every loop, say) are
    counted by `docsrag server status`, with the last one."""
    home = Home(tmp_path)
    try:
        assert home.run("server", "start").returncode == 0
        quiet = json.loads(home.run("server", "status", "--json").stdout)
        assert quiet["running"] and quiet["errors_logged"] == 0 and quiet["last_error"] is None
        # An error as the server logs one: a request the API cannot serve is logged by uvicorn.
        with open(home.prefect_home / "server.log", "a") as log:
            log.write("12:00:00.000 | ERROR   | prefect.server.services.scheduler - Unexpected error\n"
                      "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
                      "sqlalchemy.exc.InvalidRequestError: Can't evaluate bulk DML statement\n")
        said = home.run("server", "status")
        assert "logged 1 error(s)" in said.stdout and "Can't evaluate bulk DML statement" in said.stdout, said.stdout
    finally:
        home.stop()


def test_modules_in_the_users_folder_do_not_replace_the_servers(tmp_path):
    """The kept server outlives the command started in a user's folder: a ``uvicorn.py``,
    ``prefect.py`` or ``sqlalchemy/`` there is not what it imports (its child starts isolated, -I)."""
    folder = tmp_path / "project"
    (folder / "sqlalchemy").mkdir(parents=True)
    for module in ("uvicorn.py", "prefect.py", "sqlalchemy/__init__.py"):
        (folder / module).write_text(f"raise SystemExit('the user folder\\'s {module} was imported')\n")
    home = Home(tmp_path)
    try:
        done = home.run("server", "start", timeout=300, cwd=folder)
        assert done.returncode == 0, done.stderr[-2000:]
        [ui] = UI.findall(done.stdout)
        assert httpx.get(f"{ui}/api/health", timeout=10).status_code == 200
    finally:
        home.stop()
    assert home.left() == []
