"""The tables the questions API keeps beside the queue's own (``docsrag.tasks.queue.schema``): repeated
questions, feedback, and the documents a "not covered" question came closest to.

They live in the queue's database, so a product's stats and the queue agree, and are created
once under a lock (PostgreSQL: a transaction-level advisory lock of their own; SQLite: the
``BEGIN IMMEDIATE`` the queue's engine takes), so two API processes starting together on a
fresh database do not both create them.
"""

from __future__ import annotations

from sqlalchemy import Boolean, Column, DateTime, Float, Index, Integer, MetaData, String, Table, Text, inspect, text
from sqlalchemy.engine import Engine

from docsrag.tasks.queue.schema import utc_now

_LOCK_KEY = 0x646F63617069  # "docapi": distinct from the queue's migration lock

metadata = MetaData()

# One row per question submitted through the service: its repeat key and the collection served
# when it was asked. ``repeat_of``: the question whose answer it was given at submit.
repeats = Table(
    "docsrag_repeats", metadata,
    Column("question_id", Integer, primary_key=True, autoincrement=False),
    Column("repeat_key", String(64), nullable=False),
    Column("collection", String(255), nullable=False),
    Column("repeat_of", Integer),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=utc_now()),
    Index("docsrag_repeats_key", "repeat_key", "collection"),
)

feedback = Table(
    "docsrag_feedback", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("question_id", Integer, nullable=False, index=True),
    Column("helpful", Boolean, nullable=False),
    Column("comment", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=utc_now()),
)

# A "not covered" answer stores no sources: the closest document is searched once and kept.
nearest = Table(
    "docsrag_nearest", metadata,
    Column("question_id", Integer, primary_key=True, autoincrement=False),
    Column("doc_path", String(1000)),
    Column("heading", String(1000)),
    Column("score", Float),
)


def open_tables(engine: Engine) -> None:
    """Create the API's tables where missing, once, whoever else starts at the same moment."""
    names = [table.name for table in metadata.sorted_tables]
    if all(inspect(engine).has_table(name) for name in names):
        return
    with engine.begin() as db:
        if db.dialect.name == "postgresql":
            db.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
        metadata.create_all(db, checkfirst=True)
