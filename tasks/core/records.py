"""The answering side's records: what crosses between generation, the drain and the queue.

Everything the model server sends is untrusted: it reaches the database only through these
types, which coerce it (usage counts to ints), clean it (no NUL or other control characters,
which PostgreSQL refuses in text and a terminal would obey) and bound it (answer, reasoning,
errors), so a stored row cannot fail for what the server said.

A person's question is theirs: ``stored_question`` keeps it as asked and drops only what the
database cannot store (NUL; a lone surrogate becomes U+FFFD). Its control characters are shown
escaped wherever it is printed (``docsrag.tasks.core.escaping``), never removed from the record.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

STATUSES = ("pending", "claimed", "answered", "failed", "dead")  # a question's states in the queue
MAX_PRIORITY = 10

MAX_ANSWER_CHARS = 32_000  # gpt-oss at 2,048 tokens writes ~8,000 characters
MAX_REASONING_CHARS = 64_000
MAX_ERROR_CHARS = 2_000  # last_error: the reason, not the server's whole error page
MAX_NAME_CHARS = 200  # model names, doc paths in sources
MAX_CLIENT_KEY_CHARS = 200  # a client's idempotency key (the column's width on PostgreSQL)
MAX_OWNER_CHARS = 64  # who asked: a hash of an API token
MAX_TOKENS = 10**9  # a usage count beyond this is not a count
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # keeps \t \n \r
_SURROGATE = re.compile("[\ud800-\udfff]")  # only lone ones exist in a str: UTF-8 cannot encode them


def clean(text: object, limit: int) -> str:
    """Text as stored: control characters removed, at most ``limit`` characters (cut marked)."""
    text = _CONTROL.sub("", str(text))
    return text if len(text) <= limit else text[:limit - 1] + "…"


def stored_question(text: str) -> str:
    """A question as stored: the person's text, less what PostgreSQL cannot store in text: NUL
    removed, a lone surrogate (not encodable as UTF-8) replaced by U+FFFD. Nothing else changes."""
    text = str(text).replace("\x00", "")
    return _SURROGATE.sub("\ufffd", text)


def _count(value: object) -> int | None:
    """A token count from whatever the server sent: ints and digit strings; anything else dropped."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= MAX_TOKENS else None
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 10:
        return _count(int(value.strip()))
    return None


@dataclass(frozen=True)
class Usage:
    """Token counts of one answer; a field the server sent malformed is 0."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    reasoning_tokens: int = 0

    @classmethod
    def coerced(cls, raw: object) -> Usage:
        if not isinstance(raw, dict):
            return cls()
        details = raw.get("completion_tokens_details")
        reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
        return cls(*(_count(raw.get(name)) or 0 for name in ("prompt_tokens", "completion_tokens", "total_tokens")),
                   _count(reasoning) or 0)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Hit:
    """One search result: a chunk of a served document. ``score`` ranks the list (RRF where rankings
    were fused, else the cosine); ``relevance`` is the cosine to the query in the English model's
    space, comparable across queries; ``agreement``: whether the dense and BM25 rankings share a
    document in their top 5 (None where there was one ranking)."""

    id: str
    doc_path: str
    title: str
    heading: str
    version: str
    text: str
    score: float
    relevance: float
    agreement: bool | None = None
    url: str = ""  # its page on the published docs site, at the heading (tasks/core/links.py); "": none configured

    SHOWN = ("doc_path", "heading", "score", "relevance", "text", "version", "url")

    def shown(self) -> dict:
        """What a reader is shown of it (the CLI's and the API's results: the API's schema is built from SHOWN)."""
        return {name: getattr(self, name) for name in self.SHOWN}


@dataclass(frozen=True)
class Source:
    """A search hit as numbered in the prompt; ``cited`` is what an answer stores of it (no text),
    and what a stored answer's sources come back as (``stored``)."""

    n: int
    doc_path: str
    heading: str
    score: float
    text: str = ""
    relevance: float | None = None
    version: str = ""  # the docs version it was found in (2.4.x); "" in answers stored before it was kept
    url: str = ""  # its published page at the heading (Hit.url)

    @classmethod
    def of(cls, hit: Hit, n: int, text: str | None = None) -> Source:
        """``text``: the passage given to the model, where it merges several chunks of one heading."""
        return cls(n, hit.doc_path, hit.heading, round(float(hit.score), 4), hit.text if text is None else text,
                   hit.relevance, hit.version, hit.url)

    @classmethod
    def stored(cls, cited: dict) -> Source:
        """A citation as the queue keeps it (``cited``), back as a record."""
        return cls(int(cited["n"]), str(cited["doc_path"]), str(cited["heading"]), float(cited.get("score") or 0.0),
                   version=str(cited.get("version") or ""), url=str(cited.get("url") or ""))

    # What an answer stores; the API's schema is built from it.
    CITED = ("n", "doc_path", "heading", "score", "version", "url")

    @property
    def cited(self) -> dict:
        score = self.score if self.score == self.score else 0.0  # NaN is not JSON PostgreSQL accepts
        return {"n": self.n, "doc_path": clean(self.doc_path, MAX_NAME_CHARS * 5),
                "heading": clean(self.heading, MAX_NAME_CHARS * 5), "score": score,
                "version": clean(self.version, MAX_NAME_CHARS), "url": clean(self.url, MAX_NAME_CHARS * 10)}


@dataclass(frozen=True)
class StoredAnswer:
    """An answer as the queue stores it (``row``: the columns, cleaned and bounded)."""

    answer: str
    lang: str
    sources: list[Source] = field(default_factory=list)
    model: str | None = None
    reasoning_effort: str | None = None
    reasoning: str | None = None
    usage: Usage = field(default_factory=Usage)
    latency_ms: int = 0
    # Why the question was searched as asked though it wanted a translation (None: translated, in
    # English, or searched as asked by design): said with the answer, and a "not covered" answer
    # then counts as a gap in translation, not in the docs.
    untranslated: str | None = None

    def row(self) -> dict:
        return {"answer": clean(self.answer, MAX_ANSWER_CHARS), "lang": self.lang,
                "reasoning": None if self.reasoning is None else clean(self.reasoning, MAX_REASONING_CHARS),
                "sources": [s.cited for s in self.sources],
                "model": None if self.model is None else clean(self.model, MAX_NAME_CHARS),
                "reasoning_effort": self.reasoning_effort, "usage": self.usage.to_dict(),
                "latency_ms": max(0, min(int(self.latency_ms), 2**31 - 1)),
                "untranslated": None if self.untranslated is None else clean(self.untranslated, MAX_NAME_CHARS)}


@dataclass(frozen=True)
class QueueStats:
    """What an operator asks first: how much waits, for how long, how fast answers come."""

    counts: dict[str, int]
    oldest_waiting_s: float | None
    answers_per_s: float
    window_s: float

    def to_dict(self) -> dict:
        return asdict(self)
