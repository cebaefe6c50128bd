"""Documents -> chunks with stable ids, via unstructured's ``chunk_by_title``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass

from unstructured.chunking.title import chunk_by_title

from docsrag.tasks.core.errors import DocsragError
from docsrag.tasks.ingest.markdown import Document, ParsedRelease

# Bounds of the row fields (UTF-8 bytes); the store's schema is declared with them, and a chunk is
# cut to fit here, before embedding, rather than refused by Milvus after it.
FIELD_MAX = {"doc_path": 1024, "title": 1024, "heading": 4096}


class ReleaseTooLarge(DocsragError, ValueError):
    """The release has more chunks than DOCSRAG_MAX_RELEASE_CHUNKS allows: nothing is embedded."""


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


def chunk_release(parsed: ParsedRelease, chunking: dict, embedder_id: str, *, max_document_chunks: int,
                  max_release_chunks: int) -> list[Chunk]:
    """Chunk every document; one that fails or runs over its budget moves to ``parsed.skipped`` with
    the reason, fields too long for the index are cut (a warning says so). A release over its
    budget fails here, before anything is embedded."""
    chunks: list[Chunk] = []
    for doc in list(parsed.documents):
        try:
            found = chunk_document(doc, chunking, embedder_id)
        except Exception as exc:  # noqa: BLE001 - whatever breaks on one document stays with it
            found, reason = [], f"could not be chunked: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        else:
            reason = (f"over budget: {len(found)} chunks, over the limit of {max_document_chunks} "
                      "(DOCSRAG_MAX_DOCUMENT_CHUNKS)") if len(found) > max_document_chunks else None
        if reason:
            parsed.documents.remove(doc)
            parsed.skipped.append({"path": doc.path, "reason": reason})
            continue
        chunks += [_fitted(chunk, parsed.warnings) for chunk in found]
    if len(chunks) > max_release_chunks:
        raise ReleaseTooLarge(f"the release has {len(chunks)} chunks, over the limit of {max_release_chunks} "
                              "(DOCSRAG_MAX_RELEASE_CHUNKS); nothing was embedded and the served index is "
                              "unchanged")
    return chunks


def _fitted(chunk: Chunk, warnings: list[dict]) -> Chunk:
    cut = {name: _cut(getattr(chunk, name), limit) for name, limit in FIELD_MAX.items()
           if len(getattr(chunk, name).encode("utf-8")) > limit}
    for name in cut:
        warnings.append({"path": _cut(chunk.doc_path, FIELD_MAX["doc_path"]),
                         "reason": f"{name} longer than {FIELD_MAX[name]} bytes, cut to fit the index"})
    return dataclasses.replace(chunk, **cut) if cut else chunk


def _cut(text: str, limit: int) -> str:
    """At most ``limit`` bytes of UTF-8 (Milvus bounds VARCHAR in bytes), never half a character."""
    return text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")


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
