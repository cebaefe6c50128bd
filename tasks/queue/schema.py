"""The question queue's table, and its creation and migration, safe when workers start together.

A product may write questions straight into the table: every column but ``question`` has a
default in the database itself (status, attempts, times, and ``claim_rank`` = now as epoch
seconds), so the documented ``INSERT INTO docsrag_questions (question) VALUES (...)`` queues a
question on SQLite and PostgreSQL alike.

Creation and upgrades run under one lock (PostgreSQL: a transaction-level advisory lock; SQLite:
``BEGIN IMMEDIATE``) and are recorded in ``docsrag_schema``: two workers starting on a fresh or an
old database do not both create or alter, and a worker on an up-to-date one reads one row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement

from docsrag.tasks.core.records import MAX_CLIENT_KEY_CHARS, MAX_NAME_CHARS, MAX_OWNER_CHARS

# 1: the table as first released (columns added on open); 2: database-side defaults;
# 3: ``owner`` (the API token that asked), ``client_key`` unique per owner instead of globally;
# 4: the API's feedback is one vote per question and owner (docsrag.tasks.queue.api_tables.one_vote_per_owner);
# 5: ``untranslated`` (why an answer's search went without the translation it wanted)
SCHEMA_VERSION = 5
_LOCK_KEY = 0x646F63737261  # "docsra": the advisory lock every docsrag queue migration takes


class epoch_now(FunctionElement):
    """The database's clock as epoch seconds (float), for ``claim_rank``'s default."""

    type = Float()
    inherit_cache = True


@compiles(epoch_now, "postgresql")
def _epoch_pg(element, compiler, **kw):
    return "extract(epoch from now())"


@compiles(epoch_now, "sqlite")
def _epoch_sqlite(element, compiler, **kw):
    return "((julianday('now') - 2440587.5) * 86400.0)"


class utc_now(FunctionElement):
    """The database's clock for timestamp defaults (SQLite: the text SQLAlchemy itself stores)."""

    type = DateTime(timezone=True)
    inherit_cache = True


@compiles(utc_now, "postgresql")
def _now_pg(element, compiler, **kw):
    return "now()"


@compiles(utc_now, "sqlite")
def _now_sqlite(element, compiler, **kw):
    return "strftime('%Y-%m-%d %H:%M:%f', 'now')"


OWNER_KEY = "docsrag_questions_owner_key"
metadata = MetaData()
questions = Table(
    "docsrag_questions", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    # Who asked: a hash of the API token (docsrag.tasks.service.guard.owner_of), never the token; "" for the
    # machine's own questions (the CLI, the API without tokens, a product writing rows itself).
    Column("owner", String(MAX_OWNER_CHARS), nullable=False, server_default=text("''")),
    Column("client_key", String(MAX_CLIENT_KEY_CHARS)),  # unique per owner: one token cannot name another's
    Column("question", Text, nullable=False),
    Column("version", String(64)),
    Column("lang", String(8)),  # ISO 639-1, detected at submit (or when claimed, for rows written by others)
    Column("docs_lang", String(8)),  # answer from the localized docs in this language (None: English)
    Column("priority", Integer, nullable=False, server_default=text("0")),
    # submit time minus the priority's head start; the database's now by default
    Column("claim_rank", Float, nullable=False, server_default=epoch_now()),
    Column("status", String(16), nullable=False, index=True, server_default=text("'pending'")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("put_backs", Integer, nullable=False, server_default=text("0")),  # busy put-backs, bounded
    Column("last_error", Text),
    Column("lease_owner", String(64)),
    Column("lease_expires_at", DateTime(timezone=True)),
    Column("available_at", DateTime(timezone=True), nullable=False, server_default=utc_now()),
    Column("answer", Text),
    Column("reasoning", Text),  # kept apart from the answer, shown only on request
    Column("sources", JSON),
    Column("model", String(200)),
    Column("reasoning_effort", String(16)),
    Column("usage", JSON),
    Column("latency_ms", Integer),
    # Why the question was searched as asked though it wanted a translation (docsrag.tasks.answer.generate.
    # untranslated); None: translated, in English, or a language searched as asked by design.
    Column("untranslated", String(MAX_NAME_CHARS)),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=utc_now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=utc_now()),
    Column("answered_at", DateTime(timezone=True)),
    Index("docsrag_questions_due", "status", "claim_rank"),
    UniqueConstraint("owner", "client_key", name=OWNER_KEY),
)
schema = Table("docsrag_schema", metadata, Column("version", Integer, primary_key=True),
               Column("applied_at", DateTime(timezone=True), nullable=False, server_default=utc_now()))


