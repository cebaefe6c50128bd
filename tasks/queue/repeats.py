"""Repeated questions are answered once: the same question (normalized), in the same language,
for the same docs version and language, asked while the same collection is served, gets the
answer already stored, at submit, as a question of its own (``repeat_of`` names the original).

The key holds everything the answer depends on but the index; the index is the collection the
alias served when the original was submitted, so a new collection served (a re-index, a
rollback) makes every earlier answer stale: the next asker's question is queued and answered
anew, and becomes the original for the ones after it.

An answer whose search went without the translation it wanted (the LLM down or busy) is no
original: the next asker's question is searched anew, translated once the LLM is back.

A repeat is found only among the same owner's questions (an API token's hash; "" the machine's
own): another token's answer would tell the asker that someone else asked it, and that question's id.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Engine

from docsrag.tasks.queue.api_tables import repeats
from docsrag.tasks.queue.questions import now
from docsrag.tasks.queue.schema import questions

_SPACES = re.compile(r"\s+")
_TRAILING = re.compile(r"[\s?!.。？！،؟]+$")  # "Where is data stored?" == "where is data stored"


@dataclass(frozen=True)
class RepeatKey:
    """What an answer depends on, besides the index: hashed, so the column has one size."""

    digest: str

    @classmethod
    def of(cls, question: str, lang: str, version: str | None, docs_lang: str | None) -> RepeatKey:
        parts = [normalized(question), lang, version or "", docs_lang or ""]
        return cls(hashlib.sha256("\x1f".join(parts).encode()).hexdigest())


@dataclass(frozen=True)
class Asked:
    """A question's submit record: the answer it was given at submit, the collection served then."""

    repeat_of: int | None = None
    collection: str | None = None


def normalized(question: str) -> str:
    """Case, width (NFKC: full-width letters), spacing and the closing punctuation do not matter."""
    text = unicodedata.normalize("NFKC", question).casefold()
    return _TRAILING.sub("", _SPACES.sub(" ", text).strip())


# The columns of an answer a repeat is given; usage and latency stay empty: no tokens were spent.
_ANSWER_COLUMNS = ("answer", "sources", "model", "reasoning_effort", "reasoning", "lang")


class Repeats:
    def __init__(self, engine: Engine):
        self.engine = engine

    def original(self, key: RepeatKey, collection: str, owner: str) -> int | None:
        """The newest answered question ``owner`` asked with this key while ``collection`` was served."""
        query = (select(repeats.c.question_id)
                 .join(questions, questions.c.id == repeats.c.question_id)
                 .where((repeats.c.repeat_key == key.digest) & (repeats.c.collection == collection)
                        & repeats.c.repeat_of.is_(None) & (questions.c.status == "answered")
                        & (questions.c.owner == owner) & questions.c.untranslated.is_(None))
                 .order_by(repeats.c.question_id.desc()).limit(1))
        with self.engine.begin() as db:
            return db.scalar(query)

    def remember(self, question_id: int, key: RepeatKey, collection: str, repeat_of: int | None = None) -> None:
        with self.engine.begin() as db:
            db.execute(insert(repeats).values(question_id=question_id, repeat_key=key.digest,
                                              collection=collection, repeat_of=repeat_of))

    def answer_pending(self, question_id: int, original: int, key: RepeatKey, collection: str) -> bool:
        """Give the just-queued ``question_id`` the answer of ``original``, unless a worker has
        claimed it already (then it is answered like any other). -> answered here?"""
        stamp = now()
        with self.engine.begin() as db:
            source = db.execute(select(*(questions.c[c] for c in _ANSWER_COLUMNS))
                                .where(questions.c.id == original)).mappings().one()
            done = db.execute(update(questions).where(
                (questions.c.id == question_id) & (questions.c.status == "pending")).values(
                status="answered", answered_at=stamp, updated_at=stamp, latency_ms=0, **dict(source)))
            answered = done.rowcount == 1
            db.execute(insert(repeats).values(question_id=question_id, repeat_key=key.digest, collection=collection,
                                              repeat_of=original if answered else None))
        return answered

    def about(self, question_id: int) -> Asked:
        """What was recorded when the question was submitted (nothing: submitted another way)."""
        with self.engine.begin() as db:
            row = db.execute(select(repeats.c.repeat_of, repeats.c.collection)
                             .where(repeats.c.question_id == question_id)).first()
        return Asked(row.repeat_of, row.collection) if row else Asked()

    def answered_from_repeats(self) -> int:
        with self.engine.begin() as db:
            return int(db.scalar(select(func.count()).where(repeats.c.repeat_of.is_not(None))))
