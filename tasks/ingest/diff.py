"""What a new release changes against what is served: the incremental part of a build."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from docsrag.tasks.ingest.chunking import Chunk


@dataclass(frozen=True)
class ReleaseDiff:
    chunks: list[Chunk]
    served_ids: dict[str, str]  # id -> doc path, as served before this build
    already_built: frozenset[str]  # ids already in a resumed staging collection

    @property
    def new_ids(self) -> set[str]:
        return {c.id for c in self.chunks}

    def reusable(self) -> list[Chunk]:
        """Served chunks with the same id: their vectors are copied, not re-embedded."""
        return [c for c in self.chunks if c.id in self.served_ids and c.id not in self.already_built]

    def to_embed(self) -> list[Chunk]:
        return [c for c in self.chunks if c.id not in self.served_ids and c.id not in self.already_built]

    @property
    def deleted(self) -> int:
        return len(set(self.served_ids) - self.new_ids)

    def documents(self) -> dict[str, str]:
        """Doc path -> added | changed | unchanged | removed, by comparing chunk id sets."""
        old, new = defaultdict(set), defaultdict(set)
        for chunk_id, path in self.served_ids.items():
            old[path].add(chunk_id)
        for chunk in self.chunks:
            new[chunk.doc_path].add(chunk.id)
        status = {path: "removed" for path in old.keys() - new.keys()}
        for path, ids in new.items():
            status[path] = "added" if path not in old else ("unchanged" if old[path] == ids else "changed")
        return dict(sorted(status.items()))

    def document_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(("added", "changed", "removed", "unchanged"), 0)
        for status in self.documents().values():
            counts[status] += 1
        return counts

    def kept_documents(self) -> tuple[int, int]:
        """(served documents still present, served documents)."""
        old_docs = set(self.served_ids.values())
        return len(old_docs & {c.doc_path for c in self.chunks}), len(old_docs)
