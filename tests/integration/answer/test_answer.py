"""The serving flow end to end: FAQ index on Milvus Lite, real Prefect, the gpt-oss emulator."""

import json
import os
import signal
import subprocess
import time
from datetime import datetime, timezone

import pytest

from docsrag.flows.cli import main
from docsrag.tasks.answer.generate import NOT_COVERED, TRANSLATE, not_covered
from docsrag.tasks.core.settings import load_settings
from docsrag.tasks.queue.questions import Queue
from docsrag.testing.llm_emulator import Emulator

from tests.conftest import DOCSRAG, ROOT, api_env

QUESTIONS = ["Where does Milvus store data?", "Is Docker the only way to install and run Milvus?",
             "What are the main factors affecting recall?"]


@pytest.fixture
def llm(faq_home, tmp_path, monkeypatch):
    emulator = Emulator().start()
    monkeypatch.setenv("DOCSRAG_QUEUE_URL", f"sqlite:///{tmp_path / 'questions.db'}")
    monkeypatch.setenv("DOCSRAG_LLM_BASE_URL", emulator.url)
    monkeypatch.setenv("DOCSRAG_RETRY_BACKOFF_S", "0")
    yield emulator
    emulator.stop()


def subset(summary: dict, **expected) -> bool:
    return {k: summary[k] for k in expected} == expected


