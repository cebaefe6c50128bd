"""The question queue (SQLAlchemy Core): SQLite by default, PostgreSQL in production.

pending -> claimed (leased to one worker) -> answered
                                           -> failed (the question's fault: claimable again after a backoff)
                                           -> dead (after max attempts, with the last error)
                                           -> pending (released: not the question's fault, no attempt spent)
A claim is one UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING, so
several workers never claim the same question; a worker that dies lets its lease expire
and the question is claimed again (that attempt counts: a question that kills every worker
that takes it ends dead). Every state change after a claim checks the lease owner, so a late
worker cannot overwrite the answer of the one that took over; a worker renews the leases of
the questions it holds while it works on them.

Order: oldest first by ``claim_rank`` = submit time minus ``priority`` x PRIORITY_STEP_S, so a
priority buys a bounded head start and never starves the questions already waiting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import (
    JSON, Column, DateTime, Float, Index, Integer, MetaData, String, Table, Text, case, create_engine, event, func,
    insert, inspect, or_, select, text, update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from tasks import language
from tasks.settings import Settings

STATUSES = ("pending", "claimed", "answered", "failed", "dead")
PRIORITY_STEP_S = 300.0  # one priority level counts as five minutes of waiting
MAX_PRIORITY = 10
_LANG = re.compile(r"[a-z]{2,3}")  # ISO 639-1 (or -3): the prompt names the language by it
metadata = MetaData()
questions = Table(
    "docsrag_questions", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("client_key", String(200), unique=True),
    Column("question", Text, nullable=False),
    Column("version", String(64)),
    Column("lang", String(8)),
    Column("docs_lang", String(8)),  # answer from the localized docs in this language (None: English)  # ISO 639-1, detected at submit (or when claimed, for rows written by others)
    Column("priority", Integer, nullable=False, default=0),
    Column("claim_rank", Float, nullable=False, default=0.0),  # submit time minus the priority's head start
    Column("status", String(16), nullable=False, index=True, default="pending"),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text),
    Column("lease_owner", String(64)),
    Column("lease_expires_at", DateTime(timezone=True)),
    Column("available_at", DateTime(timezone=True), nullable=False),
    Column("answer", Text),
    Column("reasoning", Text),  # kept apart from the answer, shown only on request
    Column("sources", JSON),
    Column("model", String(200)),
    Column("reasoning_effort", String(16)),
    Column("usage", JSON),
    Column("latency_ms", Integer),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("answered_at", DateTime(timezone=True)),
    Index("docsrag_questions_due", "status", "claim_rank"),
)
# Columns added after the first release: an existing queue gets them on open (ALTER TABLE ... ADD).
_ADDED_COLUMNS = {"priority": "INTEGER NOT NULL DEFAULT 0", "claim_rank": "FLOAT NOT NULL DEFAULT 0",
                  "lang": "VARCHAR(8)", "docs_lang": "VARCHAR(8)"}


class QuestionError(ValueError):
    """A question cannot be queued as given."""


@dataclass(frozen=True)
class Claimed:
    id: int
    question: str
    version: str | None
    attempts: int
    lang: str | None = None  # None: queued without one (a row from before the column, or another writer)
    docs_lang: str | None = None  # the localized docs to answer from; None: English


def now() -> datetime:
    return datetime.now(timezone.utc)


class Queue:
    def __init__(self, url: str, *, max_chars: int = 2000, max_attempts: int = 3, lease_s: float = 300.0,
                 backoff_s: float = 30.0):
        self.engine = _engine(url)
        self.max_chars, self.max_attempts, self.lease_s, self.backoff_s = max_chars, max_attempts, lease_s, backoff_s
        metadata.create_all(self.engine)
        _add_missing_columns(self.engine)

    @classmethod
    def from_settings(cls, settings: Settings) -> Queue:
        return cls(settings.queue_url, max_chars=settings.max_question_chars,
                   max_attempts=settings.max_attempts, lease_s=settings.lease_s, backoff_s=settings.retry_backoff_s)

    def submit(self, question: str, *, version: str | None = None, client_key: str | None = None,
               priority: int = 0, lang: str | None = None, docs_lang: str | None = None) -> tuple[int, bool]:
        """Queue a question; with a client key, submitting again returns the first id. -> (id, created).
        ``lang`` (ISO 639-1) is the language to answer in; detected from the question when not given."""
        question = question.strip()
        if not question:
            raise QuestionError("the question is empty")
        if len(question) > self.max_chars:
            raise QuestionError(f"the question has {len(question)} characters, over the limit of {self.max_chars} "
                                "(DOCSRAG_MAX_QUESTION_CHARS)")
        if not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
            raise QuestionError(f"the priority must be between -{MAX_PRIORITY} and {MAX_PRIORITY}, not {priority}")
        for given in (lang, docs_lang):
            if given is not None and not _LANG.fullmatch(given):
                raise QuestionError(f"the language must be an ISO 639-1 code like 'ko', not {given!r}")
        lang = lang or language.detect(question)
        stamp = now()
        try:
            with self.engine.begin() as db:
                new_id = db.execute(insert(questions).values(
                    question=question, version=version, lang=lang, docs_lang=docs_lang, client_key=client_key, status="pending",
                    attempts=0, priority=priority, claim_rank=stamp.timestamp() - priority * PRIORITY_STEP_S,
                    available_at=stamp, created_at=stamp, updated_at=stamp)).inserted_primary_key[0]
            return int(new_id), True
        except IntegrityError:
            if client_key is None:
                raise
            with self.engine.begin() as db:
                return int(db.scalar(select(questions.c.id).where(questions.c.client_key == client_key))), False

    def claim(self, limit: int, owner: str) -> list[Claimed]:
        """Lease up to ``limit`` questions that are due, in claim order: pending, failed past their
        backoff, or claimed by a worker whose lease has expired (with attempts left)."""
        stamp = now()
        expired = (questions.c.status == "claimed") & (questions.c.lease_expires_at < stamp)
        due = or_((questions.c.status.in_(("pending", "failed"))) & (questions.c.available_at <= stamp), expired)
        chosen = (select(questions.c.id).where(due).order_by(questions.c.claim_rank, questions.c.id).limit(limit)
                  .with_for_update(skip_locked=True))
        claim = (update(questions).where(questions.c.id.in_(chosen.scalar_subquery()))
                 .values(status="claimed", lease_owner=owner, lease_expires_at=stamp + timedelta(seconds=self.lease_s),
                         attempts=questions.c.attempts + 1, updated_at=stamp,
                         last_error=case((expired, "a lease expired: its worker stopped before answering"),
                                         else_=questions.c.last_error))
                 .returning(questions.c.id, questions.c.question, questions.c.version, questions.c.attempts,
                            questions.c.lang, questions.c.docs_lang, questions.c.claim_rank))
        with self.engine.begin() as db:
            self._bury_expired(db, stamp)
            rows = db.execute(claim).all()
        rows.sort(key=lambda r: (r.claim_rank, r.id))
        return [Claimed(r.id, r.question, r.version, r.attempts, r.lang, r.docs_lang) for r in rows]

    def _bury_expired(self, db, stamp: datetime) -> None:
        """Questions whose every attempt ended with the worker gone are dead, with that reason."""
        db.execute(update(questions).where(
            (questions.c.status == "claimed") & (questions.c.lease_expires_at < stamp)
            & (questions.c.attempts >= self.max_attempts)).values(
            status="dead", lease_expires_at=None, updated_at=stamp,
            last_error=f"its worker stopped before answering (lease expired) on all {self.max_attempts} attempts"))

    def renew(self, ids: list[int], owner: str) -> set[int]:
        """Extend the leases this worker still holds. -> the ids still held."""
        if not ids:
            return set()
        stamp = now()
        held = (questions.c.id.in_(ids)) & (questions.c.status == "claimed") & (questions.c.lease_owner == owner)
        with self.engine.begin() as db:
            rows = db.execute(update(questions).where(held).values(
                lease_expires_at=stamp + timedelta(seconds=self.lease_s)).returning(questions.c.id)).all()
        return {r.id for r in rows}

    def release(self, ids: list[int], owner: str, reason: str, retry_after_s: float = 0) -> int:
        """Put questions back, not their fault (a server down or busy, a worker stopping): the attempt
        is given back and the reason kept. -> how many were still held."""
        if not ids:
            return 0
        stamp = now()
        held = (questions.c.id.in_(ids)) & (questions.c.status == "claimed") & (questions.c.lease_owner == owner)
        with self.engine.begin() as db:
            done = db.execute(update(questions).where(held).values(
                status="pending", attempts=questions.c.attempts - 1, last_error=reason[:4000], lease_owner=None,
                lease_expires_at=None, available_at=stamp + timedelta(seconds=retry_after_s), updated_at=stamp))
        return done.rowcount

    def settle(self, owner: str, answers: dict[int, dict] | None = None,
               failures: dict[int, str] | None = None) -> dict[int, str | None]:
        """Store answers and failures of questions this worker holds, in one transaction.
        -> the new status per id: answered, failed (back after a backoff), dead, or None (lease lost)."""
        stamp = now()
        outcome: dict[int, str | None] = {}
        with self.engine.begin() as db:
            for question_id, record in (answers or {}).items():
                done = db.execute(update(questions).where(_held(question_id, owner)).values(
                    status="answered", last_error=None, lease_expires_at=None, answered_at=stamp, updated_at=stamp,
                    **record))
                outcome[question_id] = "answered" if done.rowcount == 1 else None
            for question_id, error in (failures or {}).items():
                outcome[question_id] = self._fail(db, question_id, owner, error, stamp)
        return outcome

    def _fail(self, db, question_id: int, owner: str, error: str, stamp: datetime) -> str | None:
        attempts = db.scalar(select(questions.c.attempts).where(_held(question_id, owner)))
        if attempts is None:
            return None
        status = "dead" if attempts >= self.max_attempts else "failed"
        backoff = timedelta(seconds=min(self.backoff_s * 2 ** (attempts - 1), 3600))
        db.execute(update(questions).where(questions.c.id == question_id).values(
            status=status, last_error=error[:4000], lease_expires_at=None, available_at=stamp + backoff,
            updated_at=stamp))
        return status

    def answer(self, question_id: int, owner: str, **record) -> bool:
        """Store the answer if this worker still holds the lease. -> stored?"""
        return self.settle(owner, answers={question_id: record})[question_id] == "answered"

    def fail(self, question_id: int, owner: str, error: str) -> str | None:
        """Record the question's own failure: back to the queue after a backoff, or dead after the last attempt."""
        return self.settle(owner, failures={question_id: error})[question_id]

    def get(self, question_id: int) -> dict | None:
        with self.engine.begin() as db:
            row = db.execute(select(questions).where(questions.c.id == question_id)).mappings().first()
        return _record(row) if row else None

    def list(self, status: str | None = None, limit: int = 100) -> list[dict]:
        query = select(questions).order_by(questions.c.id.desc()).limit(limit)
        if status:
            query = query.where(questions.c.status == status)
        with self.engine.begin() as db:
            return [_record(row) for row in db.execute(query).mappings()]

    def counts(self) -> dict[str, int]:
        with self.engine.begin() as db:
            found = dict(db.execute(select(questions.c.status, func.count()).group_by(questions.c.status)).all())
        return {status: int(found.get(status, 0)) for status in STATUSES}

    def stats(self, window_s: float = 300.0) -> dict:
        """What an operator asks first: how much waits, for how long, and how fast answers come."""
        stamp = now()
        with self.engine.begin() as db:
            oldest = db.scalar(select(func.min(questions.c.created_at)).where(
                questions.c.status.in_(("pending", "failed", "claimed"))))
            recent = db.scalar(select(func.count()).where(
                (questions.c.status == "answered") & (questions.c.answered_at >= stamp - timedelta(seconds=window_s))))
        if oldest is not None and oldest.tzinfo is None:  # SQLite hands back naive UTC
            oldest = oldest.replace(tzinfo=timezone.utc)
        return {"counts": self.counts(),
                "oldest_waiting_s": round((stamp - oldest).total_seconds(), 1) if oldest else None,
                "answers_per_s": round(recent / window_s, 3), "window_s": window_s}


def _held(question_id: int, owner: str):
    """The question is still leased to this worker."""
    return (questions.c.id == question_id) & (questions.c.status == "claimed") & (questions.c.lease_owner == owner)


def _record(row) -> dict:
    record = dict(row)
    for key in ("created_at", "updated_at", "answered_at", "lease_expires_at", "available_at"):
        if record.get(key) is not None:
            record[key] = record[key].isoformat()
    return record


def _add_missing_columns(engine: Engine) -> None:
    present = {column["name"] for column in inspect(engine).get_columns(questions.name)}
    with engine.begin() as db:
        for name, ddl in _ADDED_COLUMNS.items():
            if name not in present:
                db.execute(text(f"ALTER TABLE {questions.name} ADD COLUMN {name} {ddl}"))


def _engine(url: str) -> Engine:
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite:///"):
        from pathlib import Path

        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        # SQLite: take the write lock at BEGIN, so a claim's read and write cannot interleave.
        event.listen(engine, "connect", lambda conn, _: setattr(conn, "isolation_level", None))
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        return engine
    return create_engine(url, pool_pre_ping=True)
