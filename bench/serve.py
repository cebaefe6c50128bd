"""Serving figures against an emulated GPU: drain a backlog, answer a lone question, retrieve.

The model server is the continuous-batching emulator in its own process (docsrag/testing/llm_emulator.py:
256 sequences at once, a decoding step of 20 ms at one sequence growing to 60 ms at 256, 300
output tokens per answer: capacity 4,267 tokens/s, 14.2 answers/s). The index (2.4.x) is on a
Milvus server process (Milvus Lite's gRPC server), so the worker's flow-run processes share it.

- backlog: 2,000 questions drained by the answer-questions flow with prefect.yaml's parameters.
  utilization = output tokens / drain wall time / capacity (target >= 0.9); the same over the
  server's busy window; questions_per_s; p50/p95 from submit to answer.
- baseline (``--baseline``): the flow as deployed before the draining worker (git BASELINE_COMMIT:
  one batch of 64 per run, 32 in flight, a run every 60 s): one run measured, its rate over its
  interval. It runs that old flow against today's task modules, which have moved on (the language
  argument, typed sources and usage), so it is kept for the record and off by default.
- lone question: `docsrag ask` on an idle stack (Prefect server, the deployment and its trigger,
  a process worker on docsrag-gpu): submit to answered, minus the answer's generation time
  (target <= 10 s).
- retrieval latency per question as the drain retrieves (a claim's questions embedded in one
  call, then a search each): retrieve_p50_ms, retrieve_p95_ms (limit 50).
Last line is JSON. Run: .venv/bin/python bench/serve.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
BASELINE_COMMIT = "f490a80"  # the last flow that answered one batch per run
MAX_NUM_SEQS, STEP_MS, OUTPUT_TOKENS = 256, (20, 60), 300


def start_emulator() -> tuple[subprocess.Popen, str]:
    emulator = subprocess.Popen([sys.executable, "-m", "docsrag.testing.llm_emulator", "--port", "0", "--max-num-seqs",
                                 str(MAX_NUM_SEQS), "--step-ms", *map(str, STEP_MS), "--output-tokens",
                                 str(OUTPUT_TOKENS)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    return emulator, emulator.stdout.readline().split()[-1]


def emulator_stats(url: str, reset: bool = False) -> dict:
    request = urllib.request.Request(url + "/stats" + ("/reset" if reset else ""), data=b"{}" if reset else None)
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 2)


def submit_to_answer_s(queue, ids: list[int]) -> list[float]:
    records = [queue.get(i) for i in ids]
    return [(datetime.fromisoformat(r["answered_at"]) - datetime.fromisoformat(r["created_at"])).total_seconds()
            for r in records if r["answered_at"]]


def deployment_parameters() -> dict:
    import yaml

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return next(d for d in spec["deployments"] if d["name"] == "answer-questions")["parameters"]


def drain_backlog(questions: list[str], url: str, capacity: float) -> dict:
    from docsrag.flows.answer import answer_questions
    from docsrag.tasks.core.settings import load_settings
    from docsrag.tasks.queue.questions import Queue

    queue = Queue.from_settings(load_settings())
    ids = [queue.submit(q)[0] for q in questions]
    emulator_stats(url, reset=True)
    start = time.perf_counter()
    summary = answer_questions(**deployment_parameters()).to_dict()
    wall = time.perf_counter() - start
    server = emulator_stats(url)
    latencies = submit_to_answer_s(queue, ids)
    return {"questions": len(ids), "answered": summary["answered"], "drain_s": round(wall, 1),
            "utilization": round(server["tokens"] / wall / capacity, 3), "utilization_target": 0.9,
            "utilization_ratio": round(server["tokens"] / wall / capacity / 0.9, 3),
            "utilization_busy_window": round(server["tokens"] / server["busy_s"] / capacity, 3),
            "mean_batch": server["mean_batch"], "questions_per_s": round(summary["answered"] / wall, 2),
            "p50_s": percentile(latencies, 0.5), "p95_s": percentile(latencies, 0.95)}


def baseline(questions: list[str], url: str, capacity: float, home: Path) -> dict:
    """One run of the pre-drain flow (as deployed: 64 questions, 32 in flight, every 60 s)."""
    import importlib.util

    from docsrag.tasks.core.settings import load_settings
    from docsrag.tasks.queue.questions import Queue

    source = subprocess.run(["git", "show", f"{BASELINE_COMMIT}:flows/answer.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = home / "baseline_answer.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_answer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.environ["DOCSRAG_LLM_CONCURRENCY"] = "32"
    queue = Queue.from_settings(load_settings())
    for question in questions[:64]:
        queue.submit(question)
    emulator_stats(url, reset=True)
    start = time.perf_counter()
    summary = module.answer_questions(max_questions=64)
    run_s = time.perf_counter() - start
    del os.environ["DOCSRAG_LLM_CONCURRENCY"]
    tokens = emulator_stats(url)["tokens"]
    interval = max(60.0, run_s)  # one run at a time, one every 60 s
    return {"run_s": round(run_s, 1), "answered": summary["answered"],
            "questions_per_s": round(summary["answered"] / interval, 2),
            "utilization": round(tokens / interval / capacity, 3),
            "backlog_2000_drain_s": round(2000 / (summary["answered"] / interval))}


def lone_question(env: dict, question: str) -> dict:
    """Deploy as a user does, start a GPU-pool worker, ask once, time it."""
    prefect = str(BIN / "prefect")
    for command in (["work-pool", "create", "docsrag-gpu", "--type", "process", "--overwrite"],
                    ["--no-prompt", "deploy", "--name", "answer-questions"]):
        subprocess.run([prefect, *command], cwd=ROOT, env=env, check=True, capture_output=True)
    worker = subprocess.Popen([prefect, "worker", "start", "--pool", "docsrag-gpu", "--type", "process"], cwd=ROOT,
                              env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(8)  # the worker is up and polling: the stack is idle
        ask = subprocess.run([str(BIN / "docsrag"), "ask", question, "--json"], cwd=ROOT, env=env, check=True,
                             capture_output=True, text=True)
        question_id = json.loads(ask.stdout)["id"]
        from docsrag.tasks.core.settings import load_settings
        from docsrag.tasks.queue.questions import Queue

        queue = Queue.from_settings(load_settings())
        deadline = time.monotonic() + 180
        while (record := queue.get(question_id))["status"] != "answered" and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        worker.terminate()
        worker.wait()
    total = submit_to_answer_s(queue, [question_id])[0]
    generation = record["latency_ms"] / 1000
    return {"lone_total_s": round(total, 2), "lone_generation_s": round(generation, 2),
            "lone_latency_s": round(total - generation, 2), "lone_latency_limit_s": 10,
            "lone_latency_ratio": round((total - generation) / 10, 3)}


def retrieval_latencies(questions: list[str]) -> tuple[float, float]:
    from docsrag.tasks.answer.drain import CLAIM_BATCH
    from docsrag.tasks.answer.retrieve import Retriever
    from docsrag.tasks.core.settings import load_settings
    from docsrag.tasks.embed import embedding

    settings = load_settings()
    retriever = Retriever(settings, embedding.resolve(settings))
    retriever.search(["warm-up"], settings.top_k)
    latencies = []
    for start in range(0, len(questions), CLAIM_BATCH):
        batch = questions[start:start + CLAIM_BATCH]
        began = time.perf_counter()
        vectors = retriever.embed(batch)
        embed_ms = 1000 * (time.perf_counter() - began) / len(batch)
        for n, question in enumerate(batch):
            began = time.perf_counter()
            retriever.search_vectors([question], {f: [v[n]] for f, v in vectors.items()}, settings.top_k)
            latencies.append(1000 * (time.perf_counter() - began) + embed_ms)
    return percentile(latencies, 0.5), percentile(latencies, 0.95)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--release", default=str(ROOT.parent / "shared/data/releases/milvus_docs_2.4.x_en.zip"))
    parser.add_argument("--eval", default=str(ROOT.parent / "shared/eval/dev.jsonl"))
    parser.add_argument("--questions", type=int, default=2000)
    parser.add_argument("--baseline", action="store_true", help="also run the pre-drain flow (see above)")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="docsrag-serve-"))
    os.environ.update(DOCSRAG_HOME=str(home / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                      DO_NOT_TRACK="true", HF_HUB_OFFLINE="1", PREFECT_HOME=str(home / "prefect"))
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from docsrag.testing.milvus_server import MilvusServer

    milvus = MilvusServer(home / "milvus").start()
    emulator, url = start_emulator()
    os.environ.update(DOCSRAG_MILVUS_URI=milvus.uri, DOCSRAG_LLM_BASE_URL=url,
                      DOCSRAG_MIN_RELEVANCE="-1", DOCSRAG_WEAK_RELEVANCE="-1")  # every question goes to the model
    dev = [json.loads(line)["question"] for line in open(args.eval, encoding="utf-8")]
    questions = [f"{dev[i % len(dev)]} (#{i})" for i in range(args.questions)]
    capacity = emulator_stats(url)["capacity_tokens_per_s"]
    try:
        with prefect_test_harness(server_startup_timeout=120):
            from docsrag.flows.ingest import ingest_release

            ingest_release(release=args.release)
            p50, p95 = retrieval_latencies(dev)
            figures = {"capacity_tokens_per_s": capacity, "max_num_seqs": MAX_NUM_SEQS, "step_ms": STEP_MS,
                       "output_tokens": OUTPUT_TOKENS, "deployment": deployment_parameters(),
                       "backlog": drain_backlog(questions, url, capacity),
                       "retrieve_p50_ms": p50, "retrieve_p95_ms": p95, "retrieve_p95_limit_ms": 50}
            if args.baseline:
                figures["baseline"] = baseline(questions, url, capacity, home)
            figures.update(lone_question({**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}, dev[0]))
    finally:
        emulator.terminate()
        milvus.kill()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
