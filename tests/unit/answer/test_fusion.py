"""Reciprocal rank fusion of the dense and BM25 rankings (pure, no Milvus needed)."""

from docsrag.tasks.answer.retrieve import fuse
from docsrag.tasks.core.records import Hit


def hit(key: str, dense: list[float]) -> dict:
    """A row as Milvus returns it."""
    return {"id": key, "distance": 0.0, "entity": {"doc_path": f"{key}.md", "title": key, "heading": key,
                                                    "version": "1.0.x", "text": key, "dense": dense}}


def test_chunks_in_both_rankings_come_first_and_ties_go_to_dense():
    dense = [hit("a", [1.0, 0.0]), hit("b", [0.6, 0.8])]
    bm25 = [hit("c", [0.0, 1.0]), hit("b", [0.6, 0.8])]
    fused = fuse([dense, bm25], query={"dense": [1.0, 0.0]}, k=3, rrf_k=10)
    assert [h.id for h in fused] == ["b", "a", "c"]  # b is in both; a and c tie, dense wins
    assert fused[0].score == 1 / 12 + 1 / 12
    assert [h.relevance for h in fused] == [0.6, 1.0, 0.0]  # cosine to the query, not the RRF score
    assert all(isinstance(h, Hit) for h in fused) and not hasattr(fused[0], "dense")
    assert all(h.agreement for h in fused)  # both rankings hold b.md


def test_rankings_with_no_document_in_common_disagree():
    fused = fuse([[hit("a", [1.0, 0.0])], [hit("c", [0.0, 1.0])]], {"dense": [1.0, 0.0]}, k=2, rrf_k=5)
    assert [h.agreement for h in fused] == [False, False]


def test_fusion_keeps_k_results():
    ranking = [hit(str(n), [1.0, 0.0]) for n in range(10)]
    assert len(fuse([ranking, ranking[::-1]], {"dense": [1.0, 0.0]}, k=4, rrf_k=10)) == 4
