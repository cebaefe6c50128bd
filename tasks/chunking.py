"""Documents -> chunks with stable ids, via unstructured's ``chunk_by_title``."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass

from unstructured.chunking.title import chunk_by_title

from tasks.markdown import Document


@dataclass(frozen=True)
class Chunk:
    id: str
    doc_path: str
    title: str
    heading: str  # heading path, e.g. "Product FAQ > Where does Milvus store data?"
    text: str

    @property
    def embed_text(self) -> str:
        """What is embedded: the chunk under its title and headings, so a section
        about "limits" still knows it is about collections."""
        context = self.heading if self.heading.startswith(self.title) else f"{self.title} > {self.heading}"
        return f"{context.strip(' >')}\n\n{self.text}"

    @property
    def search_text(self) -> str:
        """What BM25 indexes: the embedded text plus the words of the doc path, so "install
        offline helm" finds getstarted/offline/install_offline-helm.md."""
        words = re.sub(r"[/_\-.]+", " ", self.doc_path.removesuffix(".md"))
        return f"{words}\n{self.embed_text}"


def chunk_documents(documents: list[Document], chunking: dict, embedder_id: str) -> list[Chunk]:
    return [chunk for doc in documents for chunk in chunk_document(doc, chunking, embedder_id)]


def chunk_document(doc: Document, chunking: dict, embedder_id: str) -> list[Chunk]:
    pieces = chunk_by_title(doc.elements, include_orig_elements=True, multipage_sections=True, **chunking)
    chunks, seen = [], Counter()
    for piece in pieces:
        first = piece.metadata.orig_elements[0] if piece.metadata.orig_elements else piece
        heading = getattr(first.metadata, "heading_path", None) or doc.title
        draft = Chunk("", doc.path, doc.title, heading, piece.text)
        # Identical chunks inside one document are told apart by their order of appearance.
        seen[draft.embed_text] += 1
        chunk_id = chunk_id_for(doc.path, draft.embed_text, chunking, embedder_id, seen[draft.embed_text])
        chunks.append(Chunk(chunk_id, doc.path, doc.title, heading, piece.text))
    return chunks


def chunk_id_for(doc_path: str, embed_text: str, chunking: dict, embedder_id: str, occurrence: int = 1) -> str:
    """Stable across runs and releases: what the chunk is and how it was made, never the version."""
    key = json.dumps([doc_path, embed_text, sorted(chunking.items()), embedder_id, occurrence])
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]
