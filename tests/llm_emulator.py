"""An OpenAI-compatible server that answers like vLLM serving gpt-oss, for tests and benches.

A real HTTP server: POST /v1/chat/completions returns ``content`` plus the reasoning in a
separate field (``reasoning``, as vLLM does, or ``reasoning_content``), accepts
``reasoning_effort``, records every request, and can inject latency, 429, 500 and hangs. The
answer echoes the system prompt's "Answer in <language>" line, in parentheses, when it has one.

With ``step_s`` set it behaves like a GPU under continuous batching: every decoding step
produces one token for each sequence in flight, a step takes longer the more sequences it
serves (``step_s=(at one sequence, at max_num_seqs)``), and requests beyond ``max_num_seqs``
wait for a free slot. An answer costs ``output_tokens`` steps (reasoning included), capped
by the request's ``max_tokens``: a capped answer ends with ``finish_reason: length`` and no
content, as gpt-oss does when its reasoning runs out of room. GET /stats reports the tokens
produced and the busy window, so a bench can compute the utilization the server saw (POST
/stats/reset starts a new window).

POST /v1/embeddings answers like an embeddings server on a GPU (vLLM, TEI): ``embed_rate`` inputs
per second in all, whatever the number of requests in flight; vectors are deterministic per text
(hashed), normalized, ``embed_dim`` long.

Run alone: python -m tests.llm_emulator --port 8000 --max-num-seqs 256 --step-ms 20 60 --output-tokens 300
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_TOKEN = re.compile(r"\w+|[^\w\s]")


def count_tokens(text: str) -> int:
    """Words and punctuation: close enough to a BPE count for throughput figures."""
    return len(_TOKEN.findall(text))


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # the default backlog of 5 drops connections when hundreds of clients arrive at once


@dataclass
class _Sequence:
    tokens: int
    produced: int = 0
    done: threading.Event = field(default_factory=threading.Event)


class Engine:
    """Continuous batching: one token per running sequence per step; the step time grows with the batch."""

    def __init__(self, max_num_seqs: int, step_s: tuple[float, float]):
        self.max_num_seqs, self.step_s = max_num_seqs, step_s
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []
        self.cond = threading.Condition()
        self.tokens = self.steps = self.batch_sum = 0
        self.first_start: float | None = None
        self.last_end: float | None = None
        threading.Thread(target=self._loop, daemon=True).start()

    @property
    def capacity_tokens_per_s(self) -> float:
        """Output tokens per second with every slot busy."""
        return self.max_num_seqs / self.step_s[1]

    def generate(self, tokens: int) -> None:
        sequence = _Sequence(tokens)
        with self.cond:
            self.waiting.append(sequence)
            self.cond.notify()
        sequence.done.wait()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self.running:
                    self.cond.wait()
                while self.waiting and len(self.running) < self.max_num_seqs:
                    self.running.append(self.waiting.popleft())
                batch = len(self.running)
                if self.first_start is None:
                    self.first_start = time.monotonic()
            low, high = self.step_s
            time.sleep(low + (high - low) * (batch - 1) / max(1, self.max_num_seqs - 1))
            with self.cond:
                for sequence in self.running:
                    sequence.produced += 1
                finished = [s for s in self.running if s.produced >= s.tokens]
                self.running = [s for s in self.running if s.produced < s.tokens]
                self.tokens += batch
                self.steps += 1
                self.batch_sum += batch
                self.last_end = time.monotonic()
            for sequence in finished:
                sequence.done.set()

    def reset(self) -> None:
        with self.cond:
            self.tokens = self.steps = self.batch_sum = 0
            self.first_start = self.last_end = None

    def stats(self) -> dict:
        with self.cond:
            busy = (self.last_end - self.first_start) if self.first_start and self.last_end else 0.0
            return {"tokens": self.tokens, "steps": self.steps, "busy_s": round(busy, 3),
                    "mean_batch": round(self.batch_sum / self.steps, 1) if self.steps else 0,
                    "max_num_seqs": self.max_num_seqs, "capacity_tokens_per_s": round(self.capacity_tokens_per_s, 1),
                    "running": len(self.running), "waiting": len(self.waiting)}


class Emulator:
    def __init__(self, latency_s: float = 0.0, reasoning_field: str = "reasoning", host: str = "127.0.0.1",
                 port: int = 0, *, max_num_seqs: int = 256, step_s: tuple[float, float] | None = None,
                 output_tokens: int = 20, reasoning_share: float = 0.6, embed_rate: float = 5000.0,
                 embed_dim: int = 384):
        self.latency_s = latency_s
        self.reasoning_field = reasoning_field
        self.output_tokens = output_tokens
        self.reasoning_share = reasoning_share
        self.engine = Engine(max_num_seqs, step_s) if step_s else None
        self.embed_rate, self.embed_dim = embed_rate, embed_dim
        self.embedded = 0
        self.embed_gpu = threading.Lock()  # one device: batches share its throughput
        self.requests: list[dict] = []
        self.failures: list[int] = []  # statuses to answer with, one per request, before succeeding
        self.always_fail: int | None = None
        self.hang_s = 0.0
        self.answer_text: str | None = None  # fixed content instead of the default citing answer
        self.translations: dict[str, str] = {}  # question -> English, for translation requests (else echoed)
        self.lock = threading.Lock()
        self.server = _Server((host, port), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}/v1"

    def start(self) -> Emulator:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """The server goes away: new connections are refused until a server starts on the port again."""
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
        tokens = min(self.output_tokens, int(body.get("max_tokens") or self.output_tokens))
        if self.engine:
            self.engine.generate(tokens)
        capped = tokens < self.output_tokens
        docs = re.findall(r'<source n="(\d+)" doc="([^"]+)"', prompt)
        if body["messages"][0]["content"].startswith("Translate the user's question"):
            content = self.translations.get(prompt, prompt)
        else:
            content = "" if capped else self.answer_text or _default_answer(docs, body["messages"])
        message = {"role": "assistant", "content": content,
                   self.reasoning_field: f"Reasoning ({body.get('reasoning_effort')}): read {len(docs)} sources."}
        prompt_tokens = sum(count_tokens(m["content"]) for m in body["messages"])
        reasoning_tokens = tokens if capped else int(tokens * self.reasoning_share)
        return 200, {
            "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model"),
            "choices": [{"index": 0, "message": message, "finish_reason": "length" if capped else "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                      "total_tokens": prompt_tokens + tokens,
                      "completion_tokens_details": {"reasoning_tokens": reasoning_tokens}},
        }

    def embed(self, body: dict) -> tuple[int, dict]:
        texts = body.get("input") or []
        texts = [texts] if isinstance(texts, str) else texts
        with self.embed_gpu:
            time.sleep(len(texts) / self.embed_rate)
            self.embedded += len(texts)
        packed = body.get("encoding_format") == "base64"  # what the openai client asks for: 4 bytes a float
        data = [{"object": "embedding", "index": i, "embedding": _vector(text, self.embed_dim, packed)}
                for i, text in enumerate(texts)]
        tokens = sum(count_tokens(t) for t in texts)
        return 200, {"object": "list", "data": data, "model": body.get("model"),
                     "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

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
                elif self.path.rstrip("/").endswith("/stats"):
                    self._send(200, emulator.engine.stats() if emulator.engine else {})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path.rstrip("/").endswith("/stats/reset") and emulator.engine:
                    emulator.engine.reset()
                    return self._send(200, {})
                if self.path.endswith("/embeddings"):
                    return self._send(*emulator.embed(body))
                if not self.path.endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": "not found"}})
                try:
                    self._send(*emulator.reply(body))
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): nothing to answer

        return Handler


def _default_answer(docs: list[tuple[str, str]], messages: list[dict]) -> str:
    """Cites the first source; echoes the system prompt's "Answer in <language>" line, so a test
    reading the stored answer sees what the model was told."""
    answer = f"According to {docs[0][1]}, this is covered [{docs[0][0]}]." if docs else "No sources were given."
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    asked = next((line for line in system.splitlines() if line.startswith("Answer in ")), None)
    return f"{answer} ({asked})" if asked else answer


def _vector(text: str, dim: int, packed: bool) -> list[float] | str:
    """A unit vector that depends only on the text (float32 bytes in base64 when ``packed``)."""
    import numpy as np

    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    vector = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    vector /= np.linalg.norm(vector)
    return base64.b64encode(vector.tobytes()).decode() if packed else vector.tolist()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--step-ms", type=float, nargs=2, metavar=("AT_ONE", "AT_FULL"),
                        help="decoding step time at one sequence and at max-num-seqs (continuous batching)")
    parser.add_argument("--output-tokens", type=int, default=20)
    parser.add_argument("--embed-rate", type=float, default=5000.0, help="embeddings per second")
    args = parser.parse_args()
    emulator = Emulator(args.latency, port=args.port, max_num_seqs=args.max_num_seqs,
                        step_s=tuple(ms / 1000 for ms in args.step_ms) if args.step_ms else None,
                        output_tokens=args.output_tokens, embed_rate=args.embed_rate).start()
    print(f"serving on {emulator.url}", flush=True)  # the bench reads the URL from this line
    threading.Event().wait()