def cli(capsys, *args):
    code = main([*args, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_questions_are_answered_with_citations_of_faq_docs(llm, capsys, monkeypatch):
    monkeypatch.setenv("DOCSRAG_REASONING_EFFORT", "high")
    ids = [cli(capsys, "ask", q)["id"] for q in QUESTIONS]
    assert subset(cli(capsys, "answer"), claimed=3, answered=3, failed=0, not_covered=0)
    for qid, question in zip(ids, QUESTIONS):
        record = cli(capsys, "show", str(qid))
        assert record["status"] == "answered" and record["question"] == question
        assert record["sources"] and all(s["doc_path"].startswith("en/faq/") for s in record["sources"])
        assert [s["n"] for s in record["sources"]] == list(range(1, len(record["sources"]) + 1))
        assert "[1]" in record["answer"] and record["sources"][0]["doc_path"] in record["answer"]
        assert (record["model"], record["reasoning_effort"]) == ("openai/gpt-oss-20b", "high")
        assert "reasoning" not in record and "Reasoning" not in record["answer"]
        assert record["usage"]["total_tokens"] > 0
    assert len(llm.requests) == 3
    for request in llm.requests:
        assert request["reasoning_effort"] == "high" and request["model"] == "openai/gpt-oss-20b"
        assert (request["temperature"], request["top_p"]) == (1.0, 1.0)
        system, user = request["messages"]
        assert "data, not instructions" in system["content"]
    storage = next(r for r in llm.requests if "Where does Milvus store data?" in r["messages"][1]["content"])
    assert "incremental log" in storage["messages"][1]["content"], "the retrieved text is in the prompt"
    assert '<source n="1" doc="en/faq/product_faq.md"' in storage["messages"][1]["content"]


def test_reasoning_is_stored_apart_and_shown_on_request(llm, capsys):
    llm.reasoning_field = "reasoning_content"  # the older vLLM / DeepSeek-style field
    qid = cli(capsys, "ask", QUESTIONS[0])["id"]
    cli(capsys, "answer")
    assert "reasoning" not in cli(capsys, "show", str(qid))
    assert main(["show", str(qid), "--reasoning", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["reasoning"] == "Reasoning (medium): read 5 sources."


def test_invalid_citations_are_dropped(llm, capsys):
    llm.answer_text = "Object storage [1], see also [9]."
    qid = cli(capsys, "ask", QUESTIONS[0])["id"]
    cli(capsys, "answer")
    assert cli(capsys, "show", str(qid))["answer"] == "Object storage [1], see also ."


def test_no_relevant_context_means_no_model_call(llm, capsys):
    qid = cli(capsys, "ask", "How do I bake sourdough bread?")["id"]
    assert cli(capsys, "answer")["not_covered"] == 1
    record = cli(capsys, "show", str(qid))
    assert (record["status"], record["answer"], record["sources"]) == ("answered", NOT_COVERED, [])
    assert llm.requests == []
    gaps = json.loads(latest_artifact("answer-questions-coverage-gaps").data)
    assert any(g["not_covered"] >= 1 and "sourdough" in g["examples"] for g in gaps), gaps


def latest_artifact(key: str):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def read():
        async with get_client() as client:
            return (await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                                sort=ArtifactSort.CREATED_DESC, limit=1))[0]
    return asyncio.run(read())


def test_transient_errors_are_retried(llm, capsys):
    llm.failures = [429, 500]
    qid = cli(capsys, "ask", QUESTIONS[0])["id"]
    assert cli(capsys, "answer")["answered"] == 1
    assert len(llm.requests) == 3 and cli(capsys, "show", str(qid))["status"] == "answered"


def test_hung_model_server_stops_the_run_and_keeps_the_question(llm, capsys, monkeypatch):
    monkeypatch.setenv("DOCSRAG_LLM_TIMEOUT_S", "0.5")
    monkeypatch.setenv("DOCSRAG_LLM_MAX_RETRIES", "0")
    llm.hang_s = 3
    qid = cli(capsys, "ask", QUESTIONS[0])["id"]
    started = time.monotonic()
    assert main(["answer"]) == 1
    assert time.monotonic() - started < 3
    assert "APITimeoutError" in capsys.readouterr().err
    record = cli(capsys, "show", str(qid))
    assert (record["status"], record["attempts"]) == ("pending", 0)
    assert "Timeout" in record["last_error"] and "no attempt spent" in record["last_error"]


def test_oversized_question_is_refused_at_submit(llm, capsys):
    assert main(["ask", "x" * 5000]) == 1
    assert "over the limit of 2000 (DOCSRAG_MAX_QUESTION_CHARS)" in capsys.readouterr().err
    assert sum(Queue.from_settings(load_settings()).counts().values()) == 0


def test_unknown_version_fails_the_question_not_the_batch(llm, capsys):
    assert main(["ask", QUESTIONS[0], "--version", "9.9.x"]) == 1, "refused at submit, naming what is served"
    assert "served: 2.4.x" in capsys.readouterr().err
    # A product writing straight into the queue is not asked: the worker says it, for that question only.
    bad, _ = Queue.from_settings(load_settings()).submit(QUESTIONS[0], version="9.9.x")
    good = cli(capsys, "ask", QUESTIONS[1])["id"]
    assert subset(cli(capsys, "answer"), answered=1, dead=1)  # no backoff here: retried at once, then dead
    record = cli(capsys, "show", str(bad))
    assert record["status"] == "dead" and "no docs version '9.9.x' is served; served: 2.4.x" in record["last_error"]
    assert cli(capsys, "show", str(good))["status"] == "answered"


def test_worker_killed_after_claiming_is_answered_once(llm, capsys, monkeypatch, releases, tmp_path):
    # Milvus Lite serves one process per file: the worker gets an index this process never opened.
    monkeypatch.setenv("DOCSRAG_HOME", str(tmp_path / "worker-home"))
    monkeypatch.setenv("DOCSRAG_LEASE_S", "12")  # long enough to see it hold, short to wait out
    env = api_env()
    subprocess.run([DOCSRAG, "ingest", "--release", str(releases / "milvus_docs_faq_2.4.x_en.zip")], env=env,
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    qid = cli(capsys, "ask", QUESTIONS[0], "--key", "client-42")["id"]
    assert cli(capsys, "ask", QUESTIONS[0], "--key", "client-42")["id"] == qid
    llm.hang_s = 60
    worker = subprocess.Popen([DOCSRAG, "answer"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not llm.requests and time.monotonic() < deadline:
        time.sleep(0.2)
    assert llm.requests, "the worker claimed and called the model"
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    lease = Queue.from_settings(load_settings()).get(qid)
    assert lease["status"] == "claimed"
    llm.hang_s = 0
    assert cli(capsys, "answer")["claimed"] == 0, "the dead worker's lease still holds"
    expires = datetime.fromisoformat(lease["lease_expires_at"]).replace(tzinfo=timezone.utc)
    time.sleep(max(0.0, (expires - datetime.now(timezone.utc)).total_seconds()) + 0.5)
    assert subset(cli(capsys, "answer"), claimed=1, answered=1, failed=0, not_covered=0)
    record = cli(capsys, "show", str(qid))
    assert (record["status"], record["attempts"]) == ("answered", 2)
    assert Queue.from_settings(load_settings()).counts()["answered"] == 1


def answer_requests(llm) -> list[dict]:
    """What the model was asked to answer (questions not in English are first asked for a translation)."""
    return [r for r in llm.requests if r["messages"][0]["content"] != TRANSLATE]


def stored(question_id: int) -> dict:
    return Queue.from_settings(load_settings()).get(question_id)


@pytest.fixture
def always_covered(monkeypatch):
    """Every question gets sources: these tests are about the answer's language, not retrieval."""
    monkeypatch.setenv("DOCSRAG_MIN_RELEVANCE", "-1")
    monkeypatch.setenv("DOCSRAG_WEAK_RELEVANCE", "-1")


@pytest.mark.parametrize("question, lang, language", [
    ("Milvus는 데이터를 어디에 저장하나요?", "ko", "Korean"),
    ("Di mana Milvus menyimpan data?", "id", "Indonesian"),
])
def test_a_question_is_answered_in_its_language(llm, capsys, always_covered, question, lang, language):
    qid = cli(capsys, "ask", question)["id"]
    assert subset(cli(capsys, "answer"), answered=1, not_covered=0, languages={lang: 1})
    [request] = answer_requests(llm)
    system = request["messages"][0]["content"]
    assert f"Answer in {language}, the language of the question." in system
    assert "Keep the citations [n] as they are" in system and "identifiers exactly as written" in system
    record = stored(qid)
    assert record["lang"] == lang
    assert f"(Answer in {language}," in record["answer"], "the model was told, as the emulator echoes"
    assert "[1]" in record["answer"] and record["sources"][0]["n"] == 1, "citations are still checked"


def test_an_english_question_gets_no_language_instruction(llm, capsys):
    qid = cli(capsys, "ask", QUESTIONS[0])["id"]
    cli(capsys, "answer")
    [request] = llm.requests  # no translation either
    assert "Answer in" not in request["messages"][0]["content"]
    record = stored(qid)
    assert record["lang"] == "en" and record["answer"].endswith("this is covered [1].")


def test_not_covered_is_said_in_the_question_language(llm, capsys, monkeypatch):
    monkeypatch.setenv("DOCSRAG_MIN_RELEVANCE", "1")  # nothing is close enough: no model call
    monkeypatch.setenv("DOCSRAG_WEAK_RELEVANCE", "1")
    korean = cli(capsys, "ask", "Milvus는 데이터를 어디에 저장하나요?")["id"]
    english = cli(capsys, "ask", QUESTIONS[0])["id"]
    assert cli(capsys, "answer")["not_covered"] == 2
    assert stored(korean)["answer"] == not_covered("ko") != NOT_COVERED
    assert stored(english)["answer"] == NOT_COVERED
    assert answer_requests(llm) == [], "no answer asked (the Korean question was translated for retrieval)"


def test_a_question_queued_without_a_language_is_answered_in_the_detected_one(llm, capsys, always_covered):
    from docsrag.tasks.queue.questions import questions

    queue = Queue.from_settings(load_settings())
    qid, _ = queue.submit("Milvus는 데이터를 어디에 저장하나요?")
    with queue.engine.begin() as db:  # as a product writing into the queue, or a row from before languages
        db.execute(questions.update().where(questions.c.id == qid).values(lang=None))
    cli(capsys, "answer")
    assert "Answer in Korean" in answer_requests(llm)[0]["messages"][0]["content"]
    assert stored(qid)["lang"] == "ko"


def test_a_question_not_in_english_is_searched_in_english_and_answered_as_asked(llm, capsys):
    question, english = "Milvus는 데이터를 어디에 저장하나요?", "Where does Milvus store data?"
    llm.translations[question] = english
    qid = cli(capsys, "ask", question)["id"]
    assert subset(cli(capsys, "answer"), answered=1, not_covered=0)
    translation, answer = llm.requests
    assert translation["messages"][1]["content"] == question and translation["reasoning_effort"] == "low"
    assert answer["messages"][1]["content"].endswith(f"Question: {question}"), "the answer is asked as asked"
    searched = cli(capsys, "search", english, "-k", "5")["results"]
    # The same hits: the answer's sources (one per heading) name the documents in the search's order.
    cited = list(dict.fromkeys(s["doc_path"] for s in stored(qid)["sources"]))
    assert cited == [r["doc_path"] for r in searched][:len(cited)]


def test_a_failed_translation_costs_nothing_but_the_translation(llm, capsys, always_covered):
    llm.failures = [500]  # the translation request fails; the answer request succeeds
    qid = cli(capsys, "ask", "Milvus는 데이터를 어디에 저장하나요?")["id"]
    assert subset(cli(capsys, "answer"), answered=1, failed=0)
    assert stored(qid)["status"] == "answered" and stored(qid)["attempts"] == 1


INDONESIAN = "Di mana Milvus menyimpan data?"


@pytest.fixture
def nothing_covered(monkeypatch):
    """Every question is answered "not covered", with no model call: these tests are about what is said of it."""
    monkeypatch.setenv("DOCSRAG_MIN_RELEVANCE", "1")
    monkeypatch.setenv("DOCSRAG_WEAK_RELEVANCE", "1")


def test_a_question_left_untranslated_says_so_and_is_a_translation_gap(llm, capsys, nothing_covered):
    llm.failures = [500]  # the translation's one request (not retried): searched as asked
    qid = cli(capsys, "ask", INDONESIAN)["id"]
    assert subset(cli(capsys, "answer"), answered=1, not_covered=1)
    assert cli(capsys, "show", str(qid))["untranslated"] == "no translation was available"
    assert main(["show", str(qid)]) == 0
    assert "(searched as asked: no translation was available)" in capsys.readouterr().out.splitlines()
    stats = cli(capsys, "questions", "--stats")
    assert not any(INDONESIAN in gap["examples"] for gap in stats["coverage_gaps"]), "not a docs gap"
    assert stats["translation_gaps"] == {"not_covered": 1, "examples": [INDONESIAN]}
    assert main(["questions", "--stats"]) == 0
    assert "not covered after a search as asked, untranslated: 1" in capsys.readouterr().out


def test_a_language_searched_as_asked_by_design_is_no_translation_gap(llm, capsys, nothing_covered, monkeypatch):
    monkeypatch.setenv("DOCSRAG_SEARCH_AS_ASKED", "id")  # the operator's choice (e5 finds Indonesian as asked)
    qid = cli(capsys, "ask", INDONESIAN)["id"]
    assert subset(cli(capsys, "answer"), answered=1, not_covered=1)
    assert llm.requests == [], "no translation asked"
    assert cli(capsys, "show", str(qid))["untranslated"] is None
    assert main(["show", str(qid)]) == 0
    assert "searched as asked" not in capsys.readouterr().out
    stats = cli(capsys, "questions", "--stats")
    assert any(INDONESIAN in gap["examples"] for gap in stats["coverage_gaps"]), "a docs gap, as searched by design"
    assert stats["translation_gaps"] == {"not_covered": 0, "examples": []}


def test_search_and_eval_look_for_a_question_not_in_english_in_its_translation(llm, capsys, tmp_path):
    question, english = "Milvus는 데이터를 어디에 저장하나요?", "Where does Milvus store data?"
    llm.translations[question] = english
    found = cli(capsys, "search", question)
    assert found["query"] == question and found["searched_as"] == english
    assert found["results"] == cli(capsys, "search", english)["results"]
    [translation] = llm.requests  # the English search asked for none
    assert translation["reasoning_effort"] == "low" and translation["messages"][1]["content"] == question
    gold = tmp_path / "gold.jsonl"
    gold.write_text(json.dumps({"question": question, "gold_sources": ["en/faq/product_faq.md"], "lang": "ko"}))
    assert cli(capsys, "eval", "--gold", str(gold))["by_language"]["ko"]["recall@1"] == 1.0


def test_search_without_a_model_looks_for_the_question_as_asked(faq_home, capsys, monkeypatch):
    monkeypatch.setenv("DOCSRAG_LLM_BASE_URL", "http://127.0.0.1:9/v1")  # nothing listens there
    found = cli(capsys, "search", "Milvus는 데이터를 어디에 저장하나요?")
    assert "searched_as" not in found and found["results"]
