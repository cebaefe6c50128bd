"""Readers' feedback on answers: helpful or not, with an optional comment, kept beside the queue."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sqlalchemy import func, insert, select
from sqlalchemy.engine import Engine

from docsrag.tasks.core.records import clean
from docsrag.tasks.queue.api_tables import feedback

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

    def add(self, question_id: int, helpful: bool, comment: str | None = None) -> None:
        comment = clean(comment, MAX_COMMENT_CHARS).strip() or None if comment else None
        with self.engine.begin() as db:
            db.execute(insert(feedback).values(question_id=question_id, helpful=helpful, comment=comment))

    def totals(self) -> FeedbackTotals:
        with self.engine.begin() as db:
            found = dict(db.execute(select(feedback.c.helpful, func.count()).group_by(feedback.c.helpful)).all())
        return FeedbackTotals(int(found.get(True, 0)), int(found.get(False, 0)))

    def not_helpful(self, limit: int) -> list[int]:
        """Questions a reader marked not helpful, newest first."""
        with self.engine.begin() as db:
            return list(db.scalars(select(feedback.c.question_id).where(feedback.c.helpful.is_(False))
                                   .group_by(feedback.c.question_id)
                                   .order_by(func.max(feedback.c.id).desc()).limit(limit)))
