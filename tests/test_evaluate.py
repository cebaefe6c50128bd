"""Retrieval evaluation: the metric code on hand-made cases, and the flow end to end."""

import json

import pytest

from flows.cli import main
from tasks.evaluate import aggregate, first_gold_rank, load_gold, score
from tasks.retrieve import covered

from .llm_emulator import Emulator


def hits(*docs, relevance=0.8):
    return [{"doc_path": d, "text": f"text of {d}", "relevance": relevance} for d in docs]


def test_rank_counts_distinct_documents():
    assert first_gold_rank(["c.md"], hits("a.md", "a.md", "b.md", "c.md")) == 3
    assert first_gold_rank(["frag.md", "page.md"], hits("x.md", "page.md")) == 2
    assert first_gold_rank(["c.md"], hits("a.md")) is None


def test_aggregates_on_a_hand_made_gold_set():
    gold = [
        {"id": "1", "question": "q1", "gold_sources": ["a.md"], "must_contain_any": ["text of a"]},
        {"id": "2", "question": "q2", "gold_sources": ["b.md"], "must_contain_any": ["absent"]},
        {"id": "3", "question": "q3", "gold_sources": ["z.md"], "must_contain_any": []},
        {"id": "4", "question": "q4", "gold_sources": [], "must_contain_any": []},
    ]
    results = [hits("a.md", "b.md"), hits("a.md", "c.md", "d.md", "b.md"), hits("a.md"), hits("a.md", relevance=0.1)]
    rows = [score(g, h, not covered(h, min_relevance=0.3, weak_relevance=0.3)) for g, h in zip(gold, results)]
    figures = aggregate(rows)
    assert [r["rank"] for r in rows] == [1, 4, None, None]
    assert figures["recall@1"] == round(1 / 3, 4) and figures["recall@3"] == round(1 / 3, 4)
    assert figures["recall@5"] == figures["recall@10"] == round(2 / 3, 4)
    assert figures["mrr@10"] == round((1 + 1 / 4) / 3, 4)
    assert figures["contains"] == 0.5
    assert (figures["not_covered_unanswerable"], figures["not_covered_answerable"]) == ("1/1", "0/3")


def test_gold_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "gold.jsonl"
    bad.write_text('{"question": "ok", "gold_sources": []}\n{"nope": 1}\n')
    with pytest.raises(ValueError, match="gold.jsonl:2"):
        load_gold(bad)


def test_eval_runs_end_to_end_on_the_faq_release(home, prefect_server, releases, tmp_path, capsys, monkeypatch):
    assert main(["ingest", "--release", str(releases / "milvus_docs_faq_2.4.x_en.zip")]) == 0
    gold = tmp_path / "gold.jsonl"
    gold.write_text("\n".join(json.dumps(g) for g in [
        {"id": "a", "question": "Where does Milvus store data?", "gold_sources": ["en/faq/product_faq.md"],
         "must_contain_any": ["incremental log"]},
        {"id": "b", "question": "What if I failed to pull the Milvus Docker image?",
         "gold_sources": ["en/faq/operational_faq.md"], "must_contain_any": ["registry mirrors"]},
        {"id": "c", "question": "How do I bake sourdough bread?", "gold_sources": []},
    ]))
    capsys.readouterr()
    assert main(["eval", "--gold", str(gold), "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["recall@1"] == figures["recall@5"] == figures["mrr@10"] == 1.0
    assert figures["not_covered_unanswerable"] == "1/1" and figures["not_covered_answerable"] == "0/2"
    assert figures["questions"] == 3

    emulator = Emulator().start()
    monkeypatch.setenv("DOCSRAG_LLM_BASE_URL", emulator.url)
    try:
        assert main(["eval", "--gold", str(gold), "--answers", "--json"]) == 0
    finally:
        emulator.stop()
    figures = json.loads(capsys.readouterr().out)
    assert figures["answers_citing_gold"] == 1.0 and figures["answer_errors"] == 0
    assert len(emulator.requests) == 2, "only answerable questions are asked"


def test_weak_matches_count_only_when_dense_and_bm25_agree():
    def found(relevance, agreement):
        return [{"doc_path": "a.md", "text": "", "relevance": relevance, "agreement": agreement}]

    assert covered(found(0.5, False), 0.3, 0.4)  # close enough on meaning alone
    assert covered(found(0.35, True), 0.3, 0.4)  # weak, but both searches point at the same doc
    assert not covered(found(0.35, False), 0.3, 0.4)  # weak and the words lead elsewhere
    assert not covered(found(0.2, True), 0.3, 0.4)  # too far whatever the words say
    assert covered(found(0.35, None), 0.3, 0.4)  # dense-only servers: the cosine threshold alone
    assert not covered([], 0.3, 0.4)
