"""Who may call the questions API, and what each caller sees (issue 29): loopback mode answers
loopback host names only and no other site's state-changing request; each token sees only its own
questions; operators see everything. Real uvicorn, the real queue (SQLite and PostgreSQL), the FAQ
index on Milvus Lite, the gpt-oss emulator."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest

from docsrag.flows.cli import main
from docsrag.tasks.service.guard import Caller, RateLimit

from tests.integration.api.conftest import QUESTION, api_for

A, B, OPERATOR = "token-a-secret", "token-b-secret", "operator-secret"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def tokens_api(monkeypatch, faq_home, queue_url, llm):
    running = api_for(monkeypatch, faq_home, queue_url, llm, API_TOKENS=f"{A},{B}", API_OPERATOR_TOKENS=OPERATOR)
    yield running
    running.stop()


@pytest.fixture
def loopback_api(monkeypatch, faq_home, tmp_path, llm):
    running = api_for(monkeypatch, faq_home, f"sqlite:///{tmp_path / 'questions.db'}", llm, API_RATE_PER_MIN=3)
    yield running
    running.stop()


# ---------------------------------------------------------------- loopback mode


def test_loopback_mode_refuses_a_rebound_host_name(loopback_api):
    port = loopback_api.url.rsplit(":", 1)[1]
    with httpx.Client(base_url=loopback_api.url, timeout=30) as client:
        rebound = client.get("/v1/stats", headers={"Host": "attacker.example"})
        assert rebound.status_code == 403, rebound.text
        assert "loopback host names" in rebound.json()["reason"]
        assert client.post("/v1/questions", json={"question": QUESTION},
                           headers={"Host": f"attacker.example:{port}"}).status_code == 403
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
            assert client.get("/v1/search", params={"q": "milvus", "k": 1}, headers={"Host": host}).status_code == 200


def test_loopback_mode_accepts_the_host_names_configured(monkeypatch, faq_home, tmp_path, llm):
    running = api_for(monkeypatch, faq_home, f"sqlite:///{tmp_path / 'q.db'}", llm,
                      API_ALLOWED_HOSTS="docs.internal, laptop.lan")
    try:
        with httpx.Client(base_url=running.url, timeout=30) as client:
            assert client.get("/v1/stats", headers={"Host": "docs.internal:8080"}).status_code == 200
            assert client.get("/v1/stats", headers={"Host": "docs.internal.attacker.example"}).status_code == 403
    finally:
        running.stop()


def test_loopback_mode_refuses_a_state_change_from_another_site(loopback_api):
    with httpx.Client(base_url=loopback_api.url, timeout=30) as client:
        for origin in ("http://attacker.example", "null"):
            forged = client.post("/v1/questions", json={"question": QUESTION}, headers={"Origin": origin})
            assert forged.status_code == 403 and "another site" in forged.json()["reason"], forged.text
        assert client.post("/v1/questions", json={"question": QUESTION},
                           headers={"Origin": loopback_api.url}).status_code == 202, "the page's own origin"


def test_loopback_callers_share_one_rate_limit_whatever_their_address(loopback_api):
    spent = []
    for n in range(2, 6):  # 127.0.0.2 ... 127.0.0.5: every loopback address is the same caller
        with httpx.Client(base_url=loopback_api.url, timeout=30,
                          transport=httpx.HTTPTransport(local_address=f"127.0.0.{n}")) as client:
            spent.append(client.get("/v1/search", params={"q": "milvus", "k": 1}).status_code)
    assert spent == [200, 200, 200, 429]


def test_rate_limit_buckets_are_bounded():
    rate = RateLimit(per_minute=60, max_buckets=100)
    for n in range(1000):
        rate.take(Caller(f"t-{n}"))
    assert len(rate.buckets) <= 100


# ---------------------------------------------------------------- tokens


def test_a_token_reads_and_rates_only_its_own_questions(tokens_api):
    with httpx.Client(base_url=tokens_api.url, timeout=60) as client:
        mine = client.post("/v1/questions", json={"question": QUESTION}, headers=bearer(A)).json()["id"]
        theirs = client.get(f"/v1/questions/{mine}", headers=bearer(B))
        assert theirs.status_code == 404 and theirs.json()["reason"] == f"no question {mine}", theirs.text
        assert client.get(f"/v1/questions/{mine}", params={"wait": 1}, headers=bearer(B)).status_code == 404
        rated = client.post(f"/v1/questions/{mine}/feedback", json={"helpful": False}, headers=bearer(B))
        assert rated.status_code == 404, rated.text
        assert client.get(f"/v1/questions/{mine}", headers=bearer(A)).json()["question"] == QUESTION
        assert client.post(f"/v1/questions/{mine}/feedback", json={"helpful": True},
                           headers=bearer(A)).status_code == 201
        operator = client.get(f"/v1/questions/{mine}", headers=bearer(OPERATOR))
        assert operator.status_code == 200 and operator.json()["question"] == QUESTION
        assert client.get("/v1/stats", headers=bearer(OPERATOR)).json()["feedback"] == {"helpful": 1,
                                                                                        "not_helpful": 0}


def test_a_client_key_is_scoped_to_its_token(tokens_api):
    with httpx.Client(base_url=tokens_api.url, timeout=60) as client:
        first = client.post("/v1/questions", json={"question": QUESTION, "client_key": "k-1"}, headers=bearer(A))
        other = client.post("/v1/questions", json={"question": "What is BM25?", "client_key": "k-1"},
                            headers=bearer(B))
        assert other.json()["id"] != first.json()["id"], "B's question is B's, not A's"
        assert client.get(f"/v1/questions/{other.json()['id']}", headers=bearer(B)).json()["question"] == \
            "What is BM25?"
        again = client.post("/v1/questions", json={"question": QUESTION, "client_key": "k-1"}, headers=bearer(A))
        assert again.json()["id"] == first.json()["id"], "the same token's key still returns its first question"


def test_stats_and_coverage_gaps_are_for_operator_tokens(tokens_api):
    with httpx.Client(base_url=tokens_api.url, timeout=60) as client:
        refused = client.get("/v1/stats", headers=bearer(A))
        assert refused.status_code == 403 and "DOCSRAG_API_OPERATOR_TOKENS" in refused.json()["reason"], refused.text
        assert client.get("/v1/stats", headers=bearer(OPERATOR)).status_code == 200
        assert client.post("/v1/questions", json={"question": QUESTION},
                           headers=bearer(OPERATOR)).status_code == 202, "an operator may ask too"


def test_the_owner_stored_is_no_token(tokens_api):
    with httpx.Client(base_url=tokens_api.url, timeout=60) as client:
        client.post("/v1/questions", json={"question": QUESTION}, headers=bearer(A))
    with tokens_api.service.queue.engine.begin() as db:
        rows = [" ".join(map(str, row)) for row in db.exec_driver_sql("SELECT * FROM docsrag_questions")]
    assert rows and not any(A in row for row in rows)


def test_a_repeat_is_found_among_the_askers_own_questions_only(tokens_api):
    """B asking A's question gets an answer of its own: a repeat of A's would tell B that someone
    asked it, and A's id."""
    with httpx.Client(base_url=tokens_api.url, timeout=60) as client:
        first = client.post("/v1/questions", json={"question": QUESTION}, headers=bearer(A)).json()["id"]
        tokens_api.drain()
        theirs = client.post("/v1/questions", json={"question": QUESTION}, headers=bearer(B)).json()
        assert (theirs["status"], theirs["repeat_of"]) == ("pending", None), theirs
        assert client.get(f"/v1/questions/{theirs['id']}", headers=bearer(B)).json()["repeat_of"] is None
        again = client.post("/v1/questions", json={"question": QUESTION}, headers=bearer(A)).json()
        assert (again["status"], again["repeat_of"]) == ("answered", first), "the same owner's repeat still is one"


