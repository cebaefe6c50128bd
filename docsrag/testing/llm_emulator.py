"""An OpenAI-compatible server that answers like vLLM serving gpt-oss, for tests and benches.

A real HTTP server: POST /v1/chat/completions returns ``content`` plus the reasoning in a
separate field (``reasoning``, as vLLM does, or ``reasoning_content``), accepts
``reasoning_effort``, records every request, and can inject latency, 429, 500 and hangs. The
answer echoes the system prompt's "Answer in <language>" line, in parentheses, when it has one.

Faults of an untrusted or failing server, per request (``fault``: a function of the question
naming one of FAULTS, or None) or for every request (``always``): ``poison`` (HTTP 500 at once,
as vLLM answers a prompt whose output fails harmony parsing), ``hang`` (no answer for
``hang_question_s``), ``html`` (200 with a proxy's login page), ``empty`` (``"choices": []``),
``huge_citation`` (``[9999...]`` of 5,000 digits), ``trickle`` (the body a byte at a time, every
``trickle_s``), ``nul`` (NUL bytes in the answer and reasoning), ``bad_usage`` (usage counts as
strings), ``reset`` (the connection reset, no response), ``big_error`` (a 500 with a 100 KB body).
The health probe docsrag sends (its tiny question) is counted in ``probes``, not ``requests``,
and fails only under ``always_fail``, ``hang_s``, ``always`` or a stopped server.

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

Run alone: python -m docsrag.testing.llm_emulator --port 8000 --max-num-seqs 256 --step-ms 20 60 --output-tokens 300
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_TOKEN = re.compile(r"\w+|[^\w\s]")
FAULTS = ("poison", "hang", "html", "empty", "huge_citation", "trickle", "nul", "bad_usage", "reset", "big_error")
LOGIN_PAGE = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body><form>Proxy login</form></body></html>"


@dataclass
class Raw:
    """A response that is not the JSON the handler would send: its bytes and how to send them."""

    body: bytes = b""
    content_type: str = "application/json"
    trickle_s: float = 0.0  # a pause before every byte
    reset: bool = False  # close the connection with a reset instead of answering


def count_tokens(text: str) -> int:
    """Words and punctuation: close enough to a BPE count for throughput figures."""
    return len(_TOKEN.findall(text))


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # the default backlog of 5 drops connections when hundreds of clients arrive at once

    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a client gone is no news
            super().handle_error(request, client_address)


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
        self.fault = None  # question -> a name in FAULTS, or None: injected per request
        self.always: str | None = None  # a fault every request gets, the health probe included
        self.hang_question_s = 30.0
        self.trickle_s = 0.05
        self.probes = 0
        self.faults_injected: dict[str, int] = {}
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

    def reply(self, body: dict) -> tuple[int, dict | Raw]:
        probe = _is_probe(body)
        question = body["messages"][-1]["content"].rsplit("Question: ", 1)[-1]
        fault = self.always or (None if probe or self.fault is None else self.fault(question))
        with self.lock:
            if probe:
                self.probes += 1
            else:
                self.requests.append(body)
            status = self.always_fail or (self.failures.pop(0) if self.failures and not probe else 200)
            if fault:
                self.faults_injected[fault] = self.faults_injected.get(fault, 0) + 1
        if self.hang_s:
            time.sleep(self.hang_s)
        if fault in ("poison", "big_error", "reset", "html"):  # at once, before any work
            return _faulty(fault)
        if fault == "hang":
            time.sleep(self.hang_question_s)
        time.sleep(self.latency_s)
        if status != 200:
            return status, {"error": {"message": f"injected {status}", "type": "server_error", "code": status}}
        status, payload = self._completion(body)
        return status, _spoiled(payload, fault, self.trickle_s)

    def _completion(self, body: dict) -> tuple[int, dict]:
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

            def _send(self, status: int, payload: dict | Raw) -> None:
                raw = payload if isinstance(payload, Raw) else Raw(json.dumps(payload).encode())
                if raw.reset:  # SO_LINGER 0: the close sends a reset, as a crashing proxy does
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                self.send_response(status)
                self.send_header("Content-Type", raw.content_type)
                self.send_header("Content-Length", str(len(raw.body)))
                self.end_headers()
                if not raw.trickle_s:
                    return self.wfile.write(raw.body)
                for n in range(len(raw.body)):
                    time.sleep(raw.trickle_s)
                    self.wfile.write(raw.body[n:n + 1])
                    self.wfile.flush()

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
                except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
                    pass  # the client gave up (timeout): nothing to answer

        return Handler


def _is_probe(body: dict) -> bool:
    """docsrag's health probe: one user message and no sources."""
    messages = body.get("messages") or []
    return len(messages) == 1 and "<source" not in messages[0].get("content", "")


def _faulty(fault: str) -> tuple[int, dict | Raw]:
    """The faults that replace the answer outright."""
    if fault == "poison":
        return 500, {"error": {"message": "Expected 2 output messages (reasoning and final), but got 1.",
                               "type": "InternalServerError", "code": 500}}
    if fault == "big_error":
        return 500, {"error": {"message": "Traceback (most recent call last):\n" + "  File ...\n" * 9_000,
                               "type": "InternalServerError", "code": 500}}  # ~100 KB
    if fault == "reset":
        return 200, Raw(reset=True)
    return 200, Raw(LOGIN_PAGE, "text/html")  # html


def _spoiled(payload: dict, fault: str | None, trickle_s: float) -> dict | Raw:
    """The faults that spoil a completed answer."""
    choice = payload["choices"][0]
    if fault == "empty":
        payload["choices"] = []
    elif fault == "huge_citation":
        choice["message"]["content"] += " [" + "9" * 5_000 + "]"  # int() refuses more than 4,300 digits
    elif fault == "nul":
        choice["message"]["content"] = choice["message"]["content"].replace(" ", "\x00 ", 1)
        for key in ("reasoning", "reasoning_content"):
            if key in choice["message"]:
                choice["message"][key] += "\x00"
    elif fault == "bad_usage":
        payload["usage"] = {k: str(v) for k, v in payload["usage"].items() if not isinstance(v, dict)}
    elif fault == "trickle":
        return Raw(json.dumps(payload).encode(), trickle_s=trickle_s)
    return payload


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
