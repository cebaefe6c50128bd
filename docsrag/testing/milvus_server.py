"""A real Milvus server for tests and benches: Milvus Lite's gRPC server in its own process.

It can be killed and started again on the same port and data, and several processes (workers,
a CLI) can use it at once, which a Milvus Lite file does not allow.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MilvusServer:
    def __init__(self, data_dir: Path):
        self.data_dir, self.port = data_dir, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> MilvusServer:
        self.process = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir",
                                         str(self.data_dir), "--port", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"the Milvus Lite server on port {self.port} did not start")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


class CuttingProxy:
    """A TCP proxy in front of a server that closes its first ``cut`` connections at once,
    as a server does when it drops a connection just as a client reuses it."""

    def __init__(self, target_port: int, cut: int):
        self.target_port, self.cut = target_port, cut
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def __enter__(self) -> Self:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            if self.cut > 0:
                self.cut -= 1
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(source, sink), daemon=True).start()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        source.close()
        sink.close()
