"""The serving job: drain the question queue with gpt-oss, citing the docs.

open the index (before claiming anything) -> drain: claim, retrieve and generate in a sliding
window of DOCSRAG_LLM_CONCURRENCY requests until the queue is empty or the time budget is
spent, storing each answer as it lands -> report. A dead LLM server or Milvus puts the
claimed questions back without spending their attempts, and the run fails saying which.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Annotated

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NONE
from prefect.events import emit_event
from prefect.events.worker import EventsWorker
from prefect.runtime import flow_run
from pydantic import Field

from docsrag.tasks.answer.drain import Drain, ServingOutage, put_back
from docsrag.tasks.answer.retrieve import Retriever
from docsrag.tasks.core.records import QueueStats
from docsrag.tasks.core.settings import Settings, settings_for_run
from docsrag.tasks.core.summaries import DrainSummary
from docsrag.tasks.embed import embedding
from docsrag.tasks.ingest.report import name_run
from docsrag.tasks.queue.questions import Queue
from docsrag.tasks.service.coverage import CoverageGap
from docsrag.tasks.service.service import Service

QUESTION_SUBMITTED = "docsrag.question.submitted"


def announce_question(question_id: int, version: str | None) -> None:
    """Tell the Prefect server a question waits: the answer-questions deployment's trigger starts a run.
    Sent before the CLI exits (the events client otherwise sends in the background)."""
    emit_event(event=QUESTION_SUBMITTED, resource={"prefect.resource.id": f"docsrag.question.{question_id}"},
               payload={"id": question_id, "version": version})
    logging.getLogger("EventsWorker").setLevel(logging.ERROR)  # "still processing 1 item" is no news here
    EventsWorker.drain_all(timeout=10)


@task(name="open-index", retries=1, retry_delay_seconds=5, cache_policy=NONE, persist_result=False)
def open_index(settings: Settings, choice: embedding.EmbedderChoice) -> Retriever:
    """The model loaded and the served alias checked, so a locked or missing index fails the run
    before a single question is claimed."""
    retriever = Retriever(settings, choice)
    retriever.collection()
    return retriever


@flow(name="answer-questions")
def answer_questions(max_seconds: Annotated[float, Field(gt=0)] = 3600,
                     max_questions: Annotated[int, Field(ge=1)] | None = None,
                     top_k: Annotated[int, Field(ge=1, le=50)] | None = None) -> DrainSummary:
    """Answer queued questions until the queue is empty, ``max_seconds`` have passed (the deployment
    sets it under its schedule's interval) or ``max_questions`` were claimed."""
    settings = settings_for_run()
    resolving = embedding.preload(settings)  # the embedders resolved, then loaded while the queue is opened
    queue = Queue.from_settings(settings)
    retriever = open_index(settings, resolving.result())
    logger = get_run_logger()
    owner = flow_run.get_id() or f"local-{uuid.uuid4().hex[:12]}"
    waiting = sum(queue.counts()[status] for status in ("pending", "failed", "claimed"))
    name_run(f"answer: {waiting:,} waiting")
    progress = create_progress_artifact(0.0, key="answer-questions-progress",
                                        description=f"Questions answered of the {waiting} waiting at the start")

    started = time.monotonic()

    def report_progress(summary: DrainSummary, in_flight: int) -> None:
        update_progress_artifact(progress, min(100.0, 100.0 * summary.answered / max(1, waiting)))
        logger.info("answered %d (%.1f/s), %d in flight, %d failed, %d put back", summary.answered,
                    summary.answered / (time.monotonic() - started), in_flight, summary.failed, summary.released)

    summary = asyncio.run(Drain(settings, queue, retriever, owner=owner, max_seconds=max_seconds,
                                max_questions=max_questions, top_k=top_k, on_progress=report_progress).run())
    update_progress_artifact(progress, 100.0)
    name_run(f"answer {summary.claimed:,} questions ({summary.answered:,} answered"
              + (f", {summary.dead} dead)" if summary.dead else ")"))
    _report(summary, queue.stats())
    _report_gaps(Service(settings, queue=queue, check_repeats=False, retriever=retriever).coverage_gaps())
    _announce_dead(summary, owner)
    logger.info("Answered %d of %d claimed questions in %.1f s (%.2f/s; %d not covered, %d failed, %d dead, "
                "%d put back, %d lost); stopped: %s", summary.answered, summary.claimed, summary.seconds,
                summary.answers_per_s, summary.not_covered, summary.failed, summary.dead, summary.released,
                summary.lost, summary.outage or summary.stopped)
    if summary.outage:
        raise ServingOutage(f"{summary.outage.rstrip('.')}. {put_back(summary)}; they are answered once the server "
                            "is back")
    return summary


def _report_gaps(gaps: list[CoverageGap]) -> None:
    """What the docs team reads to know what is missing: the questions answered "not covered" or
    marked not helpful, by the document their search came closest to."""
    if gaps:
        create_table_artifact(table=[{**g.to_dict(), "examples": " | ".join(g.examples)} for g in gaps],
                              key="answer-questions-coverage-gaps",
                              description="Documents closest to the questions the docs did not answer")


def _announce_dead(summary: DrainSummary, owner: str) -> None:
    """One event per run that dead-lettered questions: the shipped automation notifies someone."""
    dead = [p for p in summary.problems if p["status"] == "dead"]
    if dead:
        emit_event(event="docsrag.questions.dead", resource={"prefect.resource.id": f"docsrag.answer-run.{owner}"},
                   payload={"count": len(dead), "ids": [p["id"] for p in dead][:50], "reason": dead[0]["reason"]})


def _report(summary: DrainSummary, stats: QueueStats) -> None:
    counts = stats.counts
    create_markdown_artifact(key="answer-questions-summary", description="What this answer run did", markdown=(
        f"### Answer run: {summary.answered} answered in {summary.seconds} s ({summary.answers_per_s}/s)\n\n"
        f"| claimed | answered | not covered | failed | dead | put back | lost | output tokens |\n"
        f"|---|---|---|---|---|---|---|---|\n"
        f"| {summary.claimed} | {summary.answered} | {summary.not_covered} | {summary.failed} | {summary.dead} "
        f"| {summary.released} | {summary.lost} | {summary.output_tokens} |\n\n"
        f"Answered in: {', '.join(f'{lang} {n}' for lang, n in sorted(summary.languages.items())) or '–'}.\n\n"
        f"Stopped: **{summary.outage or summary.stopped}**.\n\n"
        f"Queue now: {', '.join(f'{k} {v}' for k, v in counts.items())}; oldest waiting "
        f"{stats.oldest_waiting_s if stats.oldest_waiting_s is not None else '–'} s; "
        f"{stats.answers_per_s} answers/s over the last {stats.window_s:.0f} s."))
    if summary.problems:
        create_table_artifact(table=summary.problems[:500], key="answer-questions-problems",
                              description="Questions this run did not answer, and why")
