"""Search the served index: dense + BM25 (RRF) where the collection has BM25, dense otherwise."""

from __future__ import annotations

from dataclasses import dataclass, replace

from docsrag.tasks.core.language import DEFAULT as DEFAULT_LANGUAGE
from docsrag.tasks.core.links import page_url
from docsrag.tasks.core.records import Hit
from docsrag.tasks.core.settings import Settings
from docsrag.tasks.embed import embedding
from docsrag.tasks.index import served, store
from docsrag.tasks.index.schema import MULTILINGUAL, Corpus, aliases_for

OUTPUT_FIELDS = ["doc_path", "title", "heading", "version", "text"]
# Each ranking fused is this many times deeper than the results kept, so a chunk ranked low in
# one list and high in the other still meets its partner.
FUSION_DEPTH = 3
AGREEMENT_DEPTH = 5  # the rankings "agree" when their top 5 share a document


@dataclass
class Retriever:
    """Holds the Milvus client and the embedders, so a batch of questions loads the models once.
    ``choice``: the embedders, resolved by the caller (``embedding.resolve``, at its path's edge)."""

    settings: Settings
    choice: embedding.EmbedderChoice

    def __post_init__(self):
        self.client = store.connect(self.settings)
        self.embedder = embedding.embedder_for(self.settings, self.choice)
        self.multilingual = embedding.multilingual_for(self.settings, self.choice)
        self._fields: dict[str, Fields] = {}

    def collection(self, version: str | None = None, docs_lang: str | None = None) -> str:
        """The alias to search, checked and loaded once (searches follow the alias when it moves):
        the newest docs, or ``version``; English, or the localized tree ``docs_lang``."""
        name = aliases_for(self.settings.collection, version, docs_lang or DEFAULT_LANGUAGE)
        if name not in self._fields:
            if store.served_collection(self.client, name) is None:
                corpus = Corpus(self.settings.collection, docs_lang or DEFAULT_LANGUAGE)
                raise store.StoreError(served.not_served(self.client, corpus, version))
            store.loaded(self.client, name)
            self._fields[name] = Fields(bm25=store.has_bm25(self.client, name),
                                        multilingual=MULTILINGUAL in store.vector_fields(self.client, name))
        return name

    def embed(self, queries: list[str]) -> dict[str, list[list[float]]]:
        """The queries' vectors by field: ``dense``, and the multilingual field where configured."""
        vectors = {"dense": self.embedder.embed(queries, query=True)}
        if self.multilingual:
            vectors[MULTILINGUAL] = self.multilingual.embed(queries, query=True)
        return vectors

    def search(self, queries: list[str], k: int = 5, version: str | None = None,
               docs_lang: str | None = None) -> list[list[Hit]]:
        return self.search_vectors(queries, self.embed(queries), k, version, docs_lang)

    def search_vectors(self, queries: list[str], vectors: dict[str, list[list[float]]], k: int = 5,
                       version: str | None = None, docs_lang: str | None = None) -> list[list[Hit]]:
        name = self.collection(version, docs_lang)
        fields = self._fields[name]
        if not fields.multilingual:  # an index built without it (or a query embedder without it)
            vectors = {"dense": vectors["dense"]}
        found = search(self.client, name, vectors, queries, k, hybrid=fields.bm25, rrf_k=self.settings.rrf_k,
                       timeout=self.settings.milvus_timeout_s)
        return [[self.linked(h) for h in hits] for hits in found]

    def linked(self, hit: Hit) -> Hit:
        """The hit with the URL of its published page (DOCSRAG_DOCS_URL; none when it is empty)."""
        url = page_url(self.settings.docs_url, hit.version, hit.doc_path, hit.heading, hit.title)
        return replace(hit, url=url) if url else hit


def one_per_document(hits: list[Hit], k: int) -> list[Hit]:
    """A result list a person reads: each document once, at the rank of its best chunk, which stands
    for it (its other chunks would only push other documents off the list)."""
    seen: dict[str, Hit] = {}
    for hit in hits:
        seen.setdefault(hit.doc_path, hit)
    return list(seen.values())[:k]


@dataclass(frozen=True)
class Fields:
    """What a served collection can be searched by, besides its English dense vectors."""

    bm25: bool
    multilingual: bool