def test_one_vote_per_question_per_token_the_latest_counts(tokens_api):
    with httpx.Client(base_url=tokens_api.url, timeout=60) as client:
        mine = client.post("/v1/questions", json={"question": QUESTION}, headers=bearer(A)).json()["id"]
        for helpful in (True, False, False, False):
            assert client.post(f"/v1/questions/{mine}/feedback", json={"helpful": helpful},
                               headers=bearer(A)).status_code == 201
        stats = client.get("/v1/stats", headers=bearer(OPERATOR)).json()
        assert stats["feedback"] == {"helpful": 0, "not_helpful": 1}, "A's last vote, once"
        client.post(f"/v1/questions/{mine}/feedback", json={"helpful": True, "comment": "now it is"}, headers=bearer(A))
        client.post(f"/v1/questions/{mine}/feedback", json={"helpful": True}, headers=bearer(OPERATOR))
        assert client.get("/v1/stats", headers=bearer(OPERATOR)).json()["feedback"] == {"helpful": 2,
                                                                                       "not_helpful": 0}


# ---------------------------------------------------------------- the rest


def test_a_wait_over_the_servers_limit_is_clamped(monkeypatch, faq_home, queue_url, llm):
    running = api_for(monkeypatch, faq_home, queue_url, llm, API_MAX_WAIT_S=1)
    try:
        with httpx.Client(base_url=running.url, timeout=30) as client:
            question_id = client.post("/v1/questions", json={"question": QUESTION}).json()["id"]
            started = time.monotonic()
            held = client.get(f"/v1/questions/{question_id}", params={"wait": 25})  # what flows/api/page.html asks
            assert held.status_code == 200 and held.json()["status"] == "pending", held.text
            assert 1 <= time.monotonic() - started < 5, "held for the server's limit, not the 25 s asked"
            wait = client.get("/openapi.json").json()["paths"]["/v1/questions/{question_id}"]["get"]["parameters"]
            assert "DOCSRAG_API_MAX_WAIT_S" in next(p for p in wait if p["name"] == "wait")["description"]
    finally:
        running.stop()


