"""Search the served index: dense + BM25 (RRF) where the collection has BM25, dense otherwise."""

from __future__ import annotations

from dataclasses import dataclass

from tasks import embedding, store
from tasks.settings import Settings


@dataclass
class Retriever:
    """Holds the Milvus client and the embedder, so a batch of questions loads the model once."""

    settings: Settings

    def __post_init__(self):
        self.client = store.connect(self.settings)
        self.embedder = embedding.embedder_for(self.settings)
        self._hybrid: dict[str, bool] = {}

    def collection(self, version: str | None = None) -> str:
        """The alias to search, checked and loaded once (searches follow the alias when it moves)."""
        alias = self.settings.collection
        name = store.version_alias(alias, version) if version else alias
        if name not in self._hybrid:
            if store.served_collection(self.client, name) is None:
                hint = f"ingest docs {version} first" if version else "run `docsrag ingest` first"
                raise store.StoreError(f"nothing is served as {name!r}: {hint}")
            self._hybrid[name] = store.has_bm25(self.client, store.loaded(self.client, name))
        return name

    def search(self, queries: list[str], k: int = 5, version: str | None = None) -> list[list[dict]]:
        return self.search_vectors(queries, self.embedder.embed(queries), k, version)

    def search_vectors(self, queries: list[str], vectors: list[list[float]], k: int = 5,
                       version: str | None = None) -> list[list[dict]]:
        name = self.collection(version)
        return store.search(self.client, name, vectors, queries, k, hybrid=self._hybrid[name],
                            rrf_k=self.settings.rrf_k)


def covered(hits: list[dict], min_relevance: float, weak_relevance: float) -> bool:
    """Whether the docs cover a question, from its hits: the best cosine reaches
    ``min_relevance``, and where it stays under ``weak_relevance`` the dense and BM25 searches
    agree on a document. Questions about another product (MongoDB's $lookup, Weaviate modules)
    land near Milvus pages by meaning, but the words lead elsewhere."""
    if not hits:
        return False
    best = max(h["relevance"] for h in hits)
    return best >= min_relevance and (best >= weak_relevance or hits[0].get("agreement") is not False)
