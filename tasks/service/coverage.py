"""Coverage gaps: what the docs team reads to know what is missing.

The questions answered "not covered" and those a reader marked not helpful, grouped by the
document their search came closest to. A not-helpful answer cites its sources (the first is the
closest); a "not covered" answer stores none, so its question is searched once, here, and the
closest document kept (``docsrag_nearest``), so the stats never search the same question twice.

A "not covered" answer whose search went as asked, without the translation it wanted (the LLM
down, busy or absent; translation off), says nothing about the docs: its English may well be
covered. Those are no docs gap; they are counted apart, as the translation's (``TranslationGaps``).
A language searched as asked by design (DOCSRAG_SEARCH_AS_ASKED) wants no translation: its
"not covered" answers are docs gaps like any other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from sqlalchemy import func, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from docsrag.tasks.answer.generate import NOT_COVERED_IN
from docsrag.tasks.queue.api_tables import nearest
from docsrag.tasks.queue.schema import questions

MAX_EXAMPLES = 3
UNKNOWN = "(nothing close)"


@dataclass(frozen=True)
class Closest:
    doc_path: str
    heading: str
    score: float | None = None


@dataclass
class CoverageGap:
    """One document and the questions it came closest to without answering them."""

    doc_path: str
    heading: str
    not_covered: int = 0
    not_helpful: int = 0
    examples: list[str] = field(default_factory=list)

    # What the CLI and the API show, in this order (the API's schema is built from SHOWN).
    SHOWN = ("doc_path", "heading", "questions", "not_covered", "not_helpful", "examples")

    @property
    def questions(self) -> int:
        return self.not_covered + self.not_helpful

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.SHOWN}


@dataclass
class TranslationGaps:
    """The questions answered "not covered" after a search as asked that wanted a translation: a gap
    in translation, not in the docs (``examples``: the newest)."""

    not_covered: int = 0
    examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# questions -> each one's closest document in the served index (None: nothing found); the whole
# answer None when no search could be made (nothing is kept then: the next call tries again)
Searcher = Callable[[list[str]], "list[Closest | None] | None"]


def gaps(engine: Engine, not_helpful_ids: list[int], search: Searcher | None, limit: int = 200,
         top: int = 20) -> list[CoverageGap]:
    """The ``top`` documents with the most unanswered questions among the ``limit`` newest of each kind."""
    uncovered = _not_covered(engine, limit)
    closest = _closest(engine, uncovered, search)
    groups: dict[tuple[str, str], CoverageGap] = {}

    def count(place: Closest | None, question: str, kind: str) -> None:
        place = place or Closest(UNKNOWN, "")
        gap = groups.setdefault((place.doc_path, place.heading), CoverageGap(place.doc_path, place.heading))
        setattr(gap, kind, getattr(gap, kind) + 1)
        if len(gap.examples) < MAX_EXAMPLES:
            gap.examples.append(question)

    for question_id, question in uncovered:
        count(closest.get(question_id), question, "not_covered")
    for question_id, question, sources in _with_sources(engine, not_helpful_ids):
        first = (sources or [None])[0]
        count(Closest(first["doc_path"], first["heading"], first.get("score")) if first else None,
              question, "not_helpful")
    return sorted(groups.values(), key=lambda g: (-g.questions, g.doc_path))[:top]


def _answered_not_covered():
    return (questions.c.status == "answered") & questions.c.answer.in_(set(NOT_COVERED_IN.values()))


def translation_gaps(engine: Engine) -> TranslationGaps:
    """The "not covered" answers whose search lacked the translation it wanted."""
    untranslated = _answered_not_covered() & questions.c.untranslated.is_not(None)
    with engine.begin() as db:
        count = db.scalar(select(func.count()).where(untranslated))
        examples = db.scalars(select(questions.c.question).where(untranslated)
                              .order_by(questions.c.id.desc()).limit(MAX_EXAMPLES))
        return TranslationGaps(int(count), list(examples))


def _not_covered(engine: Engine, limit: int) -> list[tuple[int, str]]:
    """The docs' own "not covered" answers: searched translated, in English, or as asked by design."""
    query = (select(questions.c.id, questions.c.question)
             .where(_answered_not_covered() & questions.c.untranslated.is_(None))
             .order_by(questions.c.id.desc()).limit(limit))
    with engine.begin() as db:
        return [(row.id, row.question) for row in db.execute(query)]


def _with_sources(engine: Engine, ids: list[int]) -> list[tuple[int, str, list | None]]:
    if not ids:
        return []
    with engine.begin() as db:
        rows = db.execute(select(questions.c.id, questions.c.question, questions.c.sources)
                          .where(questions.c.id.in_(ids))).all()
    return [(row.id, row.question, row.sources) for row in rows]


def _closest(engine: Engine, uncovered: list[tuple[int, str]], search: Searcher | None) -> dict[int, Closest | None]:
    """Each question's closest document: kept from an earlier call, or searched now and kept."""
    ids = [question_id for question_id, _ in uncovered]
    with engine.begin() as db:
        known = {row.question_id: Closest(row.doc_path, row.heading, row.score) if row.doc_path else None
                 for row in db.execute(select(nearest).where(nearest.c.question_id.in_(ids)))}
    missing = [(question_id, question) for question_id, question in uncovered if question_id not in known]
    if missing and search is not None:
        found = search([question for _, question in missing])
        if found is None:
            return known
        for (question_id, _), place in zip(missing, found):
            known[question_id] = place
            _keep(engine, question_id, place)
    return known


def _keep(engine: Engine, question_id: int, place: Closest | None) -> None:
    try:
        with engine.begin() as db:
            db.execute(insert(nearest).values(question_id=question_id, doc_path=place and place.doc_path,
                                              heading=place and place.heading, score=place and place.score))
    except IntegrityError:  # another API process kept it first: the same search, the same document
        pass
