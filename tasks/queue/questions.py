"""The question queue (SQLAlchemy Core): SQLite by default, PostgreSQL in production.

pending -> claimed (leased to one worker) -> answered
                                           -> failed (the question's fault: claimable again after a backoff)
                                           -> dead (after max attempts, with the last error)
                                           -> pending (released: not the question's fault, no attempt spent)
A claim is one statement: a materialized CTE picks the due rows (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL, so it is evaluated once and locks exactly what it picked) and the UPDATE leases them,
RETURNING what was leased; several workers never claim the same question, and a claim never
takes more than it asked for. A worker that dies lets its lease expire and the question is
claimed again (that attempt counts: a question that kills every worker that takes it ends dead).
Every state change after a claim checks the lease owner in the statement that makes it, so a
late worker cannot overwrite the answer of the one that took over; a worker renews the leases
of the questions it holds while it works on them.

What is stored comes through ``docsrag.tasks.core.records``: a question as the person asked it (less NUL,
which PostgreSQL cannot store; its controls are escaped where it is shown), what the model
server sent cleaned, bounded and typed; a batch of answers that fails to commit is stored
again row by row, so one bad row fails only its own question.

Order: oldest first by ``claim_rank`` = submit time minus ``priority`` x PRIORITY_STEP_S, so a
priority buys a bounded head start and never starves the questions already waiting. The table,
its database-side defaults and its migrations live in ``docsrag.tasks.queue.schema``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import case, create_engine, event, func, insert, or_, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, StatementError

from docsrag.tasks.core import language
from docsrag.tasks.core.errors import DocsragError
from docsrag.tasks.core.records import (
    MAX_CLIENT_KEY_CHARS,
    MAX_ERROR_CHARS,
    MAX_PRIORITY,
    STATUSES,
    QueueStats,
    StoredAnswer,
    clean,
    stored_question,
)
from docsrag.tasks.core.settings import Settings
from docsrag.tasks.queue.api_tables import one_vote_per_owner
from docsrag.tasks.queue.schema import metadata, open_schema, questions  # noqa: F401 - metadata: tests drop the tables

PRIORITY_STEP_S = 300.0  # one priority level counts as five minutes of waiting
_LANG = re.compile(r"[a-z]{2,3}")  # ISO 639-1 (or -3): the prompt names the language by it


class QuestionError(DocsragError, ValueError):
    """A question cannot be queued as given."""


@dataclass(frozen=True)
class Claimed:
    """A question row as a worker holds it."""

    id: int
    question: str
    version: str | None
    attempts: int
    lang: str | None = None  # None: queued without one (a row from before the column, or another writer)
    docs_lang: str | None = None  # the localized docs to answer from; None: English
    put_backs: int = 0  # times put back because the server was busy (bounded by the drain)


def now() -> datetime:
    return datetime.now(timezone.utc)


class Queue:
    def __init__(self, url: str, *, max_chars: int = 2000, max_attempts: int = 3, lease_s: float = 300.0,
                 backoff_s: float = 30.0):
        self.engine = _engine(url)
        self.max_chars, self.max_attempts, self.lease_s, self.backoff_s = max_chars, max_attempts, lease_s, backoff_s
        open_schema(self.engine, upgrades=(one_vote_per_owner,))  # the API's feedback: schema 4

    @classmethod
    def from_settings(cls, settings: Settings) -> Queue:
        return cls(settings.queue_url, max_chars=settings.max_question_chars,
                   max_attempts=settings.max_attempts, lease_s=settings.lease_s, backoff_s=settings.retry_backoff_s)

    def submit(self, question: str, *, version: str | None = None, client_key: str | None = None,
               priority: int = 0, lang: str | None = None, docs_lang: str | None = None,
               owner: str = "") -> tuple[int, bool]:
        """Queue a question; with a client key, the same owner submitting again gets the first id.
        -> (id, created). ``lang`` (ISO 639-1) is the language to answer in; detected from the
        question when not given. ``owner``: who asks (docsrag.tasks.service.guard.owner_of; "" the machine's own)."""
        question = stored_question(question).strip()  # as asked: only what the database cannot store goes
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
        check_client_key(client_key)
        lang = lang or language.detect(question)
        stamp = now()
        try:
            with self.engine.begin() as db:
                new_id = db.execute(insert(questions).values(
                    question=question, version=version, lang=lang, docs_lang=docs_lang,
                    client_key=client_key, owner=owner, status="pending", attempts=0, priority=priority,
                    claim_rank=stamp.timestamp() - priority * PRIORITY_STEP_S,
                    available_at=stamp, created_at=stamp, updated_at=stamp)).inserted_primary_key[0]
            return int(new_id), True
        except IntegrityError:
            if client_key is None:
                raise
            with self.engine.begin() as db:
                return int(db.scalar(select(questions.c.id).where(
                    (questions.c.owner == owner) & (questions.c.client_key == client_key)))), False

    def claim(self, limit: int, owner: str) -> list[Claimed]:
        """Lease up to ``limit`` questions that are due, in claim order: pending, failed past their
        backoff, or claimed by another worker whose lease has expired (with attempts left)."""
        stamp = now()
        expired = (questions.c.status == "claimed") & (questions.c.lease_expires_at < stamp)
        # Never a question this owner holds: its lease lapsing (a stalled renewal) makes it another
        # worker's to take, not this worker's to take again while it still works on it.
        theirs = or_(questions.c.lease_owner.is_(None), questions.c.lease_owner != owner)
        due = or_((questions.c.status.in_(("pending", "failed"))) & (questions.c.available_at <= stamp),
                  expired & theirs)
        # Materialized: evaluated once, so the rows it locked are the rows updated, never more than ``limit``.
        chosen = (select(questions.c.id).where(due).order_by(questions.c.claim_rank, questions.c.id).limit(limit)
                  .with_for_update(skip_locked=True).cte("chosen").prefix_with("MATERIALIZED"))
        claim = (update(questions).where(questions.c.id.in_(select(chosen.c.id)))
                 .values(status="claimed", lease_owner=owner, lease_expires_at=stamp + timedelta(seconds=self.lease_s),
                         attempts=questions.c.attempts + 1, updated_at=stamp,
                         last_error=case((expired, "a lease expired: its worker stopped before answering"),
                                         else_=questions.c.last_error))
                 .returning(questions.c.id, questions.c.question, questions.c.version, questions.c.attempts,
                            questions.c.lang, questions.c.docs_lang, questions.c.claim_rank, questions.c.put_backs))
        with self.engine.begin() as db:
            self._bury_expired(db, stamp)
            rows = db.execute(claim).all()
        rows.sort(key=lambda r: (r.claim_rank, r.id))
        return [Claimed(r.id, r.question, r.version, r.attempts, r.lang, r.docs_lang, r.put_backs) for r in rows]

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

    def release(self, ids: list[int], owner: str, reason: str, retry_after_s: float = 0, busy: bool = False) -> int:
        """Put questions back, not their fault (a server down or busy, a worker stopping): the attempt
        is given back and the reason kept; ``busy`` counts a put-back the drain bounds. -> how many
        were still held."""
        if not ids:
            return 0
        stamp = now()
        held = (questions.c.id.in_(ids)) & (questions.c.status == "claimed") & (questions.c.lease_owner == owner)
        with self.engine.begin() as db:
            done = db.execute(update(questions).where(held).values(
                status="pending", attempts=questions.c.attempts - 1, last_error=clean(reason, MAX_ERROR_CHARS),
                put_backs=questions.c.put_backs + int(busy), lease_owner=None, lease_expires_at=None,
                available_at=stamp + timedelta(seconds=retry_after_s), updated_at=stamp))
        return done.rowcount

    def settle(self, owner: str, answers: dict[int, StoredAnswer | dict] | None = None,
               failures: dict[int, str] | None = None) -> dict[int, str | None]:
        """Store answers and failures of questions this worker holds, in one transaction; if it cannot
        commit, row by row, and a row refused again fails its question with the database's reason.
        -> the new status per id: answered, failed (back after a backoff), dead, or None (lease lost).
        A database that is unreachable raises (OperationalError): nothing is stored, the leases stay."""
        answers, failures = answers or {}, failures or {}
        try:
            with self.engine.begin() as db:
                return self._settle(db, answers, failures, owner)
        except (StatementError, TypeError, ValueError) as exc:  # the driver may refuse a value itself
            if not _refused(exc) or not answers:
                raise
        outcome: dict[int, str | None] = {}
        for question_id, record in answers.items():
            outcome.update(self._settle_alone(owner, question_id, record))
        for question_id, error in failures.items():
            with self.engine.begin() as db:
                outcome[question_id] = self._fail(db, question_id, owner, error, now())
        return outcome

    def _settle_alone(self, owner: str, question_id: int, record: StoredAnswer | dict) -> dict[int, str | None]:
        try:
            with self.engine.begin() as db:
                return self._settle(db, {question_id: record}, {}, owner)
        except (StatementError, TypeError, ValueError) as exc:
            if not _refused(exc):
                raise
            reason = f"the answer could not be stored: {_short(exc)}"
        with self.engine.begin() as db:
            return {question_id: self._fail(db, question_id, owner, reason, now())}

    def _settle(self, db: Connection, answers: dict, failures: dict, owner: str) -> dict[int, str | None]:
        stamp = now()
        outcome: dict[int, str | None] = {}
        for question_id, record in answers.items():
            done = db.execute(update(questions).where(_held(question_id, owner)).values(
                status="answered", last_error=None, lease_expires_at=None, answered_at=stamp, updated_at=stamp,
                **_answer_row(record)))
            outcome[question_id] = "answered" if done.rowcount == 1 else None
        for question_id, error in failures.items():
            outcome[question_id] = self._fail(db, question_id, owner, error, stamp)
        return outcome

    def _fail(self, db, question_id: int, owner: str, error: str, stamp: datetime) -> str | None:
        # Locked as it is read, and written only while still held: a worker that took the question
        # over in between keeps it.
        attempts = db.scalar(select(questions.c.attempts).where(_held(question_id, owner)).with_for_update())
        if attempts is None:
            return None
        status = "dead" if attempts >= self.max_attempts else "failed"
        backoff = timedelta(seconds=min(self.backoff_s * 2 ** (attempts - 1), 3600))
        done = db.execute(update(questions).where(_held(question_id, owner)).values(
            status=status, last_error=clean(error, MAX_ERROR_CHARS), lease_expires_at=None,
            available_at=stamp + backoff, updated_at=stamp))
        return status if done.rowcount == 1 else None

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

    def stats(self, window_s: float = 300.0) -> QueueStats:
        """What an operator asks first: how much waits, for how long, and how fast answers come."""
        stamp = now()
        with self.engine.begin() as db:
            oldest = db.scalar(select(func.min(questions.c.created_at)).where(
                questions.c.status.in_(("pending", "failed", "claimed"))))
            recent = db.scalar(select(func.count()).where(
                (questions.c.status == "answered") & (questions.c.answered_at >= stamp - timedelta(seconds=window_s))))
        oldest = utc(oldest) if oldest is not None else None
        return QueueStats(self.counts(), round((stamp - oldest).total_seconds(), 1) if oldest else None,
                          round(recent / window_s, 3), window_s)


def _held(question_id: int, owner: str):
    """The question is still leased to this worker."""
    return (questions.c.id == question_id) & (questions.c.status == "claimed") & (questions.c.lease_owner == owner)


def _answer_row(record: StoredAnswer | dict) -> dict:
    """The columns of an answer, cleaned and bounded (a plain dict is a row given by a caller)."""
    if isinstance(record, StoredAnswer):
        return record.row()
    row = dict(record)
    for key, limit in (("answer", 32_000), ("reasoning", 64_000), ("model", 200)):
        if row.get(key) is not None:
            row[key] = clean(row[key], limit)
    return row


def _refused(exc: Exception) -> bool:
    """The database (or the driver) refused the row's data, rather than being unreachable."""
    return isinstance(exc, (DataError, IntegrityError)) or not isinstance(exc, DBAPIError)


def _short(exc: Exception) -> str:
    """The database's reason in one line, without the statement and its parameters."""
    orig = getattr(exc, "orig", None) or exc
    return f"{type(orig).__name__}: {str(orig).strip().splitlines()[0] if str(orig).strip() else ''}"[:500]


def check_client_key(key: str | None) -> None:
    """The same bound on SQLite (which would store any length) as on PostgreSQL (varchar)."""
    if key is not None and not 1 <= len(key) <= MAX_CLIENT_KEY_CHARS:
        raise QuestionError(f"the client key must be 1 to {MAX_CLIENT_KEY_CHARS} characters, not {len(key)}")


def _record(row) -> dict:
    record = dict(row)
    for key in ("created_at", "updated_at", "answered_at", "lease_expires_at", "available_at"):
        if record.get(key) is not None:
            record[key] = utc(record[key]).isoformat()
    return record


def utc(moment: datetime) -> datetime:
    """SQLite hands timestamps back naive (stored as UTC); PostgreSQL aware: both become aware UTC,
    so a browser never reads one as local time."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


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
    # A lost or hung server fails a call in seconds rather than hanging the drain (its leases then expire).
    return create_engine(url, pool_pre_ping=True,
                         connect_args={"connect_timeout": 10, "options": "-c statement_timeout=60000"})
