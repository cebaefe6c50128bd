"""Serving figures: generation throughput against the gpt-oss emulator, retrieval latency.

200 questions, emulator latency 500 ms per request, concurrency 32:
questions_per_s (generation, target >= 0.8 * 32 / 0.5 = 51.2) and end_to_end_questions_per_s
(the whole answer flow: claim, retrieve, generate, store). Retrieval latency per question on
the 2.4.x index, as the flow retrieves (the batch embedded in one call, its cost shared per
question, then a hybrid search per question; model loaded): retrieve_p50_ms, retrieve_p95_ms
(target p95 <= 50). Last line is JSON.
Run: .venv/bin/python bench/serve.py --release ../shared/data/releases/milvus_docs_2.4.x_en.zip
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
QUESTIONS, LATENCY_S, CONCURRENCY = 200, 0.5, 32


def retrieval_latencies(retriever, questions: list[str], k: int) -> tuple[list[float], float, list]:
    """As the answer flow retrieves: the batch embedded in one call (its cost shared per
    question), then one hybrid search per question. -> sorted ms per question, embed ms each, hits"""
    retriever.search(["warm-up"], k)
    start = time.perf_counter()
    vectors = retriever.embedder.embed(questions)
    embed_ms = 1000 * (time.perf_counter() - start) / len(questions)
    latencies, hits = [], []
    for question, vector in zip(questions, vectors):
        start = time.perf_counter()
        hits += retriever.search_vectors([question], [vector], k)
        latencies.append(1000 * (time.perf_counter() - start) + embed_ms)
    return sorted(latencies), embed_ms, hits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--release", default="../shared/data/releases/milvus_docs_2.4.x_en.zip")
    parser.add_argument("--eval", default="../shared/eval/dev.jsonl")
    parser.add_argument("--home", help="an existing DOCSRAG_HOME with the release ingested (skips the ingest)")
    args = parser.parse_args()
    os.environ["DOCSRAG_HOME"] = args.home or tempfile.mkdtemp(prefix="docsrag-serve-")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from prefect.testing.utilities import prefect_test_harness

    from flows.answer import answer_questions
    from flows.ingest import ingest_release
    from tasks.generate import Generator, numbered_sources
    from tasks.questions import Queue
    from tasks.retrieve import Retriever
    from tasks.settings import load_settings

    # The model server is another process, as vLLM is: client and server do not share a GIL.
    emulator = subprocess.Popen([sys.executable, "-m", "tests.llm_emulator", "--port", "0", "--latency",
                                 str(LATENCY_S)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    url = emulator.stdout.readline().split()[-1]
    os.environ.update(DOCSRAG_LLM_BASE_URL=url, DOCSRAG_LLM_CONCURRENCY=str(CONCURRENCY),
                      DOCSRAG_MIN_RELEVANCE="-1")  # every question goes to the model
    questions = [json.loads(line)["question"] for line in open(args.eval, encoding="utf-8")]
    questions = [questions[i % len(questions)] for i in range(QUESTIONS)]

    try:
        with prefect_test_harness(server_startup_timeout=120):
            if not args.home:
                ingest_release(release=args.release)
            settings = load_settings()
            latencies, embed_ms, sources = retrieval_latencies(Retriever(settings), questions, settings.top_k)
            start = time.perf_counter()
            results = asyncio.run(Generator(settings).answer_all(
                [(q, numbered_sources(s)) for q, s in zip(questions, sources)]))
            generate_s = time.perf_counter() - start
            failures = sum(isinstance(r, Exception) for r in results)

            queue = Queue.from_settings(settings)
            for question in questions:
                queue.submit(question)
            start = time.perf_counter()
            flow_summary = answer_questions(max_questions=QUESTIONS)
            flow_s = time.perf_counter() - start
    finally:
        emulator.terminate()

    target = 0.8 * CONCURRENCY / LATENCY_S
    latencies.sort()
    print(json.dumps({
        "questions": QUESTIONS, "latency_s": LATENCY_S, "concurrency": CONCURRENCY,
        "questions_per_s": round(QUESTIONS / generate_s, 1), "questions_per_s_target": target,
        "questions_per_s_ratio": round(QUESTIONS / generate_s / target, 3), "generate_failures": failures,
        "generate_s": round(generate_s, 2),
        "end_to_end_questions_per_s": round(QUESTIONS / flow_s, 1), "flow": flow_summary,
        "retrieve_p50_ms": round(statistics.median(latencies), 1),
        "retrieve_p95_ms": round(latencies[int(0.95 * len(latencies)) - 1], 1), "retrieve_p95_limit_ms": 50,
        "embed_ms_per_question": round(embed_ms, 1),
    }))


if __name__ == "__main__":
    main()
