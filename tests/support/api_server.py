"""The questions API on real uvicorn, on a free loopback port, in a thread of the test process;
and a worker draining the queue beside it (the drain the answer flow runs)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import uvicorn

from docsrag.flows.api.app import _announcer, create_app
from docsrag.tasks.core.settings import Settings
from docsrag.tasks.service.service import Service


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RunningApi:
    url: str
    service: Service
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def drain(self, max_seconds: float = 30.0):
        """Answer what is queued, as a worker would (sharing the API's index handle)."""
        return self.service.drain(max_seconds, owner="test")


def start_api(settings: Settings, host: str = "127.0.0.1", answer_here: bool = False) -> RunningApi:
    service = Service(settings, announce=_announcer(), served_ttl_s=0.0)
    port = free_port()
    app = create_app(settings, service, answer_here=answer_here)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the API did not start")
        time.sleep(0.05)
    return RunningApi(f"http://{host}:{port}", service, server, thread)