def test_timestamps_carry_their_utc_offset(monkeypatch, faq_home, queue_url, llm, capsys):
    running = api_for(monkeypatch, faq_home, queue_url, llm)
    try:
        with httpx.Client(base_url=running.url, timeout=30) as client:
            question_id = client.post("/v1/questions", json={"question": QUESTION}).json()["id"]
            running.drain()
            timings = client.get(f"/v1/questions/{question_id}").json()["timings"]
    finally:
        running.stop()
    assert timings["created_at"].endswith("+00:00") and timings["answered_at"].endswith("+00:00"), timings
    assert main(["questions", "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)[0]["created_at"].endswith("+00:00")
    assert main(["show", str(question_id), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["created_at"].endswith("+00:00") and shown["answered_at"].endswith("+00:00")


def test_a_client_key_over_200_characters_is_refused_at_parse_time(monkeypatch, home, queue_url, capsys):
    monkeypatch.setenv("DOCSRAG_QUEUE_URL", queue_url)
    with pytest.raises(SystemExit) as refused:
        main(["ask", "Where does Milvus store data?", "--key", "k" * 201])
    assert refused.value.code == 2 and "1 to 200 characters" in capsys.readouterr().err


def test_a_damaged_index_is_a_json_503_not_a_plain_500(monkeypatch, faq_index, tmp_path, llm):
    home = tmp_path / "home"
    shutil.copytree(faq_index.home, home)
    (home / "milvus.db" / "aliases.json").write_text("garbage{")  # Milvus Lite's alias file, damaged
    monkeypatch.setenv("DOCSRAG_HOME", str(home))
    running = api_for(monkeypatch, home, f"sqlite:///{tmp_path / 'q.db'}", llm)
    try:
        with httpx.Client(base_url=running.url, timeout=60) as client:
            refused = client.get("/v1/search", params={"q": QUESTION})
    finally:
        running.stop()
    assert refused.status_code == 503 and refused.headers["content-type"] == "application/json", refused.text
    assert refused.json()["reason"] == "the docs index is unavailable; try again later"
