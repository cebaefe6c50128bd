"""The draining answer worker under load and under faults.

The FAQ index lives on a real Milvus server (Milvus Lite's gRPC server in its own process), so
a test can kill it and start it again, and several workers (threads or processes) can search
it at once. The model is the continuous-batching emulator; Prefect is real.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from docsrag.flows.cli import main
from docsrag.tasks.core.settings import load_settings
from docsrag.tasks.embed import embedding
from docsrag.tasks.queue.questions import Queue
from docsrag.testing.llm_emulator import Emulator
from docsrag.testing.milvus_server import CuttingProxy, MilvusServer

from tests.conftest import DOCSRAG, FAQ, ROOT, api_env, ingest_into

QUESTIONS = ["Where does Milvus store data?", "Is Docker the only way to install and run Milvus?",
             "What are the main factors affecting recall?", "Can I upsert data in Milvus?"]


@pytest.fixture(scope="module")
def milvus(tmp_path_factory, prefect_server, releases):
    server = MilvusServer(tmp_path_factory.mktemp("milvus-data")).start()
    ingest_into(tmp_path_factory.mktemp("drain") / "home", releases / FAQ, MILVUS_URI=server.uri)
    yield server
    server.kill()


@pytest.fixture
def llm(milvus, tmp_path, monkeypatch):
    """A small GPU: 8 sequences at once, 40 tokens per answer, 2-6 ms per step."""
    emulator = Emulator(max_num_seqs=8, step_s=(0.002, 0.006), output_tokens=40).start()
    monkeypatch.setenv("DOCSRAG_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DOCSRAG_MILVUS_URI", milvus.uri)
    monkeypatch.setenv("DOCSRAG_QUEUE_URL", f"sqlite:///{tmp_path / 'questions.db'}")
    monkeypatch.setenv("DOCSRAG_LLM_BASE_URL", emulator.url)
    monkeypatch.setenv("DOCSRAG_LLM_CONCURRENCY", "8")
    monkeypatch.setenv("DOCSRAG_LLM_MAX_RETRIES", "1")
    monkeypatch.setenv("DOCSRAG_MIN_RELEVANCE", "-1")  # every question goes to the model
    yield emulator
    emulator.stop()


def queue() -> Queue:
    return Queue.from_settings(load_settings())


def submit(n: int, start: int = 0) -> list[int]:
    q = queue()
    return [q.submit(f"{QUESTIONS[i % len(QUESTIONS)]} (#{i})")[0] for i in range(start, start + n)]


def answer(capsys, *args) -> tuple[int, dict | None, str]:
    code = main(["answer", "--json", *args])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def asked(emulator: Emulator) -> list[str]:
    """The question of each request, in the order the server received them."""
    return [r["messages"][-1]["content"].rsplit("Question: ", 1)[-1] for r in emulator.requests]


def test_backlog_larger_than_a_claim_drains_while_questions_keep_coming(llm, capsys, monkeypatch, queue_url):
    monkeypatch.setenv("DOCSRAG_QUEUE_URL", queue_url)
    ids = submit(150)
    late: list[int] = []

    def keep_asking():  # 50 more while the run drains
        for i in range(5):
            time.sleep(0.3)
            late.extend(submit(10, start=150 + 10 * i))

    asker = threading.Thread(target=keep_asking)
    asker.start()
    code, summary, err = answer(capsys)
    asker.join()
    assert code == 0, err
    code, rest, _ = answer(capsys)  # whatever came after the first run saw an empty queue
    answered = summary["answered"] + rest["answered"]
    assert summary["claimed"] > 64 and answered == 200 and summary["stopped"] == "queue empty"
    records = [queue().get(qid) for qid in ids + late]
    assert all(r["status"] == "answered" and r["attempts"] == 1 for r in records), "each answered once"
    order = asked(llm)
    assert sorted(order) == sorted(r["question"] for r in records), "one request per question, none twice"
    # Oldest first: a question is sent no later than a window (slots + buffer) after its turn.
    position = {question: n for n, question in enumerate(order)}
    first = [r["question"] for r in records[:150]]
    assert all(abs(position[q] - n) <= 2 * 8 for n, q in enumerate(first))
    assert summary["output_tokens"] == 40 * summary["answered"]


def test_server_is_kept_busy_while_questions_wait(llm, capsys):
    submit(120)
    code, _, err = answer(capsys)
    assert code == 0, err
    stats = llm.engine.stats()
    assert stats["mean_batch"] >= 0.75 * stats["max_num_seqs"], stats  # a sliding window, not waves
    from prefect import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        latest = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
    assert latest.name == "answer 120 questions (120 answered)", "the run is named for what it did"


def test_llm_server_down_then_up_spends_no_attempt(llm, capsys, monkeypatch):
    ids = submit(20)
    llm.stop()  # connection refused
    code, _, err = answer(capsys)
    assert code == 1 and f"the LLM server at {llm.url} failed" in err and "APIConnectionError" in err
    assert "went back to the queue without spending an attempt" in err
    records = [queue().get(qid) for qid in ids]
    assert all(r["status"] == "pending" and r["attempts"] == 0 for r in records)
    assert "APIConnectionError" in records[0]["last_error"]
    again = Emulator(port=llm.port, max_num_seqs=8, step_s=(0.002, 0.006), output_tokens=40).start()
    try:
        code, summary, err = answer(capsys)
        assert code == 0, err
        assert summary["answered"] == 20
        assert all(queue().get(qid)["attempts"] == 1 for qid in ids)
    finally:
        again.stop()


def test_a_ten_minute_outage_dead_letters_nothing(llm, capsys, monkeypatch):
    monkeypatch.setenv("DOCSRAG_MAX_ATTEMPTS", "2")
    ids = submit(5)
    llm.always_fail = 503
    for _ in range(4):  # every scheduled run during the outage
        assert answer(capsys)[0] == 1
    assert queue().counts()["pending"] == 5
    llm.always_fail = None
    assert answer(capsys)[1]["answered"] == 5
    assert {queue().get(qid)["status"] for qid in ids} == {"answered"}


def test_poison_question_is_dead_lettered_with_its_reason(llm, capsys, monkeypatch):
    monkeypatch.setenv("DOCSRAG_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("DOCSRAG_LLM_MAX_TOKENS", "16")  # the reasoning runs out of room: no answer
    monkeypatch.setenv("DOCSRAG_RETRY_BACKOFF_S", "0")
    [qid] = submit(1)
    code, summary, _ = answer(capsys)
    assert code == 0 and (summary["failed"], summary["dead"]) == (1, 1), "failed, retried within the run, then dead"
    record = queue().get(qid)
    assert (record["status"], record["attempts"]) == ("dead", 2)
    assert "EmptyAnswer" in record["last_error"] and "finish_reason=length" in record["last_error"]


def test_milvus_down_after_claiming_puts_the_questions_back(llm, capsys, monkeypatch, milvus):
    ids = submit(100)
    monkeypatch.setenv("DOCSRAG_LLM_CONCURRENCY", "8")  # claims of 8, so more are claimed after the kill
    llm.latency_s = 0.3  # the first claims are still generating when Milvus goes away
    generating = threading.Event()

    def kill_once_generating():  # not on a timer: a slow start must not kill it before the run claims
        while not llm.requests and not generating.is_set():
            time.sleep(0.02)
        if not generating.is_set():
            milvus.kill()

    killer = threading.Thread(target=kill_once_generating, daemon=True)
    killer.start()
    try:
        code, _, err = answer(capsys)
        assert code == 1 and f"Milvus at {milvus.uri} failed while retrieving" in err
        records = [queue().get(qid) for qid in ids]
        statuses = {r["status"] for r in records}
        assert statuses <= {"answered", "pending"} and "pending" in statuses
        assert all(r["attempts"] == (1 if r["status"] == "answered" else 0) for r in records)
    finally:
        generating.set()
        killer.join()
        milvus.kill()
        milvus.start()
    llm.latency_s = 0
    code, _, err = answer(capsys)
    assert code == 0, err
    assert {queue().get(qid)["status"] for qid in ids} == {"answered"}


def test_a_connection_cut_as_it_opens_is_tried_again(llm, capsys, monkeypatch, milvus):
    with CuttingProxy(milvus.port, cut=2) as proxy:
        monkeypatch.setenv("DOCSRAG_MILVUS_URI", proxy.uri)
        assert main(["search", QUESTIONS[0], "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["results"][0]["doc_path"].startswith("en/faq/")
    with CuttingProxy(milvus.port, cut=3) as proxy:  # a server that stays away: a clear error soon
        monkeypatch.setenv("DOCSRAG_MILVUS_URI", proxy.uri)
        started = time.monotonic()
        assert main(["search", QUESTIONS[0]]) == 1
        assert f"cannot reach Milvus at {proxy.uri}" in capsys.readouterr().err
        assert time.monotonic() - started < 5


def test_locked_store_fails_before_claiming(llm, capsys, monkeypatch, tmp_path):
    lite = tmp_path / "locked.db"
    monkeypatch.setenv("DOCSRAG_MILVUS_URI", str(lite))
    hold = f"from pymilvus import MilvusClient; MilvusClient({str(lite)!r}); print('ok', flush=True); input()"
    holder = subprocess.Popen([sys.executable, "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        ids = submit(3)
        code, _, err = answer(capsys)
        assert code == 1 and "Milvus Lite serves one process at a time" in err
        assert all(queue().get(qid)["attempts"] == 0 for qid in ids)
        assert queue().counts()["pending"] == 3
    finally:
        holder.kill()
        holder.wait()


def test_leases_hold_under_a_slow_model_and_a_second_worker(llm, capsys, monkeypatch):
    monkeypatch.setenv("DOCSRAG_LEASE_S", "1.5")  # renewed every 0.5 s
    llm.latency_s = 3.0  # twice the lease
    ids = submit(8)
    second: dict = {}

    def second_worker():
        import asyncio

        from docsrag.tasks.answer.drain import Drain
        from docsrag.tasks.answer.retrieve import Retriever

        settings = load_settings()
        drain = Drain(settings, Queue.from_settings(settings), Retriever(settings, embedding.resolve(settings)),
                      owner="second", max_seconds=3)
        while not llm.requests:  # the first run has claimed them all and the model is working
            time.sleep(0.02)
        time.sleep(1.6)  # longer than a lease: one not renewed would have expired by now
        second["summary"] = asyncio.run(drain.run())

    other = threading.Thread(target=second_worker)
    other.start()
    code, summary, err = answer(capsys)
    other.join()
    assert code == 0, err
    assert (summary["answered"], summary["lost"]) == (8, 0)
    assert second["summary"].claimed == 0, "no lease expired while the model worked"
    assert all(queue().get(qid)["attempts"] == 1 for qid in ids)


class StalledRenewals(Queue):
    """The queue as a run whose lease renewals stall (a starved thread, a slow database) sees it."""

    def renew(self, ids, owner):
        return set()


def test_a_run_whose_leases_lapse_never_takes_up_its_own_questions_twice(llm, capsys, monkeypatch, queue_url):
    """A lapsed lease made the run's own claim hand it back the questions it was answering: each was
    sent twice, and two copies landing in one batch were written once but counted twice (201 answered
    of 200). Another worker may take them over; the run itself never claims one it holds."""
    import asyncio

    from docsrag.tasks.answer.drain import Drain
    from docsrag.tasks.answer.retrieve import Retriever

    monkeypatch.setenv("DOCSRAG_QUEUE_URL", queue_url)
    monkeypatch.setenv("DOCSRAG_LEASE_S", "1")
    llm.latency_s = 3.0  # the leases lapse while the model works: the run polls the queue meanwhile
    ids = submit(4)
    settings = load_settings()
    queue_ = StalledRenewals.from_settings(settings)
    retriever = Retriever(settings, embedding.resolve(settings))
    summary = asyncio.run(Drain(settings, queue_, retriever, owner="lapsed", max_seconds=60).run())
    assert (summary.claimed, summary.answered, summary.lost) == (4, 4, 0), summary
    assert len(llm.requests) == 4, "one request per question"
    assert all(queue().get(qid)["status"] == "answered" for qid in ids)


def test_a_question_landing_twice_in_a_batch_is_counted_once(tmp_path):
    """Whatever put two copies of a question in flight, the writer stores one answer and counts one."""
    import asyncio

    from docsrag.tasks.answer.drain import Drain
    from docsrag.tasks.core.records import StoredAnswer

    settings = load_settings(queue_url=f"sqlite:///{tmp_path / 'q.db'}", llm_concurrency=2)
    q = Queue.from_settings(settings)
    qid, _ = q.submit("Where does Milvus store data?")
    [item] = q.claim(1, "w")

    async def write_twice():
        drain = Drain(settings, q, None, owner="w", max_seconds=1)
        drain.permits, drain.settled, drain.held = asyncio.Semaphore(0), asyncio.Queue(), {qid}
        for entry in [("answered", item, StoredAnswer("first [1].", "en")),
                      ("answered", item, StoredAnswer("second [1].", "en")), None]:
            drain.settled.put_nowait(entry)
        await drain._write()
        drain.db.shutdown()
        return drain.summary

    summary = asyncio.run(write_twice())
    assert (summary.answered, summary.lost) == (1, 1)
    assert q.get(qid)["answer"] == "first [1]."


def test_worker_killed_mid_drain_loses_only_its_in_flight_questions(llm, capsys, monkeypatch):
    monkeypatch.setenv("DOCSRAG_LEASE_S", "4")
    llm.latency_s = 0.25
    ids = submit(80)
    worker = subprocess.Popen([DOCSRAG, "answer"], cwd=ROOT, env=api_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while queue().counts()["answered"] < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert queue().counts()["answered"] >= 20, "the worker answered some"
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    held = [r["id"] for r in (queue().get(qid) for qid in ids) if r["status"] == "claimed"]
    answered_before = queue().counts()["answered"]
    assert held, "the kill caught questions in flight"
    assert len(held) <= 2 * 8, "at most the window and its buffer"
    llm.latency_s = 0
    time.sleep(4.5)  # their leases expire
    code, summary, err = answer(capsys)
    assert code == 0, err
    assert summary["answered"] == 80 - answered_before
    records = [queue().get(qid) for qid in ids]
    assert {r["status"] for r in records} == {"answered"}
    assert sorted(r["id"] for r in records if r["attempts"] == 2) == sorted(held), "only those in flight again"


def test_a_burst_of_questions_starts_one_answer_run_on_the_server(llm, tmp_path):
    """prefect.yaml's trigger, deployed as a user deploys it, on a real Prefect server."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    prefect = str(ROOT / ".venv" / "bin" / "prefect") if (ROOT / ".venv").is_dir() else "prefect"
    env = api_env()
    for command in (["work-pool", "create", "docsrag-gpu", "--type", "process", "--overwrite"],
                    ["--no-prompt", "deploy", "--name", "answer-questions"]):
        subprocess.run([prefect, *command], cwd=ROOT, env=env, check=True, capture_output=True, timeout=120)
    asks = [subprocess.Popen([DOCSRAG, "ask", f"{q}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for q in QUESTIONS[:3]]
    outputs = [ask.communicate(timeout=120) for ask in asks]
    assert all(ask.returncode == 0 for ask in asks), outputs
    assert not any("EventsWorker" in err for _, err in outputs), "no Prefect internals in the terminal"

    async def triggered_runs():
        async with get_client() as client:
            runs = await client.read_flow_runs(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=["answer-questions"])))
        return [r for r in runs if r.created_by and r.created_by.type == "AUTOMATION"]

    deadline = time.monotonic() + 60
    while not (runs := asyncio.run(triggered_runs())) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert runs, "the question's event started a run"
    time.sleep(3)
    runs = asyncio.run(triggered_runs())
    assert len(runs) == 1, "debounced: one run for the burst"
    assert runs[0].parameters == {"max_seconds": 240}


def test_ask_wait_without_a_server_answers_it_here(llm, capsys, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: None}):
        assert main(["ask", QUESTIONS[0], "--wait", "60", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["status"] == "answered" and shown["sources"][0]["doc_path"].startswith("en/faq/")
    assert len(llm.requests) == 1


def test_questions_stats_show_what_waits_and_how_fast_answers_come(llm, capsys):
    submit(5)
    queue().claim(2, "somebody")
    assert main(["questions", "--stats"]) == 0
    out = capsys.readouterr().out
    assert "pending 3  claimed 2  answered 0" in out and "oldest waiting: 0 s" in out
    assert main(["answer", "--json"]) == 0
    capsys.readouterr()
    assert main(["questions", "--stats", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["counts"]["answered"] == 3 and stats["answers_per_s"] == round(3 / 300, 3)


def test_queue_database_lost_mid_drain_stops_the_run(llm, capsys, monkeypatch, postgres_url):
    import sqlalchemy

    monkeypatch.setenv("DOCSRAG_QUEUE_URL", postgres_url)
    monkeypatch.setenv("DOCSRAG_LEASE_S", "3")
    ids = submit(60)
    llm.latency_s = 0.2
    name = postgres_url.rsplit("/", 1)[1]
    admin = sqlalchemy.create_engine(postgres_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
                                     + "/postgres", isolation_level="AUTOCOMMIT")

    def lose_database():
        with admin.connect() as db:
            db.exec_driver_sql(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            db.exec_driver_sql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")

    threading.Timer(1.5, lose_database).start()
    started = time.monotonic()
    code, _, err = answer(capsys)
    assert code == 1 and time.monotonic() - started < 60, "the run stops instead of waiting forever"
    assert "OperationalError" in err or "connection" in err.lower()
    with admin.connect() as db:
        db.exec_driver_sql(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
    admin.dispose()
    time.sleep(3.5)  # leases of what was in flight expire
    llm.latency_s = 0
    code, _, err = answer(capsys)
    assert code == 0, err
    assert {queue().get(qid)["status"] for qid in ids} == {"answered"}, "nothing lost"


# -- issue 23: poison questions, failed writes, an untrusted server, deadlines ------------------

def poisoned(*markers: str):
    """The emulator's fault function: a question containing a marker gets that marker's fault."""
    return lambda question: next((fault for marker, fault in markers if marker in question), None)


def test_a_poison_question_at_the_head_does_not_block_the_queue(llm, capsys, monkeypatch):
    """vLLM answers HTTP 500 at once for a prompt whose output it cannot parse (vllm#22403): that is
    the question's failure while the server answers the others, not an outage."""
    monkeypatch.setenv("DOCSRAG_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("DOCSRAG_RETRY_BACKOFF_S", "0")
    q = queue()
    poison, _ = q.submit("POISON: Where does Milvus store data?")
    ordinary = submit(40)
    llm.latency_s = 1.0  # every ordinary answer takes a second; the 500 comes at once
    llm.fault = poisoned(("POISON", "poison"))
    code, summary, err = answer(capsys)
    assert code == 0, err
    assert summary["answered"] == 40 and summary["dead"] == 1, "the 40 answered in the first run"
    assert {queue().get(i)["status"] for i in ordinary} == {"answered"}
    record = queue().get(poison)
    assert (record["status"], record["attempts"]) == ("dead", 3)
    assert "InternalServerError" in record["last_error"] and "Expected 2 output messages" in record["last_error"]


def test_a_question_that_always_times_out_ends_dead_instead_of_going_back_forever(llm, capsys, monkeypatch):
    monkeypatch.setenv("DOCSRAG_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("DOCSRAG_RETRY_BACKOFF_S", "0")
    monkeypatch.setenv("DOCSRAG_LLM_TIMEOUT_S", "0.5")
    monkeypatch.setenv("DOCSRAG_LLM_MAX_RETRIES", "0")
    stuck, _ = queue().submit("STUCK: Where does Milvus store data?")
    ordinary = submit(10)
    llm.hang_question_s = 3
    llm.fault = poisoned(("STUCK", "hang"))
    code, summary, err = answer(capsys)
    assert code == 0, err
    assert {queue().get(i)["status"] for i in ordinary} == {"answered"}
    record = queue().get(stuck)
    assert (record["status"], record["attempts"], record["put_backs"]) == ("dead", 2, 2)
    assert "Timeout" in record["last_error"] and "put-backs" in record["last_error"]


@pytest.mark.parametrize("fault", ["html", "empty"])
def test_a_server_that_does_not_speak_chat_completions_dead_letters_nothing(llm, capsys, monkeypatch, fault):
    """A wrong DOCSRAG_LLM_BASE_URL (a proxy's login page) or a broken server: every run fails saying so."""
    monkeypatch.setenv("DOCSRAG_MAX_ATTEMPTS", "2")
    ids = submit(5)
    llm.always = fault
    for _ in range(3):
        code, _, err = answer(capsys)
        assert code == 1 and "misconfigured" in err, err
    records = [queue().get(i) for i in ids]
    assert {(r["status"], r["attempts"]) for r in records} == {("pending", 0)}
    assert "no attempt spent" in records[0]["last_error"]
    llm.always = None
    assert answer(capsys)[1]["answered"] == 5


def test_a_citation_of_thousands_of_digits_is_dropped_not_fatal(llm, capsys):
    ids = submit(3)
    llm.fault = lambda question: "huge_citation"
    code, summary, err = answer(capsys)
    assert code == 0 and summary["answered"] == 3, err
    answer_text = queue().get(ids[0])["answer"]
    assert "[1]" in answer_text and "9999" not in answer_text


def test_nul_bytes_and_string_usage_from_the_server_lose_no_answer(llm, capsys, monkeypatch, postgres_url):
    """PostgreSQL refuses NUL in text: the transaction of answers that held one was lost, attempts
    spent; usage counts as strings raised after the commit and killed the run."""
    monkeypatch.setenv("DOCSRAG_QUEUE_URL", postgres_url)
    ids = submit(30)
    spoil = {ids[3]: "nul", ids[11]: "nul", ids[20]: "bad_usage", ids[25]: "nul"}
    by_question = {queue().get(qid)["question"]: fault for qid, fault in spoil.items()}
    llm.fault = by_question.get
    code, summary, err = answer(capsys)
    assert code == 0, err
    assert summary["answered"] == 30 and summary["failed"] == summary["dead"] == 0
    records = [queue().get(i) for i in ids]
    assert all(r["status"] == "answered" and r["attempts"] == 1 for r in records)
    assert "\x00" not in records[3]["answer"] and "\x00" not in (records[3]["reasoning"] or "")
    assert records[20]["usage"]["prompt_tokens"] > 0, "counts sent as strings are stored as numbers"


def test_a_huge_error_body_is_a_short_reason(llm, capsys, monkeypatch):
    monkeypatch.setenv("DOCSRAG_MAX_ATTEMPTS", "1")
    bad, _ = queue().submit("BIG: Where does Milvus store data?")
    ordinary = submit(3)
    llm.fault = poisoned(("BIG", "big_error"))
    code, _, err = answer(capsys)
    assert code == 0, err
    assert {queue().get(i)["status"] for i in ordinary} == {"answered"}
    record = queue().get(bad)
    assert record["status"] == "dead" and len(record["last_error"]) <= 2_000


def test_a_trickling_server_cannot_keep_the_run_past_its_deadline(llm, capsys, monkeypatch):
    """The client's timeout is per read: a byte every 50 ms kept a request, and the run, alive for minutes."""
    monkeypatch.setenv("DOCSRAG_LLM_DEADLINE_S", "2")
    ids = submit(4)
    llm.always = "trickle"
    started = time.monotonic()
    code, _, err = answer(capsys, "--max-seconds", "1")
    elapsed = time.monotonic() - started
    assert code == 1 and "RequestDeadline" in err, err
    assert elapsed < 1 + 2 + 10, f"max_seconds + grace + start-up, not {elapsed:.0f} s"
    assert {(queue().get(i)["status"], queue().get(i)["attempts"]) for i in ids} == {("pending", 0)}


def test_a_hung_milvus_fails_the_run_within_its_deadline(llm, capsys, monkeypatch, milvus):
    """SIGSTOP: the server keeps its connections and answers nothing, as a hung Milvus does."""
    monkeypatch.setenv("DOCSRAG_MILVUS_TIMEOUT_S", "2")
    ids = submit(40)
    llm.latency_s = 0.3
    stopped = threading.Event()

    def hang_once_generating():
        while not llm.requests:
            time.sleep(0.02)
        os.kill(milvus.process.pid, signal.SIGSTOP)
        stopped.set()

    hanger = threading.Thread(target=hang_once_generating, daemon=True)
    hanger.start()
    try:
        started = time.monotonic()
        code, _, err = answer(capsys)
        assert code == 1 and f"Milvus at {milvus.uri} failed while retrieving" in err, err
        assert time.monotonic() - started < 30
    finally:
        hanger.join()
        os.kill(milvus.process.pid, signal.SIGCONT)
    records = [queue().get(i) for i in ids]
    assert {r["status"] for r in records} <= {"answered", "pending"}
    assert all(r["attempts"] == (1 if r["status"] == "answered" else 0) for r in records)


def test_a_write_that_fails_still_puts_back_every_question_the_run_held(llm, capsys, monkeypatch, postgres_url):
    """The connection drops as a batch of answers is written (a PostgreSQL trigger ends its own
    backend once): that batch rolls back, and every question the run held goes back at once, no
    attempt spent, instead of waiting out its lease with an attempt spent."""
    import sqlalchemy

    monkeypatch.setenv("DOCSRAG_QUEUE_URL", postgres_url)
    ids = submit(30)
    marked, _ = queue().submit("DROP-CONN: Where does Milvus store data?")
    engine = sqlalchemy.create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as db:
        db.exec_driver_sql("CREATE SEQUENCE IF NOT EXISTS drop_once")
        db.exec_driver_sql("""CREATE OR REPLACE FUNCTION drop_conn() RETURNS trigger AS $$
            BEGIN IF left(NEW.question, 9) = 'DROP-CONN' AND nextval('drop_once') = 1 THEN
                PERFORM pg_terminate_backend(pg_backend_pid()); END IF; RETURN NEW; END $$ LANGUAGE plpgsql""")
        db.exec_driver_sql("CREATE TRIGGER drop_conn BEFORE UPDATE OF status ON docsrag_questions FOR EACH ROW "
                           "WHEN (NEW.status = 'answered') EXECUTE FUNCTION drop_conn()")
    engine.dispose()
    llm.latency_s = 0.2
    code, _, err = answer(capsys)
    assert code == 1 and "the question queue failed: AdminShutdown: terminating connection" in err, err
    assert "UPDATE" not in err and "[SQL" not in err, "one line, not the statement and its parameters"
    records = [queue().get(i) for i in [*ids, marked]]
    assert {r["status"] for r in records} <= {"answered", "pending"}, "nothing left claimed"
    assert all(r["attempts"] == (1 if r["status"] == "answered" else 0) for r in records)
    code, _, err = answer(capsys)
    assert code == 0, err
    assert {queue().get(i)["status"] for i in [*ids, marked]} == {"answered"}


def test_a_credentialed_server_url_reaches_no_error_state_or_stored_row(llm, capsys, monkeypatch):
    """The run's error (its state message, the failure notification) and last_error name the server
    without the user:password its URL carries."""
    monkeypatch.setenv("DOCSRAG_LLM_BASE_URL", llm.url.replace("http://", "http://bot:Pl4ntedLLMsecret@"))
    ids = submit(2)
    llm.always = "html"
    code, _, err = answer(capsys)
    assert code == 1 and "misconfigured" in err and "Pl4ntedLLMsecret" not in err, err
    assert all("Pl4ntedLLMsecret" not in (queue().get(i)["last_error"] or "") for i in ids)
