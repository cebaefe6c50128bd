"""The answer worker: keep DOCSRAG_LLM_CONCURRENCY requests in flight until the queue is empty.

claim a batch (while the run holds fewer than two windows of questions) -> retrieve it (one
embedding call, a search per question, in a thread, up to a full window ahead of the model) ->
generate (a sliding window: each slot that frees takes the next prepared question) -> settle
(answers and failures written as they land, together in one transaction when several land at
once). A worker killed at any point holds at most two windows: only those wait for their leases.

Every claimed question ends answered, failed (its own fault: an attempt spent, dead after the
last), or released back to the queue with the reason (not its fault: the LLM server or Milvus
down, the time budget spent, the run stopped; no attempt spent), whatever fails: the final
release does not depend on the writer. The leases of the questions held are renewed while they
wait and generate.

"Down" is a fact about the server, not a guess from one request: a request that fails with
nothing answered since it went out makes the run probe the server (a tiny question); only a
failed probe stops the run. While the server answers, a 5xx is the question's own failure (vLLM
answers 500 for a prompt whose output it cannot parse), and a timeout, 429 or reset puts the
question back as busy, at most DOCSRAG_MAX_ATTEMPTS times before it counts as an attempt. A reply
that is not a chat completion means a misconfigured server: the run stops, nothing spent.

Time: the run stops claiming at ``max_seconds``; a request still out then has until
``max_seconds + grace`` (grace = min(STOP_GRACE_S, DOCSRAG_LLM_DEADLINE_S)) before it is cut and
its question put back, so a run ends within that margin (plus the queue's last writes).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

from sqlalchemy.exc import SQLAlchemyError

from docsrag.tasks.answer.generate import (
    BadResponse,
    Generated,
    Generator,
    RequestDeadline,
    not_covered,
    numbered_sources,
    overloaded,
    server_fault,
    untranslated,
)
from docsrag.tasks.answer.retrieve import Retriever, covered
from docsrag.tasks.core import language
from docsrag.tasks.core.errors import DocsragError
from docsrag.tasks.core.records import Source, StoredAnswer
from docsrag.tasks.core.redaction import Secrets, redact_text
from docsrag.tasks.core.settings import Settings
from docsrag.tasks.core.summaries import DrainSummary
from docsrag.tasks.index.store import StoreError
from docsrag.tasks.queue.questions import Claimed, Queue

CLAIM_BATCH = 64  # questions claimed, embedded and searched together
POLL_S = 0.5  # how often an otherwise idle feeder looks for new questions while answers are in flight
PROGRESS_S = 5.0
NO_ATTEMPT_SPENT = " (put back, no attempt spent)"
STOP_GRACE_S = 30.0  # how long requests still out at max_seconds may finish


@dataclass
class Prepared:
    item: Claimed
    sources: list[Source] = field(default_factory=list)  # numbered; empty: the docs do not cover it
    error: str | None = None  # the question's own failure before generation (e.g. an unknown version)
    lang: str = language.DEFAULT  # the language to answer in
    untranslated: str | None = None  # why it was searched as asked, wanting a translation (generate.untranslated)


class ServingOutage(DocsragError, RuntimeError):
    """A service every question needs is down; the claimed questions went back to the queue."""


class QueueFailure(DocsragError, RuntimeError):
    """The queue's database failed a write; what the run held went back (or waits for its lease)."""


def put_back(summary: DrainSummary) -> str:
    """What an outage did to the questions a run held, for the person who started it."""
    n = summary.released
    return f"{n} claimed question{'s' if n != 1 else ''} went back to the queue without spending an attempt"


class RunOutOfTime(Exception):
    """A request was cut at the run's end (max_seconds + grace)."""


