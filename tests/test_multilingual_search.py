"""Readers in Korean and Indonesian with no LLM (no translation): on the real 2.4.x release, indexed
with the default models, each question as asked finds its FAQ answer in the top 5. The question in
Korean is the one a newcomer tried (the FAQ was not in its top 10 with USE); Indonesian is a
language USE does not have."""

import json

import pytest

from docsrag.flows.cli import main

from .conftest import ingest_into

QUESTIONS = [
    ("Milvus에서 데이터는 어떻게 저장되나요?", "en/faq/product_faq.md"),
    ("Apakah pencarian Milvus dilakukan di memori? Dan apa arti 'incremental data' dan 'historical data'?",
     "en/faq/product_faq.md"),
]


@pytest.fixture(scope="module")
def release_home(tmp_path_factory, releases, prefect_server):
    home = tmp_path_factory.mktemp("multilingual") / "home"
    summary = ingest_into(home, releases / "milvus_docs_2.4.x_en.zip")
    assert summary["chunks"] > 2000
    return home


@pytest.mark.parametrize("question, faq", QUESTIONS, ids=["ko", "id"])
def test_a_question_as_asked_finds_its_faq_answer_in_the_top_5(release_home, question, faq, capsys, monkeypatch):
    monkeypatch.setenv("DOCSRAG_HOME", str(release_home))
    monkeypatch.setenv("DOCSRAG_LLM_BASE_URL", "http://127.0.0.1:9/v1")  # nothing listens there
    assert main(["search", question, "-k", "5", "--json"]) == 0
    found = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "searched_as" not in found, "no model, no translation"
    assert faq in [r["doc_path"] for r in found["results"]], [r["doc_path"] for r in found["results"]]
