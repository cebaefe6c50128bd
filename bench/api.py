"""The questions API's front end under load: can it keep a GPU answering 14 questions/s fed?

`docsrag api` runs in its own process (uvicorn, SQLite queue, the FAQ index on Milvus Lite, a
bearer token, the rate limit out of the way); this process is 50 concurrent clients (httpx,
asyncio) hammering one route at a time for ``--seconds``:

- submit: POST /v1/questions, a new question each time (the queue's insert, the repeat look-up);
- show: GET /v1/questions/{id} of the questions just submitted (no wait);
- repeated: POST /v1/questions of a question already answered: answered at submit from it.

For each: requests/s, p50 and p95 latency, errors; ``ratio``: requests/s over the target of 14/s
(the emulated GPU's answer rate in bench/serve.py). The CPU is printed beside the figures: both
processes share this machine's cores (quote figures with it). Last line is JSON.
Run: .venv/bin/python bench/api.py [--seconds 10] [--clients 50]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
TARGET_PER_S = 14.0  # a GPU answering 14 questions/s (bench/serve.py's emulated vLLM)
TOKEN = "bench-token"
FAQ = ROOT.parent / "shared" / "data" / "releases" / "milvus_docs_faq_2.4.x_en.zip"


def cpu() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    isa = "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model} ({isa}), {os.cpu_count()} cores"


def start_api(env: dict, port: int) -> subprocess.Popen:
    api = subprocess.Popen([str(BIN / "docsrag"), "api", "--port", str(port)], env=env, cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return api
        except httpx.HTTPError:
            time.sleep(0.2)
    api.kill()
    raise SystemExit(f"the API did not start: {api.stderr.read().decode()[-2000:]}")


async def hammer(client: httpx.AsyncClient, clients: int, seconds: float, request) -> dict:
    """``clients`` loops sending ``request(n)`` until ``seconds`` pass. -> rate, latency, errors."""
    latencies: list[float] = []
    errors = 0
    counter = itertools.count()
    stop_at = time.monotonic() + seconds

    async def one_client():
        nonlocal errors
        while time.monotonic() < stop_at:
            sent = time.perf_counter()
            response = await request(client, next(counter))
            latencies.append(time.perf_counter() - sent)
            errors += response.status_code >= 400

    started = time.monotonic()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    wall = time.monotonic() - started
    latencies.sort()
    per_s = len(latencies) / wall
    return {"requests": len(latencies), "per_s": round(per_s, 1), "ratio_to_target": round(per_s / TARGET_PER_S, 1),
            "p50_ms": round(statistics.median(latencies) * 1000, 1),
            "p95_ms": round(latencies[int(len(latencies) * 0.95) - 1] * 1000, 1), "errors": errors}


async def run(url: str, clients: int, seconds: float, answer_original) -> dict:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as client:
        ids: list[int] = []

        async def submit(c, n):
            response = await c.post("/v1/questions", json={"question": f"How do I tune index {n} for recall?"})
            if response.status_code == 202:
                ids.append(response.json()["id"])
            return response

        async def show(c, n):
            return await c.get(f"/v1/questions/{ids[n % len(ids)]}")

        original = (await client.post("/v1/questions", json={"question": "Where does Milvus store data?"})).json()
        answer_original(original["id"])

        async def repeated(c, n):
            response = await c.post("/v1/questions", json={"question": "where does milvus store data"})
            if response.status_code == 202 and response.json()["status"] != "answered":
                raise SystemExit(f"not answered from the repeat: {response.json()}")
            return response

        figures = {"submit": await hammer(client, clients, seconds, submit)}
        figures["show"] = await hammer(client, clients, seconds, show)
        figures["repeated"] = await hammer(client, clients, seconds, repeated)
        return figures


def answer_directly(queue_url: str):
    """Answer the original as a worker would store it (the real queue), without a model."""
    from docsrag.tasks.core.records import Source, StoredAnswer
    from docsrag.tasks.queue.questions import Queue

    def answer(question_id: int) -> None:
        queue = Queue(queue_url)
        [claimed] = queue.claim(1, "bench")
        assert claimed.id == question_id
        source = Source(1, "en/faq/product_faq.md", "Where does Milvus store data?", 0.9, "")
        assert queue.answer(question_id, "bench", **StoredAnswer("In object storage [1].", "en", [source]).row())

    return answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per route")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-api-"))
    queue_url = f"sqlite:///{work / 'questions.db'}"
    env = {**os.environ, "DOCSRAG_HOME": str(work / "home"), "DOCSRAG_QUEUE_URL": queue_url,
           "DOCSRAG_API_TOKENS": TOKEN, "DOCSRAG_API_RATE_PER_MIN": "100000000",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)  # no server: nothing to announce to (events are measured elsewhere)
    subprocess.run([str(BIN / "docsrag"), "ingest", "--release", str(FAQ)], env=env, cwd=ROOT, check=True,
                   capture_output=True, timeout=600)
    api = start_api(env, args.port)
    try:
        figures = asyncio.run(run(f"http://127.0.0.1:{args.port}", args.clients, args.seconds,
                                  answer_directly(queue_url)))
    finally:
        api.terminate()
        api.wait(timeout=30)
    figures.update(cpu=cpu(), clients=args.clients, seconds_per_route=args.seconds, target_per_s=TARGET_PER_S,
                   queue="sqlite")
    for route in ("submit", "show", "repeated"):
        f = figures[route]
        print(f"{route:>9}: {f['per_s']:>7} req/s ({f['ratio_to_target']}x the target of {TARGET_PER_S}/s), "
              f"p50 {f['p50_ms']} ms, p95 {f['p95_ms']} ms, {f['errors']} errors")
    print(f"cpu: {figures['cpu']}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