class Drain:
    def __init__(self, settings: Settings, queue: Queue, retriever: Retriever, *, owner: str, max_seconds: float,
                 max_questions: int | None = None, top_k: int | None = None,
                 on_progress: Callable[[DrainSummary, int], None] | None = None):
        self.settings, self.queue, self.retriever, self.owner = settings, queue, retriever, owner
        self.max_seconds, self.max_questions = max_seconds, max_questions
        self.top_k = top_k or settings.top_k
        self.on_progress = on_progress
        self.slots = settings.llm_concurrency
        self.summary = DrainSummary()
        self.held: set[int] = set()  # claimed by this run and not settled yet
        self.busy = 0
        self.last_success = 0.0
        # The queue is used from one thread at a time; retrieval (model and Milvus client) from another.
        self.db = ThreadPoolExecutor(1, thread_name_prefix="docsrag-queue")
        self.search = ThreadPoolExecutor(1, thread_name_prefix="docsrag-retrieve")

    async def run(self) -> DrainSummary:
        started = time.monotonic()
        self.deadline = started + self.max_seconds
        self.generator = Generator(self.settings)
        self.grace = min(STOP_GRACE_S, self.settings.llm_deadline_s)
        # Up to a full window of prepared questions waits beside the window in flight, so a slot
        # that frees never waits on retrieval; a permit per question held bounds both.
        self.permits = asyncio.Semaphore(2 * self.slots)
        self.ready: asyncio.Queue[Prepared | None] = asyncio.Queue()
        self.settled: asyncio.Queue[tuple | None] = asyncio.Queue()
        self.workers = [asyncio.create_task(self._worker()) for _ in range(self.slots)]
        self.feeder = asyncio.create_task(self._feed())
        writer = asyncio.create_task(self._write())
        renewer = asyncio.create_task(self._renew_leases())
        for essential in (writer, renewer):  # without the queue's database nothing can be settled: stop
            essential.add_done_callback(self._stop_if_failed)
        background = [renewer, asyncio.create_task(self._progress())]
        try:
            done = await asyncio.gather(self.feeder, *self.workers, return_exceptions=True)
            errors = [r for r in done if isinstance(r, Exception) and not isinstance(r, ServingOutage)]
            if errors:  # a bug or the queue's own database: the leases held are released below
                if isinstance(errors[0], SQLAlchemyError):
                    raise QueueFailure(f"the question queue failed: {_short(errors[0])}") from None
                raise errors[0]
        finally:
            for task in [*self.workers, self.feeder, *background]:
                task.cancel()
            await self.settled.put(None)
            failed = await self._written(writer) or _failure(renewer)
            try:  # whatever the writer did: what is still held goes back
                reason = (f"{self.summary.outage}{NO_ATTEMPT_SPENT}" if self.summary.outage
                          else "the answer run stopped before answering it")
                await self._db(self._release_held, reason)
            except SQLAlchemyError as exc:
                failed = failed or exc
            finally:
                self.held.clear()
                await self.generator.close()
                self.db.shutdown()
                self.search.shutdown()
                self.summary.seconds = round(time.monotonic() - started, 2)
            if failed is not None:
                raise QueueFailure(f"the question queue failed: {_short(failed)}. The questions "
                                   "this run held went back to the queue (or wait for their lease)") from None
        return self.summary

    async def _written(self, writer: asyncio.Task) -> BaseException | None:
        """The writer's end: None, or what made its last write fail."""
        try:
            await writer
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported after the held questions are released
            return exc
        return None

    def _release_held(self, reason: str) -> int:
        """In the queue's thread, so a claim still running there when the run stopped has finished
        and what it claimed is put back too (reading `held` before it lands would strand those)."""
        released = self.queue.release(sorted(self.held), self.owner, reason)
        self.summary.released += released
        return released

    async def _db(self, call, *args):
        return await asyncio.get_running_loop().run_in_executor(self.db, partial(call, *args))

    # -- claim and retrieve -------------------------------------------------------------------
    async def _feed(self) -> None:
        try:
            self.summary.stopped = await self._claim_until_done()
        except BaseException as exc:
            self._stop_workers()
            if not isinstance(exc, asyncio.CancelledError):
                raise
            return
        for _ in self.workers:  # every worker finishes what it holds, then stops
            await self.ready.put(None)

    async def _claim_until_done(self) -> str:
        while True:
            if time.monotonic() >= self.deadline:
                return "time budget"
            want = min(CLAIM_BATCH, self.slots)
            if self.max_questions is not None:
                want = min(want, self.max_questions - self.summary.claimed)
            if want <= 0:
                return "max questions"
            for _ in range(want):
                await self.permits.acquire()
            batch = await self._db(self._claim, want)
            for _ in range(want - len(batch)):  # what was not claimed, or already held (not claimed twice)
                self.permits.release()
            if not batch:
                if not self.held:  # everything claimed is settled: a failure may be due again at once
                    return "queue empty"
                await asyncio.sleep(POLL_S)  # answers in flight: questions asked meanwhile join this run
                continue
            self.summary.claimed += len(batch)
            searched_as = await self._translated(batch)
            try:
                prepared = await asyncio.get_running_loop().run_in_executor(self.search, self._retrieve, batch,
                                                                            searched_as)
            except Exception as exc:
                self.summary.outage = self._shown(f"Milvus at {self.settings.milvus_uri} failed while retrieving: "
                                                  f"{type(exc).__name__}: {exc}")
                raise ServingOutage(self.summary.outage) from exc
            for item in prepared:
                await self.ready.put(item)

    def _claim(self, want: int) -> list[Claimed]:
        """In the queue's thread: a claim is held the moment it is made, so a run stopping while it
        waits for the claim still puts those questions back. A question this run already holds is
        never taken up a second time (two requests, two answers written for one question): the
        queue does not hand a worker its own questions, and this run would not take one again."""
        batch = [item for item in self.queue.claim(want, self.owner) if item.id not in self.held]
        self.held.update(item.id for item in batch)
        return batch

    async def _translated(self, batch: list[Claimed]) -> dict[int, str]:
        """Question id -> its English translation, for the questions not in English (all at once,
        beside the answers in flight). A question the model does not translate is searched as asked."""
        if not self.settings.translate_questions:
            return {}
        langs = [item.lang or language.detect(item.question) for item in batch]
        english = await self.generator.in_english([item.question for item in batch], langs)
        return {item.id: text for item, text in zip(batch, english) if text}

    def _retrieve(self, batch: list[Claimed], searched_as: dict[int, str]) -> list[Prepared]:
        """Questions on the same docs (version, language) share one embedding call. Docs nobody
        ingested are that question's failure; any other error means Milvus is in trouble and is raised."""
        by_docs: dict[tuple, list[Claimed]] = defaultdict(list)
        for item in batch:
            by_docs[item.version, item.docs_lang].append(item)
        prepared = []
        for (version, docs_lang), items in by_docs.items():
            try:
                hits = self.retriever.search([searched_as.get(i.id, i.question) for i in items], self.top_k, version,
                                             docs_lang)
            except StoreError as exc:
                prepared += [Prepared(i, error=f"{type(exc).__name__}: {exc}") for i in items]
                continue
            s = self.settings
            prepared += [Prepared(i, numbered_sources(h) if covered(h, s.min_relevance, s.weak_relevance) else [])
                         for i, h in zip(items, hits)]
        for p in prepared:  # a question queued without a language (another writer, an old row) gets one now
            p.lang = p.item.lang or language.detect(p.item.question)
            p.untranslated = untranslated(self.settings, p.lang, p.item.id in searched_as)
        order = {item.id: n for n, item in enumerate(batch)}
        return sorted(prepared, key=lambda p: order[p.item.id])

    # -- generate ---------------------------------------------------------------------------------
    async def _worker(self) -> None:
        while (prepared := await self.ready.get()) is not None:
            self.busy += 1
            try:
                await self._answer(prepared)
            finally:
                self.busy -= 1

    async def _answer(self, prepared: Prepared) -> None:
        item = prepared.item
        if prepared.error:
            return await self.settled.put(("failed", item, prepared.error))
        if not prepared.sources:
            return await self.settled.put(("answered", item, StoredAnswer(not_covered(prepared.lang), prepared.lang,
                                                                          untranslated=prepared.untranslated)))
        if time.monotonic() >= self.deadline:
            return await self._release([item], "put back: the answer run's time budget (max_seconds) ran out")
        sent = time.monotonic()
        try:
            result = await self._generate(prepared)
        except RunOutOfTime:
            return await self._release([item], "put back: cut at the answer run's end (max_seconds and its grace)")
        except BadResponse as exc:
            return await self._outage(item, self._shown(f"the LLM server at {self.settings.llm_base_url} is "
                                                        f"misconfigured: {exc}"))
        except Exception as exc:
            if server_fault(exc):
                return await self._server_fault(item, exc, sent)
            return await self.settled.put(("failed", item, f"{type(exc).__name__}: {exc}"))
        self.last_success = time.monotonic()
        s = self.settings
        await self.settled.put(("answered", item, StoredAnswer(
            result.answer, prepared.lang, prepared.sources, s.llm_model, s.reasoning_effort, result.reasoning,
            result.usage, result.latency_ms, prepared.untranslated)))

    async def _generate(self, prepared: Prepared) -> Generated:
        """The model's answer within the request's deadline, and never past the run's end plus grace."""
        left = self.deadline + self.grace - time.monotonic()
        if left <= 0:
            raise RunOutOfTime
        try:
            return await self.generator.answer(prepared.item.question, prepared.sources, prepared.lang,
                                               deadline_s=min(self.settings.llm_deadline_s, left))
        except RequestDeadline:
            if left < self.settings.llm_deadline_s:
                raise RunOutOfTime from None
            raise

    def _shown(self, text: str) -> str:
        """A reason that leaves the process (state message, last_error, notification): URLs and
        configured secrets redacted."""
        return redact_text(text, Secrets.of(self.settings))

    async def _server_fault(self, item: Claimed, exc: Exception, sent: float) -> None:
        """The request failed in a way that may be the server's. With nothing answered since it went
        out, the server is probed: down stops the run (no attempt spent). A server that answers is
        busy (timeout, 429, reset: put back, bounded) or refusing this question (5xx: its failure)."""
        reason = self._shown(f"the LLM server at {self.settings.llm_base_url} failed: {type(exc).__name__}: {exc}")
        within = self.deadline + self.grace - time.monotonic()
        if self.last_success < sent and (trouble := await self.generator.probe(within)) is not None:
            return await self._outage(item, f"{reason.rstrip('.')}; a probe request failed too: {trouble.rstrip('.')}. Start "
                                            "the server, or point DOCSRAG_LLM_BASE_URL at one that runs")
        if not overloaded(exc):
            return await self.settled.put(("failed", item, f"{type(exc).__name__}: {exc}"))
        if item.put_backs >= self.settings.max_attempts:
            return await self.settled.put(("failed", item, f"{reason} (busy each time it was sent: after "
                                                           f"{item.put_backs} put-backs it spends an attempt)"))
        await self._release([item], reason + NO_ATTEMPT_SPENT, retry_after_s=self.settings.retry_backoff_s,
                            busy=True)

    async def _outage(self, item: Claimed, reason: str) -> None:
        """The server every question needs is down or misconfigured: stop claiming, put this one back
        (the others go back as the run stops)."""
        if self.summary.outage is None:  # stop claiming first: the question put back stays put
            self.summary.outage = reason
            self.feeder.cancel()
        await self._release([item], reason + NO_ATTEMPT_SPENT)

    async def _release(self, items: list[Claimed], reason: str, retry_after_s: float = 0, busy: bool = False) -> None:
        ids = [i.id for i in items if i.id in self.held]
        self.summary.problems += [{"id": i.id, "question": i.question[:120], "status": "released", "reason": reason}
                                  for i in items]
        # Shielded, and forgotten only once done: a run stopping meanwhile releases them again, harmlessly.
        # Counted where it is done (_put_back): a worker cancelled meanwhile (an outage stops them all)
        # would not come back here to count it.
        await asyncio.shield(self._db(self._put_back, ids, reason, retry_after_s, busy))
        for _ in ids:
            self.permits.release()

    def _put_back(self, ids: list[int], reason: str, retry_after_s: float, busy: bool) -> int:
        """In the queue's thread, so the questions are forgotten before the next claim runs there: a
        claim that takes one of them again (due at once) holds it anew, and is not forgotten with it."""
        released = self.queue.release(ids, self.owner, reason, retry_after_s, busy)
        self.held.difference_update(ids)
        self.summary.released += released
        return released

    def _stop_if_failed(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.feeder.cancel()
            self._stop_workers()

    def _stop_workers(self) -> None:
        current = asyncio.current_task()
        for worker in self.workers:
            if worker is not current:
                worker.cancel()

    # -- settle, renew, report ----------------------------------------------------------------
    async def _write(self) -> None:
        """Settle what has landed, in one transaction per wake-up: answers are stored as they come."""
        while True:
            landed = [await self.settled.get()]
            while not self.settled.empty():
                landed.append(self.settled.get_nowait())
            last = None in landed
            landed = [entry for entry in landed if entry is not None]
            # One write per question, and one count per write: were a question to land twice in a
            # batch (two copies of it in flight), its answer is written once and counted once.
            chosen: dict[int, tuple] = {}
            for entry in landed:
                kind, item, _ = entry
                if item.id not in chosen or (kind == "answered" and chosen[item.id][0] != "answered"):
                    chosen[item.id] = entry
            answers = {qid: record for qid, (kind, _, record) in chosen.items() if kind == "answered"}
            failures = {qid: error for qid, (kind, _, error) in chosen.items() if kind == "failed"}
            outcome = await self._db(self.queue.settle, self.owner, answers, failures) if landed else {}
            for entry in landed:
                kind, item, detail = entry
                if entry is chosen[item.id]:
                    self._count(item, outcome[item.id], detail)
                else:
                    self._count(item, None, "a second copy of a question this run was answering")
            if last:
                return

    def _count(self, item: Claimed, status: str | None, detail: StoredAnswer | str) -> None:
        self.held.discard(item.id)
        self.permits.release()
        s = self.summary
        if status == "answered":
            s.answered += 1
            s.not_covered += not detail.sources  # answered with no sources: retrieval found nothing
            s.languages[detail.lang] = s.languages.get(detail.lang, 0) + 1
            s.prompt_tokens += detail.usage.prompt_tokens
            s.output_tokens += detail.usage.completion_tokens
            return
        if status is None:
            s.lost += 1
        else:
            s.failed += status == "failed"
            s.dead += status == "dead"
        reason = detail if isinstance(detail, str) else "its lease went to another worker"
        s.problems.append({"id": item.id, "question": item.question[:120], "status": status or "lost",
                           "reason": reason})

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(self.queue.lease_s / 3)
            await self._db(self.queue.renew, sorted(self.held), self.owner)

    async def _progress(self) -> None:
        while self.on_progress:
            await asyncio.sleep(PROGRESS_S)
            self.on_progress(self.summary, self.busy)


def _failure(task: asyncio.Task) -> BaseException | None:
    return task.exception() if task.done() and not task.cancelled() else None


def _short(exc: BaseException) -> str:
    """A database error in one line: its type and first line, never the statement and its parameters."""
    orig = getattr(exc, "orig", None) or exc
    first = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
    return f"{type(orig).__name__}: {first}"[:500]
