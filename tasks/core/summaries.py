"""What each flow returns: one record per flow (ingest, answer, watch, evaluate), one contract for
the flow's return value, the run's artifacts, the CLI's ``--json`` and the benchmarks, serialised
one way (``Summary.to_dict``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar


class Summary:
    """A flow's summary (a dataclass): ``to_dict`` is what ``--json`` prints and the report archives,
    its fields less ``HIDDEN``, plus what ``derived`` computes from them."""

    HIDDEN: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.HIDDEN} | self.derived()

    def derived(self) -> dict:
        return {}


@dataclass
class IngestSummary(Summary):
    """What an ingest did: the one contract of the flow's return value, the run's artifacts, the
    report archived in the object store, ``docsrag ingest --json`` and the benchmarks."""

    release: str  # the URL, credentials redacted
    version: str
    sha256: str
    size: int
    archived: str  # object-store key of the raw zip
    alias: str  # the main alias of the docs' language
    version_alias: str
    lang: str  # the docs' language: the release tree's top folder (en/, ko/...)
    named_version: bool  # False: served on its own alias only, unless --publish-main
    documents: int
    chunks: int
    document_changes: dict[str, int]  # added, changed, removed, unchanged
    deleted: int
    collection: str | None = None  # the collection served now
    previous_collection: str | None = None
    set_aside: list[dict] = field(default_factory=list)  # damaged collections --force moved out (quarantine.py)
    unchanged: bool = False
    embedded: int = 0
    reused: int = 0
    resumed: int = 0  # rows an interrupted run of this build left, carried over (neither embedded nor reused)
    search: str | None = None
    seconds_saved: float = 0.0
    skipped: list[dict] = field(default_factory=list)  # [{path, reason}]
    warnings: list[dict] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)  # stage -> seconds, in the order they ran
    seconds: float = 0.0


@dataclass
class DrainSummary(Summary):
    claimed: int = 0
    answered: int = 0
    not_covered: int = 0
    failed: int = 0  # the question's fault, back after a backoff
    dead: int = 0
    released: int = 0  # put back without spending an attempt
    lost: int = 0  # its lease went to another worker, which answers it
    prompt_tokens: int = 0
    output_tokens: int = 0
    languages: dict[str, int] = field(default_factory=dict)  # answered, by the language answered in
    seconds: float = 0.0
    stopped: str = ""
    outage: str | None = None
    problems: list[dict] = field(default_factory=list)  # {id, question, status, reason} of what was not answered

    @property
    def answers_per_s(self) -> float:
        return round(self.answered / self.seconds, 2) if self.seconds else 0.0

    HIDDEN: ClassVar[tuple[str, ...]] = ("problems",)  # per question: in the run's artifacts, not in `docsrag answer --json`

    def derived(self) -> dict:
        return {"answers_per_s": self.answers_per_s}


@dataclass(frozen=True)
class RefusedAsset:
    asset: str
    tag: str
    reason: str


@dataclass
class WatchSummary(Summary):
    new: list[str] = field(default_factory=list)  # versions found new, oldest first
    seen: int = 0  # assets recorded as handled
    events: int = 0  # docsrag.release.published events emitted
    refused: list[RefusedAsset] = field(default_factory=list)


@dataclass
class EvaluationSummary(Summary):
    """Retrieval figures on a gold set (recall@k, mrr@10, ...), all questions and per language;
    ``skipped`` says why nothing was measured (no gold set)."""

    gold: str = ""
    figures: dict[str, float | int | str] = field(default_factory=dict)
    by_language: dict[str, dict] = field(default_factory=dict)
    skipped: str | None = None

    def to_dict(self) -> dict:
        """The figures flat, ``by_language`` beside them (``docsrag eval --json``)."""
        if self.skipped:
            return {"skipped": self.skipped}
        return {**self.figures, "by_language": self.by_language}
