"""What the CLI and the HTTP API do with questions, in one place: submit, show, wait, search,
feedback, stats. Both edges parse and print; neither holds logic of its own.

A service is built once per process at the edge (``Service(settings, announce=...)``); the
edge says how a new question is announced (the CLI flushes the event before it exits, the
API lets Prefect's events worker send it in the background).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from pymilvus.exceptions import MilvusException

from docsrag.tasks.answer.generate import NO_TRANSLATION, untranslated
from docsrag.tasks.core.errors import DocsragError
from docsrag.tasks.core.language import DEFAULT as DEFAULT_LANGUAGE
from docsrag.tasks.core.records import Hit, QueueStats, Source
from docsrag.tasks.core.redaction import redact_text
from docsrag.tasks.core.settings import Settings
from docsrag.tasks.core.summaries import DrainSummary
from docsrag.tasks.embed import embedding
from docsrag.tasks.index import served as serving
from docsrag.tasks.index import store
from docsrag.tasks.index.schema import Corpus, aliases_for
from docsrag.tasks.queue.api_tables import open_tables
from docsrag.tasks.queue.feedback import Feedback, FeedbackTotals
from docsrag.tasks.queue.questions import Queue
from docsrag.tasks.queue.repeats import Asked, RepeatKey, Repeats
from docsrag.tasks.queue.waiting import FINAL, AnswerWatch
from docsrag.tasks.service.coverage import Closest, CoverageGap, TranslationGaps, gaps, translation_gaps

log = logging.getLogger(__name__)

# Polling a database for one question: quick at first (answers often land within a second),
# then once a second at most.
POLL_FIRST_S, POLL_MAX_S = 0.1, 1.0
SEARCH_DEPTH = 10  # a search for k documents reads 10k chunks, so k documents remain once each is shown once
WORKER_GRACE_S = 30.0  # with a server, a worker started by the question's event should claim it well within this

Announce = Callable[[int, "str | None"], None]


class UnknownQuestion(DocsragError, LookupError):
    """No question has this id, or none the caller may see (the same answer: ids are not probed)."""


class NotServed(DocsragError, LookupError):
    """No collection serves the docs version or language asked for."""


@dataclass(frozen=True)
class Submitted:
    id: int
    status: str
    created: bool  # False: the client key named a question already queued
    repeat_of: int | None = None  # answered at submit from this question's answer


@dataclass(frozen=True)
class QuestionView:
    """A question as a reader sees it: never the lease, the worker or the claim order."""

    id: int
    question: str
    status: str
    lang: str | None
    version: str | None
    docs_lang: str | None
    answer: str | None
    sources: list[Source]
    model: str | None
    reasoning_effort: str | None
    usage: dict | None
    latency_ms: int | None
    attempts: int
    last_error: str | None
    created_at: str | None
    answered_at: str | None
    repeat_of: int | None
    collection: str | None  # what the alias served when it was asked (None: not known)
    untranslated: str | None = None  # why it was searched as asked though it wanted a translation
    reasoning: str | None = None

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def to_dict(self, reasoning: bool = False) -> dict:
        shown = asdict(self) | {"sources": [source.cited for source in self.sources]}
        if not reasoning:
            del shown["reasoning"]
        return shown


@dataclass(frozen=True)
class SearchResults:
    query: str
    searched_as: str
    results: list[Hit]
    note: str | None = None  # why a question not in English was searched as asked

    def to_dict(self) -> dict:
        shown = {"query": self.query, "results": [hit.shown() for hit in self.results]}
        return shown | ({"searched_as": self.searched_as} if self.searched_as != self.query else {}) | (
            {"note": self.note} if self.note else {})


@dataclass(frozen=True)
class ServiceStats:
    queue: QueueStats
    answered_from_repeats: int
    feedback: FeedbackTotals
    coverage_gaps: list[CoverageGap] = field(default_factory=list)
    translation_gaps: TranslationGaps = field(default_factory=TranslationGaps)  # not docs gaps: listed apart

    def to_dict(self) -> dict:
        return {**self.queue.to_dict(), "answered_from_repeats": self.answered_from_repeats,
                "feedback": self.feedback.to_dict(), "coverage_gaps": [g.to_dict() for g in self.coverage_gaps],
                "translation_gaps": self.translation_gaps.to_dict()}




def _said_if_down(drained: DrainSummary, question_id: int) -> None:
    """A drain stopped by an outage (the LLM server down or misconfigured, Milvus failing) will not
    answer by waiting longer: said now, the question left queued for when the server is back."""
    if drained.outage:
        from docsrag.tasks.answer.drain import ServingOutage

        raise ServingOutage(f"question {question_id} stays queued: {drained.outage}")


class Service:
    def __init__(self, settings: Settings, *, announce: Announce | None = None, queue: Queue | None = None,
                 served_ttl_s: float = 0.0, check_repeats: bool = True, retriever=None):
        """``served_ttl_s``: how long a look-up of the collection an alias serves is reused (a
        long-lived API saves a Milvus call per question; a repeat goes stale that much later).
        ``check_repeats``: look for an answer to reuse at submit (it opens the index).
        ``retriever``: one the caller has open already (the answer flow's)."""
        self.settings = settings
        self.check_repeats = check_repeats
        self._queue = queue
        self.announce = announce
        self.served_ttl_s = served_ttl_s
        self._retriever = retriever
        self._client = None
        self._served: dict[str, tuple[float, str | None]] = {}
        self._lock = threading.Lock()
        self._watch: AnswerWatch | None = None

    # -- questions ---------------------------------------------------------------------------

    @functools.cached_property
    def queue(self) -> Queue:
        """Opened on first use: a search never touches the queue's database."""
        queue = self._queue or Queue.from_settings(self.settings)
        open_tables(queue.engine)
        return queue

    @functools.cached_property
    def repeats(self) -> Repeats:
        return Repeats(self.queue.engine)

    @functools.cached_property
    def feedback_store(self) -> Feedback:
        return Feedback(self.queue.engine)

    def submit(self, question: str, *, version: str | None = None, docs_lang: str | None = None,
               answer_in: str | None = None, priority: int = 0, client_key: str | None = None,
               owner: str = "") -> Submitted:
        """Queue a question (QuestionError when it cannot be), answered at once when it repeats one
        already answered from the collection served now; announced otherwise. ``owner``: who asks
        (an API token's hash; "" the machine's own); a client key names that owner's questions only.
        Docs asked for by name (a version, a language) that nothing serves are refused before
        anything is queued (NotServed), instead of failing and being retried by a worker."""
        if version or docs_lang:
            self.check_served(version, docs_lang)
        question_id, created = self.queue.submit(question, version=version, client_key=client_key, priority=priority,
                                                 lang=answer_in, docs_lang=docs_lang, owner=owner)
        if not created:
            return Submitted(question_id, self.queue.get(question_id)["status"], False,
                             self.repeats.about(question_id).repeat_of)
        original = self._answer_if_repeated(question_id, version, docs_lang) if self.check_repeats else None
        if original is None and self.announce:
            self.announce(question_id, version)
        return Submitted(question_id, "answered" if original else "pending", True, original)

    def _answer_if_repeated(self, question_id: int, version: str | None, docs_lang: str | None) -> int | None:
        collection = self.served(version, docs_lang)
        if collection is None:  # nothing served (yet): the worker will say so; nothing to repeat
            return None
        record = self.queue.get(question_id)
        key = RepeatKey.of(record["question"], record["lang"], version, docs_lang)
        original = self.repeats.original(key, collection, record["owner"])  # never another caller's answer
        if original is not None and self.repeats.answer_pending(question_id, original, key, collection):
            return original
        if original is None:
            self.repeats.remember(question_id, key, collection)
        return None

    def show(self, question_id: int, owner: str | None = None) -> QuestionView:
        """``owner``: the question must be this owner's (None: any, for the operator and the CLI)."""
        return _view(self._record(question_id, owner), self.repeats.about(question_id))

    def _record(self, question_id: int, owner: str | None) -> dict:
        record = self.queue.get(question_id)
        if record is None or (owner is not None and record["owner"] != owner):
            raise UnknownQuestion(f"no question {question_id}")
        return record

    def wait(self, question_id: int, wait_s: float, *, answer_here: bool = False,
             worker_expected: bool = True) -> QuestionView:
        """Poll until the question is answered or dead, at most ``wait_s``. With ``answer_here``, a
        question no worker takes (none expected, or none within the grace period) is answered in
        this process: the same drain a worker runs."""
        started = time.monotonic()
        pause = POLL_FIRST_S
        view = self.show(question_id)
        while not view.final and (waited := time.monotonic() - started) < wait_s:
            grace = min(WORKER_GRACE_S, wait_s / 2)
            if answer_here and view.status == "pending" and (not worker_expected or waited > grace):
                _said_if_down(self.drain(max_seconds=max(1.0, wait_s - waited)), question_id)
            else:
                time.sleep(min(pause, max(0.0, wait_s - waited)))
                pause = min(pause * 2, POLL_MAX_S)
            view = self.show(question_id)
        return view

    async def wait_async(self, question_id: int, wait_s: float, owner: str | None = None) -> QuestionView:
        """``wait`` for an event loop: the process's one watcher polls for every waiter (docsrag.tasks.queue.waiting)."""
        view = await asyncio.to_thread(self.show, question_id, owner)
        if not view.final and wait_s > 0:
            if self._watch is None:
                self._watch = AnswerWatch(self.queue.engine)
            if await self._watch.wait(question_id, wait_s):
                view = await asyncio.to_thread(self.show, question_id, owner)
        return view

    def drain(self, max_seconds: float, owner: str = "cli"):
        """Answer what is queued, in this process: the drain the answer flow's worker runs (for the
        CLI's ``ask --wait`` and ``api --answer``, where Milvus Lite serves this process only)."""
        import uuid

        from docsrag.tasks.answer.drain import Drain

        retriever = self.retriever()
        retriever.collection()
        return asyncio.run(Drain(self.settings, self.queue, retriever, owner=f"{owner}-{uuid.uuid4().hex[:12]}",
                                 max_seconds=max_seconds).run())

    def list(self, status: str | None, limit: int) -> list[dict]:
        return self.queue.list(status, limit)

    def add_feedback(self, question_id: int, helpful: bool, comment: str | None = None,
                     owner: str | None = None, voter: str = "") -> None:
        """``owner``: as for ``show``: only the asker (or the operator) rates an answer. ``voter``: who
        votes (the caller's owner); a vote replaces the same voter's earlier one on this question."""
        self._record(question_id, owner)
        self.feedback_store.add(question_id, helpful, comment, owner=voter)

    # -- the index ---------------------------------------------------------------------------

    def retriever(self):
        """The Milvus client and the embedders, loaded once (the first search or drain). The service's
        edge of the search path: the embedders are resolved here, not when the service is made, so a
        command that only asks or shows never measures the precision."""
        with self._lock:
            if self._retriever is None:
                from docsrag.tasks.answer.retrieve import Retriever

                self._retriever = Retriever(self.settings, embedding.resolve(self.settings))
            return self._retriever

    def search(self, query: str, k: int = 5, version: str | None = None, docs_lang: str | None = None) -> SearchResults:
        from docsrag.tasks.answer.generate import searched_as
        from docsrag.tasks.answer.retrieve import one_per_document

        retriever = self.retriever()
        try:
            retriever.collection(version, docs_lang)
        except store.StoreError as exc:
            raise NotServed(str(exc)) from None
        except MilvusException as exc:  # the index is there but damaged, or Milvus failed: not the caller's doing
            raise store.StoreError(f"Milvus failed to open the index: {redact_text(exc.message)}") from None
        [searched] = searched_as(self.settings, [query])
        try:  # deeper than k: a document's further chunks give way to other documents
            hits = retriever.search([searched], k * SEARCH_DEPTH, version, docs_lang)[0]
        except MilvusException as exc:
            raise store.StoreError(f"Milvus failed a search: {redact_text(exc.message)}") from None
        return SearchResults(query, searched, one_per_document(hits, k), self._untranslated(query, searched))

    def versions(self) -> list[serving.ServedCorpus]:
        """What is served, per language: versions, aliases, collections, rows, rollback targets."""
        return serving.corpora(self._milvus(), self.settings.collection)

    def check_served(self, version: str | None, docs_lang: str | None) -> None:
        """NotServed, naming what is served, when no alias serves these docs. A Milvus that cannot be
        asked refuses nothing: the queue keeps the question, and its worker says what it finds."""
        if self.served(version, docs_lang) is not None:
            return
        try:
            reason = serving.not_served(self._milvus(), Corpus(self.settings.collection, docs_lang or DEFAULT_LANGUAGE),
                                       version)
        except (store.StoreError, MilvusException) as exc:
            log.warning("the docs asked for were not checked: Milvus unavailable (%s)", exc)
            return
        raise NotServed(reason)

    def _untranslated(self, query: str, searched: str) -> str | None:
        """A question not in English searches English docs poorly: the reader is told when it went as
        asked, for the reason a stored answer gives (generate.untranslated), said for a search."""
        from docsrag.tasks.core import language

        why = untranslated(self.settings, language.detect(query), searched != query)
        if why is None:
            return None  # translated, or in a language the multilingual field finds as asked
        why = "no LLM to translate" if why == NO_TRANSLATION else why
        # What the reader can do without an LLM: the multilingual model measured best on Korean and Indonesian.
        better = "" if self.settings.multilingual == "e5" else "; DOCSRAG_MULTILINGUAL=e5 reads it better"
        return f"searched as asked: {why}{better}"

    def served(self, version: str | None, docs_lang: str | None) -> str | None:
        """The collection the alias for ``version`` / ``docs_lang`` serves now (None: none or no Milvus)."""
        alias = aliases_for(self.settings.collection, version, docs_lang or DEFAULT_LANGUAGE)
        seen = self._served.get(alias)
        if seen and time.monotonic() - seen[0] < self.served_ttl_s:
            return seen[1]
        try:
            name = store.served_collection(self._milvus(), alias)
        except Exception as exc:  # noqa: BLE001 - the repeat check is a saving, never a reason to refuse a question
            log.warning("repeated questions not checked: Milvus unavailable (%s)", exc)
            name = None
        self._served[alias] = (time.monotonic(), name)
        return name

    def _milvus(self):
        with self._lock:
            if self._retriever is not None:
                return self._retriever.client
            if self._client is None:
                self._client = store.connect(self.settings)
            return self._client

    # -- stats -------------------------------------------------------------------------------

    def stats(self, gap_limit: int = 200) -> ServiceStats:
        return ServiceStats(self.queue.stats(), self.repeats.answered_from_repeats(), self.feedback_store.totals(),
                            self.coverage_gaps(gap_limit), translation_gaps(self.queue.engine))

    def coverage_gaps(self, limit: int = 200) -> list[CoverageGap]:
        return gaps(self.queue.engine, self.feedback_store.not_helpful(limit), self._closest, limit)

    def _closest(self, texts: list[str]) -> list[Closest | None] | None:
        try:
            found = self.retriever().search(texts, 1)
        except Exception as exc:  # noqa: BLE001 - no index served: gaps are listed without a document
            log.warning("coverage gaps not searched: %s", exc)
            return None
        return [Closest(hits[0].doc_path, hits[0].heading, hits[0].score) if hits else None
                for hits in found]


def _view(record: dict, asked: Asked) -> QuestionView:
    return QuestionView(
        id=record["id"], question=record["question"], status=record["status"], lang=record["lang"],
        version=record["version"], docs_lang=record["docs_lang"], answer=record["answer"],
        sources=[Source.stored(cited) for cited in record["sources"] or []], model=record["model"], reasoning_effort=record["reasoning_effort"],
        usage=record["usage"], latency_ms=record["latency_ms"], attempts=record["attempts"],
        last_error=record["last_error"], created_at=record["created_at"], answered_at=record["answered_at"],
        repeat_of=asked.repeat_of, collection=asked.collection, untranslated=record["untranslated"],
        reasoning=record["reasoning"])
