"""What the watch and evaluate flows return (the answer flow returns the drain's DrainSummary):
one contract for the flow's return value, the CLI's ``--json`` and the benchmarks, as
``IngestSummary`` is for the ingest."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class RefusedAsset:
    asset: str
    tag: str
    reason: str


@dataclass
class WatchSummary:
    new: list[str] = field(default_factory=list)  # versions found new, oldest first
    seen: int = 0  # assets recorded as handled
    events: int = 0  # docsrag.release.published events emitted
    refused: list[RefusedAsset] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvaluationSummary:
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
