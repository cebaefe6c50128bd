"""An OpenAI-compatible server that answers like vLLM serving gpt-oss, for tests and benches.

A real HTTP server: POST /v1/chat/completions returns ``content`` plus the reasoning in a
separate field (``reasoning``, as vLLM does, or ``reasoning_content``), accepts
``reasoning_effort``, records every request, and can inject latency, 429, 500 and hangs.
Run alone: python tests/llm_emulator.py --port 8000 --latency 0.5
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the default backlog of 5 drops connections when 32 clients arrive at once


class Emulator:
    def __init__(self, latency_s: float = 0.0, reasoning_field: str = "reasoning", host: str = "127.0.0.1",
                 port: int = 0):
        self.latency_s = latency_s
        self.reasoning_field = reasoning_field
        self.requests: list[dict] = []
        self.failures: list[int] = []  # statuses to answer with, one per request, before succeeding
        self.always_fail: int | None = None
        self.hang_s = 0.0
        self.answer_text: str | None = None  # fixed content instead of the default citing answer
        self.lock = threading.Lock()
        self.server = _Server((host, port), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}/v1"

    def start(self) -> Emulator:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reply(self, body: dict) -> tuple[int, dict]:
        with self.lock:
            self.requests.append(body)
            status = self.always_fail or (self.failures.pop(0) if self.failures else 200)
        if self.hang_s:
            time.sleep(self.hang_s)
        time.sleep(self.latency_s)
        if status != 200:
            return status, {"error": {"message": f"injected {status}", "type": "server_error", "code": status}}
        prompt = body["messages"][-1]["content"]
        docs = re.findall(r'<source n="(\d+)" doc="([^"]+)"', prompt)
        content = self.answer_text or (
            f"According to {docs[0][1]}, this is covered [{docs[0][0]}]." if docs else "No sources were given.")
        message = {"role": "assistant", "content": content,
                   self.reasoning_field: f"Reasoning ({body.get('reasoning_effort')}): read {len(docs)} sources."}
        tokens = len(prompt) // 4
        return 200, {
            "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model"), "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": tokens, "completion_tokens": 20, "total_tokens": tokens + 20},
        }

    def _handler(self):
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # TCP_NODELAY, as uvicorn (vLLM) sets it: the body would otherwise wait behind the headers
            # for the client's delayed ACK (Nagle), up to 40 ms per response.
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": "openai/gpt-oss-20b", "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if not self.path.endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": "not found"}})
                try:
                    self._send(*emulator.reply(body))
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): nothing to answer

        return Handler


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args()
    emulator = Emulator(args.latency, port=args.port).start()
    print(f"serving on {emulator.url}", flush=True)  # the bench reads the URL from this line
    threading.Event().wait()
