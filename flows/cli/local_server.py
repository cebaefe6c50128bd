"""The Prefect server a ``docsrag`` command uses when none is configured (no ``PREFECT_API_URL``).

``kept`` (the default, ``DOCSRAG_PREFECT_SERVER``): Prefect's own server, started in the
background by the first command that needs it and kept for the next ones, so the ~5 s of a server
start is paid once and the runs stay in its UI. It is the process ``prefect server start
--background`` starts (same command line, same ``$PREFECT_HOME/server.pid``, same database), so
``docsrag server stop``, ``prefect server stop`` and ``prefect server start --background`` all
see it; it listens on loopback only, on 4200 or a free port, and logs to
``$PREFECT_HOME/server.log``.

``temporary``: Prefect's temporary API server for the command alone, stopped when it ends.

Either way the server is started as the command's first act, before the command imports
Prefect (about a second), so its start overlaps the imports and the model's loading.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from docsrag.tasks.core.errors import DocsragError

STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
STARTUP_FAILED = 3  # uvicorn's exit code for any failed start: a taken port, a database it cannot open...
KEPT_PORT = 4200  # Prefect's own default: the UI where Prefect's docs say it is
APP = "prefect.server.api.server:create_app"


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def _server_env(**settings: str) -> dict[str, str]:
    """The command's environment less docsrag's settings: they can hold secrets (API keys, tokens,
    credentials in URLs) that a server kept running for days has no use for."""
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("DOCSRAG_")} | settings


def _uvicorn(port: int, *extra: str) -> list[str]:
    """Prefect's own server command line (``prefect server start``), found without importing Prefect.

    ``-I``, as the export child (tasks/embed/runtime.py): ``-m`` would put the folder the command
    was started in first on the server's path, where a user's ``uvicorn.py``, ``prefect.py`` or
    ``sqlalchemy/`` would be imported in place of the real ones. Isolated mode ignores only the
    ``PYTHON*`` variables and the user's site-packages; the environment itself (``PREFECT_*``, HOME)
    still reaches the server, and ``--app-dir`` names where this process found Prefect."""
    import importlib.util

    prefect_dir = Path(importlib.util.find_spec("prefect").origin).parent
    return [sys.executable, "-I", "-m", "uvicorn", "--app-dir", str(prefect_dir.parent), "--factory", APP,
            "--host", "127.0.0.1", "--port", str(port), *extra]


class PrefectServerError(DocsragError, RuntimeError):
    """The local Prefect server could not start or be found: the message quotes its log."""


class _Listening:
    """Where a local Prefect server answers (loopback): its UI at ``ui``, its API at ``url``."""

    port: int

    @property
    def ui(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.ui}/api"


class _Server(_Listening):
    """A Prefect API server process; ``wait_ready`` -> its API URL once it answers."""

    what = "Prefect's background server"

    def exit_code(self) -> int | None:
        """The process's exit code once it has exited, else None."""
        raise NotImplementedError

    def pid(self) -> int:
        raise NotImplementedError

    def wait_ready(self) -> str:
        """-> the API URL once it answers; raises with the server's own words when it cannot start."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if (code := self.exit_code()) is not None:
                raise PrefectServerError(f"{self.what} exited with code {code} ({self._where_errors_are()}); "
                                   "set PREFECT_API_URL to a running Prefect server to use that instead")
            # Another home's server can take the port between our check and our bind: what answers
            # there must be our process (it then exits, and _Started starts it on another port).
            if _answers(self.url) and _listens(self.pid(), self.port):
                return self.url
            time.sleep(0.1)
        raise PrefectServerError(f"{self.what} did not answer within {STARTUP_TIMEOUT_S:.0f} s ({self._where_errors_are()})")

    def _where_errors_are(self) -> str:
        """The last lines the background server logged (the temporary one's errors reach the terminal)."""
        return _last_words(prefect_home() / "server.log")


class Running(_Server):
    """Prefect's background server, started earlier (by an earlier command or ``prefect server start``)."""

    def __init__(self, found: Background) -> None:
        self.found = found
        self.port = found.port

    def exit_code(self) -> int | None:
        return None if _alive(self.found.pid) else -1

    def pid(self) -> int:
        return self.found.pid


class _Started(_Server):
    """A server process this command started."""

    process: subprocess.Popen

    def _launch(self) -> None:
        raise NotImplementedError

    def exit_code(self) -> int | None:
        code = self.process.poll()
        if code == STARTUP_FAILED and not port_free(self.port):  # taken since it was found free: another port
            self._launch()
            return None
        return code

    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        _terminate(self.process.pid, self.process)


class TemporaryApi(_Started):
    """Prefect's temporary server (``SubprocessASGIServer``'s command and environment), this command's alone."""

    what = "Prefect's temporary API server"

    def __init__(self) -> None:
        self._launch()

    def _launch(self) -> None:
        self.port = free_port()
        env = _server_env(PREFECT_UI_ENABLED="0", PREFECT__SERVER_EPHEMERAL="1", PREFECT__SERVER_FINAL="1")
        # stdout stays the command's own (``--json``); the server's errors reach the terminal as
        # Prefect's own temporary server's do (a pipe nobody reads could fill and stall it).
        # Its own session: Ctrl-C at the terminal reaches the command alone, which marks its run
        # crashed on a server still up and then stops it (in the group, the server died first and
        # the command spent two minutes retrying to say so). It still ends with the command.
        self.process = subprocess.Popen(_uvicorn(self.port, "--log-level", "error", "--lifespan", "on"),
                                        env=env, stdout=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=_ends_with_parent)  # noqa: PLW1509 - one prctl call

    def _where_errors_are(self) -> str:
        return "its errors are above"


def _ends_with_parent() -> None:
    """In the child, before exec: SIGTERM when the command that started it dies (even killed)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


class KeptServer(_Started):
    """Prefect's background server, started here for this and later commands. Only the caller that
    creates ``server.pid`` (exclusively, as ``prefect server start --background`` does) starts one."""

    def __init__(self, pid_file: Path) -> None:
        self.pid_file = pid_file
        self._launch()

    def _launch(self) -> None:
        self.port = KEPT_PORT if port_free(KEPT_PORT) else free_port()
        # The UI asks the API at PREFECT_SERVER_API_HOST/PORT: the port it really has.
        env = _server_env(PREFECT__SERVER_FINAL="1", PREFECT_SERVER_API_HOST="127.0.0.1",
                          PREFECT_SERVER_API_PORT=str(self.port), PREFECT_SERVER_LOGGING_LEVEL="WARNING")
        with open(self.pid_file.parent / "server.log", "ab") as log:
            log.write(f"{LAUNCH_MARK} {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode())
            log.flush()
            # A session of its own: a Ctrl-C in the terminal that started it stops the command, not the server.
            self.process = subprocess.Popen(_uvicorn(self.port, "--log-level", "warning"), env=env,
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            start_new_session=True)
        self.pid_file.write_text(str(self.process.pid))

    def stop(self) -> None:
        super().stop()
        self.pid_file.unlink(missing_ok=True)


@dataclass(frozen=True)
class Background(_Listening):
    """Prefect's background server of a PREFECT_HOME, as its pid file names it."""

    pid: int
    port: int


def background_server(home: Path | None = None) -> Background | None:
    """The background server of this PREFECT_HOME if its process runs (``prefect server start
    --background`` or a kept server), found by the pid file and the process's ``--port``."""
    try:
        pid = int((home or prefect_home()).joinpath("server.pid").read_text())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        port = int(argv[argv.index("--port") + 1])
    except (OSError, ValueError, IndexError):
        return None
    # A pid file left by a server long gone names a pid that may be another process's now.
    return Background(pid, port) if APP in argv and _alive(pid) else None


def kept_server(announce=None) -> _Server:
    """The background server of this PREFECT_HOME: the one running, else one started now.
    ``announce(ui_url)`` is told when this call started it."""
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    pid_file = home / "server.pid"
    # Commands starting at once take turns: two that both judged a pid file stale used to both remove
    # it, the second removing the one the first had just written, and start a second server.
    with _turn(home / "server.pid.lock"):
        for _ in range(50):
            if found := background_server(home):
                return Running(found)
            try:
                os.close(os.open(pid_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except FileExistsError:
                if _being_written(pid_file):
                    time.sleep(0.1)  # `prefect server start --background` is starting it this instant
                else:
                    pid_file.unlink(missing_ok=True)  # its server is gone
                continue
            server = KeptServer(pid_file)
            if announce:
                announce(server.ui)
            return server
    raise PrefectServerError(f"cannot start Prefect's background server: {pid_file} names no server that runs; "
                             "`docsrag server stop` clears it")


@contextmanager
def _turn(lock_file: Path):
    """An exclusive lock on ``lock_file`` while the block runs (released by the kernel if the process dies)."""
    with open(lock_file, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        yield


def stop_kept(home: Path | None = None) -> Background | None:
    """Stop the background server of this PREFECT_HOME and wait until its process is gone; -> what was stopped."""
    home = home or prefect_home()
    if found := background_server(home):
        _terminate(found.pid)
    (home / "server.pid").unlink(missing_ok=True)
    return found


@contextmanager
def prefect_api(mode: str = "kept", on_wait=None, announce=None):
    """A Prefect API for the flows run inside: the configured server if there is one, else the
    background server (kept, the default; started if none runs) or, with ``mode="temporary"``, a
    temporary one unless a background server runs. ``with prefect_api() as wait: ...; wait(); flow()``:
    call ``wait`` (it returns once the API answers) after the work that can overlap the start.
    ``on_wait`` is called when the command begins to wait (the stage table counts from there)."""
    # Reading Prefect's settings imports Prefect (about a second): unless it is imported already, the
    # server is started first, and stopped again if the settings name another.
    if os.environ.get("PREFECT_API_URL") or ("prefect" in sys.modules and _server_configured()):
        server = None
    elif mode == "kept":
        server = kept_server(announce)
    else:
        server = Running(found) if (found := background_server()) else TemporaryApi()
    with ExitStack() as stack:
        if isinstance(server, TemporaryApi):
            stack.callback(server.stop)
        if server and _server_configured():  # a server named in a profile wins
            if isinstance(server, _Started):
                server.stop()
            server = None

        def wait() -> None:
            if on_wait:
                on_wait()
            if server is None:
                return
            from prefect.settings import PREFECT_API_URL, temporary_settings

            stack.enter_context(temporary_settings(updates={PREFECT_API_URL: server.wait_ready()}))
            if isinstance(server, TemporaryApi):
                stack.callback(_send_what_prefect_holds)  # before the server stops (the stack unwinds in reverse)

        yield wait


LAUNCH_MARK = "--- docsrag started Prefect's server at"


@dataclass(frozen=True)
class LoggedErrors:
    """The errors a kept server logged since its last start: how many, and the last one in a line."""

    count: int
    last: str | None


def logged_errors(home: Path | None = None) -> LoggedErrors:
    """Error records of ``server.log`` since the last start (Prefect's ``| ERROR |`` lines and
    uvicorn's ``ERROR:``), each with the exception its traceback ends on: a scheduler failing on
    every loop shows here, where nothing else would say it."""
    records = _records_since_start((home or prefect_home()) / "server.log")
    errors = [record for record in records if _is_error(record[0])]
    if not errors:
        return LoggedErrors(0, None)
    head, *rest = errors[-1]
    cause = next((line.strip() for line in reversed(rest) if line.strip() and not line.startswith(" ")), "")
    return LoggedErrors(len(errors), " ".join(part for part in (head.strip(), cause) if part)[:500])


def _records_since_start(log: Path) -> list[list[str]]:
    """The log since its last launch mark, as records: a line that starts a record (Prefect's
    ``12:00:00.123 | LEVEL |`` or uvicorn's ``LEVEL:``) and the lines after it (a traceback)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    records: list[list[str]] = []
    for line in text[text.rfind(LAUNCH_MARK):].splitlines()[1:] if LAUNCH_MARK in text else text.splitlines():
        if _RECORD.match(line) or not records:
            records.append([line])
        else:
            records[-1].append(line)
    return records


_RECORD = re.compile(r"\d\d:\d\d:\d\d\.\d+ \| |(DEBUG|INFO|WARNING|ERROR|CRITICAL):")


def _is_error(line: str) -> bool:
    return "| ERROR " in line or "| CRITICAL " in line or line.startswith(("ERROR:", "CRITICAL:"))


def _last_words(log: Path, lines: int = 6) -> str:
    """The last lines the server logged since its start, to quote in an error (its log's path after)."""
    records = _records_since_start(log)
    tail = [line for record in records for line in record if line.strip()][-lines:]
    said = "\n  ".join(line.rstrip()[:300] for line in tail)
    return f"its log {log}" + (f" ends:\n  {said}" if said else " is empty")


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _being_written(pid_file: Path) -> bool:
    """A pid file created an instant ago and not yet holding a pid: its server is being started."""
    try:
        return not pid_file.read_text().strip() and time.time() - pid_file.stat().st_mtime < 10
    except OSError:
        return True


def _terminate(pid: int, process: subprocess.Popen | None = None) -> None:
    """SIGTERM, then wait (uvicorn's graceful shutdown takes a second or two), then SIGKILL."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _alive(pid, process) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid, process):
        os.kill(pid, signal.SIGKILL)


def _alive(pid: int, process: subprocess.Popen | None = None) -> bool:
    if process is not None:
        return process.poll() is None  # our child: reaped here, no zombie left
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _send_what_prefect_holds() -> None:
    """Logs and events still queued in Prefect's background workers reach the server before it stops."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=5)
    EventsWorker.drain_all(timeout=5)


def _server_configured() -> bool:
    """A server named in the environment or a profile, or Prefect told not to start a temporary one."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    return bool(PREFECT_API_URL.value()) or not PREFECT_SERVER_EPHEMERAL_ENABLED.value()


def listening_sockets(port: int) -> set[str] | None:
    """The sockets (as ``/proc/<pid>/fd`` links name them) listening on loopback TCP ``port``; None
    where /proc cannot tell (not Linux)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            return None
        for row in rows:
            fields = row.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    return inodes


def _listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds the socket listening on ``port`` (where /proc cannot tell:
    assumed, the health check alone)."""
    if (sockets := listening_sockets(port)) is None:
        return True
    try:
        return any(os.readlink(fd) in sockets for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        # As uvicorn binds (and Prefect checks): a server stopped a moment ago leaves its port free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
