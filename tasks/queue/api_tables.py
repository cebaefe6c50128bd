"""The tables the questions API keeps beside the queue's own (``docsrag.tasks.queue.schema``): repeated
questions, feedback, and the documents a "not covered" question came closest to.

They live in the queue's database, so a product's stats and the queue agree, and are created
once under a lock (PostgreSQL: a transaction-level advisory lock of their own; SQLite: the
``BEGIN IMMEDIATE`` the queue's engine takes), so two API processes starting together on a
fresh database do not both create them.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine

from docsrag.tasks.core.records import MAX_OWNER_CHARS
from docsrag.tasks.queue.schema import questions, utc_now

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

# One vote per question and owner (who voted: an API token's hash, "" the machine's own): a later
# vote replaces the earlier one, so voting again cannot inflate the totals. ``created_at``: when
# the vote now counted was given.
feedback = Table(
    "docsrag_feedback", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("question_id", Integer, nullable=False, index=True),
    Column("owner", String(MAX_OWNER_CHARS), nullable=False, server_default=text("''")),
    Column("helpful", Boolean, nullable=False),
    Column("comment", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=utc_now()),
    Index("docsrag_feedback_vote", "question_id", "owner", unique=True),
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


def one_vote_per_owner(db: Connection) -> None:
    """Schema 4, run by the queue's migration under its lock: feedback kept before it has no owner
    and a row per vote. Each vote is given its question's owner (the asker: before owners, only the
    asker or an operator could rate, and the asker is the likely one), each question keeps its
    latest vote, and a unique index makes it one vote per owner from now on."""
    if not inspect(db).has_table(feedback.name):
        return  # no API ran on this database yet: open_tables creates the table as it is now
    if "owner" not in {c["name"] for c in inspect(db).get_columns(feedback.name)}:
        ddl = db.dialect.ddl_compiler(db.dialect, None)
        db.execute(text(f"ALTER TABLE {feedback.name} ADD COLUMN {ddl.get_column_specification(feedback.c.owner)}"))
        asker = select(questions.c.owner).where(questions.c.id == feedback.c.question_id).scalar_subquery()
        db.execute(update(feedback).values(owner=func.coalesce(asker, "")))
    latest = select(func.max(feedback.c.id)).group_by(feedback.c.question_id, feedback.c.owner)
    db.execute(delete(feedback).where(feedback.c.id.not_in(latest)))
    vote = next(index for index in feedback.indexes if index.name == "docsrag_feedback_vote")
    vote.create(db, checkfirst=True)