def open_schema(engine: Engine, upgrades: Sequence[Callable[[Connection], None]] = ()) -> None:
    """Create or upgrade the queue's tables, once, whoever else starts at the same moment.
    ``upgrades``: of the tables kept beside the queue (the API's), run under the same lock."""
    if _current(engine) == SCHEMA_VERSION:
        return
    with engine.begin() as db:  # SQLite: BEGIN IMMEDIATE, the database's write lock
        if db.dialect.name == "postgresql":
            db.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
        if _recorded(db) == SCHEMA_VERSION:  # another worker did it while this one waited
            return
        if inspect(db).has_table(questions.name):
            _upgrade(db)
        else:
            questions.create(db)
        for upgrade in upgrades:
            upgrade(db)
        schema.create(db, checkfirst=True)
        db.execute(schema.insert().values(version=SCHEMA_VERSION))


def _current(engine: Engine) -> int | None:
    try:
        with engine.connect() as db:
            return db.scalar(select(func.max(schema.c.version)))
    except Exception:  # noqa: BLE001 - no schema table yet: the locked path below decides
        return None


def _recorded(db: Connection) -> int | None:
    return db.scalar(select(func.max(schema.c.version))) if inspect(db).has_table(schema.name) else None


def _upgrade(db: Connection) -> None:
    """A queue from an earlier release: the columns it lacks, and the database-side defaults."""
    if db.dialect.name == "sqlite":
        _rebuild_sqlite(db)  # SQLite cannot add a default to a column: copy into the new table
    else:
        _alter_postgresql(db)
    # Rows an earlier release (or a product) left at rank 0 would go before everything: rank them by age.
    db.execute(questions.update().where(questions.c.claim_rank <= 0).values(
        claim_rank=_epoch_of(db, questions.c.created_at) - questions.c.priority * 300.0))


def _epoch_of(db: Connection, column):
    if db.dialect.name == "postgresql":
        return func.extract("epoch", column)
    return (func.julianday(column) - 2440587.5) * 86400.0


def _alter_postgresql(db: Connection) -> None:
    present = {c["name"] for c in inspect(db).get_columns(questions.name)}
    ddl = db.dialect.ddl_compiler(db.dialect, None)
    for column in questions.columns:
        if column.name not in present:
            db.execute(text(f"ALTER TABLE {questions.name} ADD COLUMN {ddl.get_column_specification(column)}"))
        elif column.server_default is not None:
            default = ddl.get_column_default_string(column)
            db.execute(text(f"ALTER TABLE {questions.name} ALTER COLUMN {column.name} SET DEFAULT {default}"))
    _client_key_per_owner(db)


def _client_key_per_owner(db: Connection) -> None:
    """Schema 3: a client key is unique per owner. The global one (``UNIQUE (client_key)``, as
    versions 1-2 created it) would let one token's key return another token's question."""
    unique = inspect(db).get_unique_constraints(questions.name)
    for constraint in unique:
        if constraint["column_names"] == ["client_key"]:
            db.execute(text(f'ALTER TABLE {questions.name} DROP CONSTRAINT "{constraint["name"]}"'))
    if not any(c["name"] == OWNER_KEY for c in unique):
        db.execute(text(f"ALTER TABLE {questions.name} ADD CONSTRAINT {OWNER_KEY} UNIQUE (owner, client_key)"))


def _rebuild_sqlite(db: Connection) -> None:
    present = [c["name"] for c in inspect(db).get_columns(questions.name)]
    kept = ", ".join(name for name in present if name in questions.c)
    for index in inspect(db).get_indexes(questions.name):
        db.exec_driver_sql(f'DROP INDEX IF EXISTS "{index["name"]}"')
    db.exec_driver_sql(f"ALTER TABLE {questions.name} RENAME TO {questions.name}_old")
    questions.create(db)
    db.exec_driver_sql(f"INSERT INTO {questions.name} ({kept}) SELECT {kept} FROM {questions.name}_old")
    db.exec_driver_sql(f"DROP TABLE {questions.name}_old")
