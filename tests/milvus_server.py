"""A real Milvus server for tests and benches: Milvus Lite's gRPC server in its own process.

It can be killed and started again on the same port and data, and several processes (workers,
a CLI) can use it at once, which a Milvus Lite file does not allow.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path


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
