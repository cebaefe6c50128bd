"""Prefect's temporary API server, started by a ``docsrag`` command as its first act.

With no Prefect server configured, Prefect starts a temporary one on the first flow run
(``SubprocessASGIServer``), but only once the command has imported Prefect and reached the flow:
on a 2-core machine about 12 s before the first stage, most of it the server importing itself.
Started here, before the command imports anything heavy, the same server (same command line,
same environment as Prefect's) comes up beside the command's imports and the model's loading.

Starting it is speculative: whether a server is configured is known only once Prefect's settings
are read (the environment, or a profile); the temporary one is stopped at once when it is not needed.

Where Prefect's own background server runs for this PREFECT_HOME (``prefect server start
--background``; ``prefect server stop`` stops it), commands use it instead: the start is paid once.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

STARTUP_TIMEOUT_S = 120.0
PORT_TAKEN = 3  # uvicorn's exit code when its port was taken meanwhile: start again on another


class TemporaryApi:
    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.port = 0
        self._launch()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _launch(self) -> None:
        import importlib.util

        prefect_dir = Path(importlib.util.find_spec("prefect").origin).parent  # without importing Prefect
        self.port = _free_port()
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect_dir.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            # stdout stays the command's own (``--json``); the server's errors reach the terminal as
            # Prefect's own temporary server's do (a pipe nobody reads could fill and stall it).
            env=env, stdout=subprocess.DEVNULL)

    def wait_ready(self) -> str:
        """-> the API URL once it answers; raises with the server's own words when it cannot start."""
        import httpx

        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if (code := self.process.poll()) == PORT_TAKEN:
                self._launch()
            elif code is not None:
                raise RuntimeError(f"Prefect's temporary API server exited with code {code} (its errors are above); "
                                   "set PREFECT_API_URL to a running Prefect server to use that instead")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self.url
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Prefect's temporary API server did not answer within {STARTUP_TIMEOUT_S:.0f} s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextmanager
def prefect_api(on_wait=None):
    """A Prefect API for the flows run inside: the configured server if there is one, else a
    temporary server started now. ``with prefect_api() as wait: ...; wait(); flow()`` — call
    ``wait`` (it returns once the API answers) after the work that can overlap its start.
    ``on_wait`` is called when the command begins to wait (the stage table counts from there)."""
    # Reading Prefect's settings imports Prefect (seconds): unless it is imported already, the
    # server starts first and is stopped if the settings name another.
    known = os.environ.get("PREFECT_API_URL") or ("prefect" in sys.modules and _server_configured())
    kept = None if known else background_server()
    temporary = None if known or kept else TemporaryApi()
    with ExitStack() as stack:
        if temporary:
            stack.callback(temporary.stop)
            if _server_configured():
                temporary.stop()
                temporary = None

        def wait() -> None:
            if on_wait:
                on_wait()
            if kept and not _server_configured():  # a server named in a profile still wins
                from prefect.settings import PREFECT_API_URL, temporary_settings

                stack.enter_context(temporary_settings(updates={PREFECT_API_URL: kept}))
            if temporary:
                from prefect.settings import PREFECT_API_URL, temporary_settings

                stack.enter_context(temporary_settings(updates={PREFECT_API_URL: temporary.wait_ready()}))
                stack.callback(_send_what_prefect_holds)  # before the server stops (the stack unwinds in reverse)

        yield wait


def background_server() -> str | None:
    """The API of Prefect's own background server (``prefect server start --background``) for this
    PREFECT_HOME, if it runs and answers: commands then pay no server start (seconds) and their runs
    stay in its UI. Found by the pid file Prefect writes and that process's ``--host``/``--port``."""
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    try:
        pid = int((home / "server.pid").read_text())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        host, port = argv[argv.index("--host") + 1], argv[argv.index("--port") + 1]
    except (OSError, ValueError, IndexError):
        return None
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/api"
    import httpx

    try:
        return url if httpx.get(f"{url}/health", timeout=2).status_code == 200 else None
    except httpx.HTTPError:
        return None


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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