def search(client, collection: str, vectors: dict[str, list[list[float]]], texts: list[str], k: int, *,
           hybrid: bool, rrf_k: int, timeout: float | None = None) -> list[list[Hit]]:
    """Top-k rows per query: the multilingual dense field (where given), the English dense field
    and BM25 (where the collection has it), fused by RRF in that order; each Milvus call within
    ``timeout`` seconds (DOCSRAG_MILVUS_TIMEOUT_S when serving: a hung Milvus fails the call)."""
    fields = [*OUTPUT_FIELDS, "dense"]
    searches = [field for field in (MULTILINGUAL, "dense") if field in vectors]
    fused = hybrid or len(searches) > 1
    depth = k * FUSION_DEPTH if fused else k
    dense = {f: store.dense_search(client, collection, vectors[f], depth, fields, field=f, timeout=timeout)
             for f in searches}
    queries = [dict(zip(vectors, per_query)) for per_query in zip(*vectors.values())]
    if not fused:
        return [[hit(h, query, h["distance"]) for h in row] for row, query in zip(dense["dense"], queries)]
    sparse = store.bm25_search(client, collection, texts, depth, fields, timeout=timeout) if hybrid else None
    results = []
    for n, query in enumerate(queries):
        rankings = [dense[f][n] for f in searches] + ([sparse[n]] if hybrid else [])
        # The "covered" signal stays what it was measured as: the English dense and BM25 rankings agree.
        agreement = agree([dense["dense"][n], sparse[n]]) if hybrid else None
        results.append(fuse(rankings, query, k, rrf_k, agreement))
    return results


def agree(rankings: list[list[dict]]) -> bool:
    """Whether the rankings (Milvus's rows, as it returns them) share a document in their top AGREEMENT_DEPTH."""
    top_docs = [{found["entity"]["doc_path"] for found in ranking[:AGREEMENT_DEPTH]} for ranking in rankings]
    return bool(set.intersection(*top_docs))


def fuse(rankings: list[list[dict]], query: dict[str, list[float]], k: int, rrf_k: int,
         agreement: bool | None = None) -> list[Hit]:
    """Reciprocal rank fusion, here rather than in Milvus's ranker so that ties (a chunk first
    in one list only vs. another first in the other only) go to the earlier ranking, the
    semantic match: +0.02 MRR@10 on the dev set (bench/retrieval.py). Each hit also says whether
    the rankings agree on any document in their top 5 (``agreement``; by default all of them), a
    sign the docs cover the question at all."""
    scores: dict[str, float] = {}
    rows: dict[str, dict] = {}
    for ranking in rankings:  # earlier rankings first: sorted() is stable
        for rank, found in enumerate(ranking, 1):
            scores[found["id"]] = scores.get(found["id"], 0.0) + 1.0 / (rrf_k + rank)
            rows.setdefault(found["id"], found)
    best = sorted(scores, key=scores.get, reverse=True)[:k]
    agreement = agree(rankings) if agreement is None else agreement
    return [hit(rows[key], query, scores[key], agreement) for key in best]


def hit(found: dict, query: dict[str, list[float]], score: float, agreement: bool | None = None) -> Hit:
    """A result row; ``relevance`` is the cosine to the query in the English model's space
    (vectors are normalized), comparable across queries, unlike RRF scores. Not the multilingual
    field's: its cosines run higher for unrelated text, and with them the "not covered" rule
    caught 0 of the 3 unanswerable dev questions instead of 2 (bench/retrieval.py). A question in
    another language is translated before it is searched for an answer, so it is judged in English."""
    entity = found["entity"]
    relevance = sum(a * float(b) for a, b in zip(query["dense"], entity["dense"]))
    return Hit(found["id"], entity["doc_path"], entity["title"], entity["heading"], entity["version"], entity["text"],
               float(score), round(relevance, 4), agreement)


def covered(hits: list[Hit], min_relevance: float, weak_relevance: float) -> bool:
    """Whether the docs cover a question, from its hits: the best cosine reaches
    ``min_relevance``, and where it stays under ``weak_relevance`` the dense and BM25 searches
    agree on a document. Questions about another product (MongoDB's $lookup, Weaviate modules)
    land near Milvus pages by meaning, but the words lead elsewhere."""
    if not hits:
        return False
    best = max(h.relevance for h in hits)
    return best >= min_relevance and (best >= weak_relevance or hits[0].agreement is not False)
