"""The question queue (SQLAlchemy Core): SQLite by default, PostgreSQL in production.

pending -> claimed (leased to one worker) -> answered
                                           -> failed (claimable again after a backoff)
                                           -> dead (after max attempts, with the last error)
A claim is one UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING, so
several workers never claim the same question; a worker that dies lets its lease expire
and the question is claimed again. Every state change after a claim checks the lease owner,
so a late worker cannot overwrite the answer of the one that took over.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import (
    JSON, Column, DateTime, Integer, MetaData, String, Table, Text, create_engine, event, func, insert, or_,
    select, update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from tasks.settings import Settings

STATUSES = ("pending", "claimed", "answered", "failed", "dead")
metadata = MetaData()
questions = Table(
    "docsrag_questions", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("client_key", String(200), unique=True),
    Column("question", Text, nullable=False),
    Column("version", String(64)),
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
)


class QuestionError(ValueError):
    """A question cannot be queued as given."""


@dataclass(frozen=True)
class Claimed:
    id: int
    question: str
    version: str | None
    attempts: int


def now() -> datetime:
    return datetime.now(timezone.utc)


class Queue:
    def __init__(self, url: str, *, max_chars: int = 2000, max_attempts: int = 3, lease_s: float = 300.0,
                 backoff_s: float = 30.0):
        self.engine = _engine(url)
        self.max_chars, self.max_attempts, self.lease_s, self.backoff_s = max_chars, max_attempts, lease_s, backoff_s
        metadata.create_all(self.engine)

    @classmethod
    def from_settings(cls, settings: Settings) -> Queue:
        return cls(settings.queue_url, max_chars=settings.max_question_chars,
                   max_attempts=settings.max_attempts, lease_s=settings.lease_s, backoff_s=settings.retry_backoff_s)

    def submit(self, question: str, *, version: str | None = None, client_key: str | None = None) -> tuple[int, bool]:
        """Queue a question; with a client key, submitting again returns the first id. -> (id, created)."""
        question = question.strip()
        if not question:
            raise QuestionError("the question is empty")
        if len(question) > self.max_chars:
            raise QuestionError(f"the question has {len(question)} characters, over the limit of {self.max_chars} "
                                "(DOCSRAG_MAX_QUESTION_CHARS)")
        stamp = now()
        try:
            with self.engine.begin() as db:
                new_id = db.execute(insert(questions).values(
                    question=question, version=version, client_key=client_key, status="pending", attempts=0,
                    available_at=stamp, created_at=stamp, updated_at=stamp)).inserted_primary_key[0]
            return int(new_id), True
        except IntegrityError:
            if client_key is None:
                raise
            with self.engine.begin() as db:
                return int(db.scalar(select(questions.c.id).where(questions.c.client_key == client_key))), False

    def claim(self, limit: int, owner: str) -> list[Claimed]:
        """Lease up to ``limit`` questions that are due: pending, failed past their backoff,
        or claimed by a worker whose lease has expired."""
        stamp = now()
        due = or_(
            (questions.c.status.in_(("pending", "failed"))) & (questions.c.available_at <= stamp),
            (questions.c.status == "claimed") & (questions.c.lease_expires_at < stamp),
        )
        chosen = (select(questions.c.id).where(due).order_by(questions.c.id).limit(limit)
                  .with_for_update(skip_locked=True))
        claim = (update(questions).where(questions.c.id.in_(chosen.scalar_subquery()))
                 .values(status="claimed", lease_owner=owner, lease_expires_at=stamp + timedelta(seconds=self.lease_s),
                         attempts=questions.c.attempts + 1, updated_at=stamp)
                 .returning(questions.c.id, questions.c.question, questions.c.version, questions.c.attempts))
        with self.engine.begin() as db:
            rows = db.execute(claim).all()
        return sorted((Claimed(r.id, r.question, r.version, r.attempts) for r in rows), key=lambda c: c.id)

    def answer(self, question_id: int, owner: str, **record) -> bool:
        """Store the answer if this worker still holds the lease. -> stored?"""
        stamp = now()
        with self.engine.begin() as db:
            done = db.execute(update(questions).where(_held(question_id, owner)).values(
                status="answered", last_error=None, lease_expires_at=None, answered_at=stamp, updated_at=stamp,
                **record))
        return done.rowcount == 1

    def fail(self, question_id: int, owner: str, error: str) -> str | None:
        """Record a failure: back to the queue after a backoff, or dead after the last attempt."""
        stamp = now()
        with self.engine.begin() as db:
            attempts = db.scalar(select(questions.c.attempts).where(_held(question_id, owner)))
            if attempts is None:
                return None
            status = "dead" if attempts >= self.max_attempts else "failed"
            backoff = timedelta(seconds=min(self.backoff_s * 2 ** (attempts - 1), 3600))
            db.execute(update(questions).where(questions.c.id == question_id).values(
                status=status, last_error=error[:4000], lease_expires_at=None, available_at=stamp + backoff,
                updated_at=stamp))
        return status

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


def _held(question_id: int, owner: str):
    """The question is still leased to this worker."""
    return (questions.c.id == question_id) & (questions.c.status == "claimed") & (questions.c.lease_owner == owner)


def _record(row) -> dict:
    record = dict(row)
    for key in ("created_at", "updated_at", "answered_at", "lease_expires_at", "available_at"):
        if record.get(key) is not None:
            record[key] = record[key].isoformat()
    return record


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
