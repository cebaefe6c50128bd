"""Readers' feedback on answers: helpful or not, with an optional comment, kept beside the queue.

One vote per question and owner (an API token's hash; "" the machine's own): voting again replaces
the earlier vote, so the totals and the coverage gaps count each caller's word once."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.sql.dml import Insert

from docsrag.tasks.core.records import clean
from docsrag.tasks.queue.api_tables import feedback
from docsrag.tasks.queue.questions import now

MAX_COMMENT_CHARS = 2000


@dataclass(frozen=True)
class FeedbackTotals:
    helpful: int
    not_helpful: int

    def to_dict(self) -> dict:
        return asdict(self)


class Feedback:
    def __init__(self, engine: Engine):
        self.engine = engine

    def add(self, question_id: int, helpful: bool, comment: str | None = None, owner: str = "") -> None:
        """``owner``'s vote on the question, in place of any earlier one (its comment too)."""
        comment = clean(comment, MAX_COMMENT_CHARS).strip() or None if comment else None
        with self.engine.begin() as db:
            db.execute(_vote(db.dialect.name, dict(question_id=question_id, owner=owner, helpful=helpful,
                                                   comment=comment, created_at=now())))

    def totals(self) -> FeedbackTotals:
        with self.engine.begin() as db:
            found = dict(db.execute(select(feedback.c.helpful, func.count()).group_by(feedback.c.helpful)).all())
        return FeedbackTotals(int(found.get(True, 0)), int(found.get(False, 0)))

    def not_helpful(self, limit: int) -> list[int]:
        """Questions a reader marked not helpful, the newest vote first."""
        with self.engine.begin() as db:
            return list(db.scalars(select(feedback.c.question_id).where(feedback.c.helpful.is_(False))
                                   .group_by(feedback.c.question_id)
                                   .order_by(func.max(feedback.c.created_at).desc()).limit(limit)))


def _vote(dialect: str, values: dict) -> Insert:
    """An insert that replaces the owner's earlier vote, in one statement: two votes landing together
    end as one row (a read, then a write, would let both insert)."""
    statement = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(feedback).values(**values)
    return statement.on_conflict_do_update(
        index_elements=[feedback.c.question_id, feedback.c.owner],
        set_={name: statement.excluded[name] for name in ("helpful", "comment", "created_at")})
