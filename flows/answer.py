"""The serving job: answer a batch of queued questions with gpt-oss, citing the docs.

claim (leased) -> retrieve (one embedding call, hybrid search per question) -> generate
(concurrent requests) -> check citations -> store -> mark answered; failures go back to
the queue with a backoff and are dead-lettered after DOCSRAG_MAX_ATTEMPTS.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE
from prefect.runtime import flow_run

from tasks.generate import NOT_COVERED, Generated, Generator, numbered_sources
from tasks.questions import Claimed, Queue
from tasks.retrieve import Retriever, covered
from tasks.settings import Settings, load_settings


@task(name="claim", retries=2, retry_delay_seconds=5, cache_policy=NONE)
def claim(queue: Queue, limit: int, owner: str) -> list[Claimed]:
    return queue.claim(limit, owner)


@task(name="retrieve", retries=2, retry_delay_seconds=5, cache_policy=NONE)
def retrieve(settings: Settings, batch: list[Claimed], k: int) -> dict[int, list[dict] | Exception]:
    """Sources per question; questions on the same version share one embedding call and one search."""
    retriever = Retriever(settings)
    by_version: dict[str | None, list[Claimed]] = defaultdict(list)
    for item in batch:
        by_version[item.version].append(item)
    found: dict[int, list[dict] | Exception] = {}
    for version, items in by_version.items():
        try:
            hits = retriever.search([i.question for i in items], k, version)
        except Exception as exc:  # e.g. a version nobody ingested: those questions fail, others go on
            found.update((i.id, exc) for i in items)
            continue
        found.update((i.id, h) for i, h in zip(items, hits))
    return found


@task(name="generate", cache_policy=NONE)
def generate(settings: Settings, items: list[tuple[str, list[dict]]]) -> list[Generated | Exception]:
    return asyncio.run(Generator(settings).answer_all(items))


@flow(name="answer-questions")
def answer_questions(max_questions: int = 64, top_k: int | None = None) -> dict:
    """Answer up to ``max_questions`` queued questions."""
    settings = load_settings()
    queue = Queue.from_settings(settings)
    owner = flow_run.get_id() or f"local-{uuid.uuid4().hex[:12]}"
    batch = claim(queue, max_questions, owner)
    if not batch:
        return {"claimed": 0, "answered": 0, "failed": 0, "not_covered": 0}
    sources = {qid: hits if isinstance(hits, Exception) else _relevant(hits, settings)
               for qid, hits in retrieve(settings, batch, top_k or settings.top_k).items()}
    to_model = [item for item in batch if isinstance(sources[item.id], list) and sources[item.id]]
    generated = dict(zip((i.id for i in to_model),
                         generate(settings, [(i.question, sources[i.id]) for i in to_model]) if to_model else []))
    rows = [_store(queue, owner, settings, item, sources[item.id], generated.get(item.id)) for item in batch]
    _report(rows)
    summary = {"claimed": len(batch), "answered": sum(r["status"] == "answered" for r in rows),
               "failed": sum(r["status"] in ("failed", "dead") for r in rows),
               "not_covered": sum(r["not_covered"] for r in rows)}
    get_run_logger().info("Answered %(answered)s of %(claimed)s questions (%(failed)s failed)", summary)
    return summary


def _relevant(hits: list[dict], settings: Settings) -> list[dict]:
    """No sources, and so no model call, when the docs do not cover the question."""
    return numbered_sources(hits) if covered(hits, settings.min_relevance, settings.weak_relevance) else []


def _store(queue: Queue, owner: str, settings: Settings, item: Claimed, sources, result) -> dict:
    row = {"id": item.id, "question": item.question[:120], "latency_ms": 0, "sources": "", "not_covered": False}
    error = sources if isinstance(sources, Exception) else result if isinstance(result, Exception) else None
    if error is not None:
        row["status"] = queue.fail(item.id, owner, f"{type(error).__name__}: {error}") or "lease lost"
        return row
    listed = [{k: s[k] for k in ("n", "doc_path", "heading", "score")} for s in sources]
    if result is None:  # nothing relevant retrieved
        stored = queue.answer(item.id, owner, answer=NOT_COVERED, sources=[], model=None,
                              reasoning_effort=None, latency_ms=0)
        row["not_covered"] = True
    else:
        stored = queue.answer(item.id, owner, answer=result.answer, reasoning=result.reasoning, sources=listed,
                              model=settings.llm_model, reasoning_effort=settings.reasoning_effort,
                              usage=result.usage, latency_ms=result.latency_ms)
        row.update(latency_ms=result.latency_ms, sources=", ".join(f"[{n}] {sources[n - 1]['doc_path']}"
                                                                   for n in result.cited))
    row["status"] = "answered" if stored else "lease lost"
    return row


def _report(rows: list[dict]) -> None:
    create_table_artifact(table=rows, key="answer-questions-batch",
                          description=f"Batch of {len(rows)} questions: latency, cited sources, status")
