"""The queue's contract under concurrency and bad data (issue 23, cases 2 and 5), on SQLite and
on the machine's PostgreSQL: workers starting together, a product inserting rows itself, a
failure racing a takeover, rows the database refuses."""

import threading
import time

import pytest
from sqlalchemy import create_engine, event, text

from docsrag.tasks.queue.questions import QuestionError, Queue, metadata


def _engine_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://")


def make(url, **options) -> Queue:
    return Queue(url, **{"lease_s": 60, "backoff_s": 0, **options})


def open_together(url: str, workers: int = 8) -> list[BaseException]:
    """``workers`` threads open the queue at the same instant; -> what they raised."""
    barrier, errors = threading.Barrier(workers), []

    def start():
        barrier.wait()
        try:
            make(url)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_workers_starting_together_on_a_fresh_database_create_the_queue_once(queue_url):
    assert open_together(queue_url) == []
    queue = make(queue_url)
    qid, _ = queue.submit("q?")
    assert [c.id for c in queue.claim(5, "w")] == [qid]


def test_workers_starting_together_on_an_old_database_migrate_it_once(queue_url):
    queue = make(queue_url)
    qid, _ = queue.submit("Where does Milvus store data?")
    with queue.engine.begin() as db:  # the table as the first release created it: no lang, no schema record
        db.exec_driver_sql("ALTER TABLE docsrag_questions DROP COLUMN lang")
        db.exec_driver_sql("DROP TABLE docsrag_schema")
    queue.engine.dispose()
    assert open_together(queue_url) == []
    [claimed] = make(queue_url).claim(5, "w")
    assert (claimed.id, claimed.lang) == (qid, None)


def test_a_product_queues_a_question_with_a_plain_insert(queue_url):
    """The INSERT the README documents: only the question (and what the product knows)."""
    queue = make(queue_url)
    waiting, _ = queue.submit("asked before the product's row")
    with queue.engine.begin() as db:
        db.execute(text("INSERT INTO docsrag_questions (question, version) VALUES ('From the product?', '2.4.x')"))
    later, _ = queue.submit("asked after it")
    claimed = queue.claim(10, "w")
    assert [c.question for c in claimed] == ["asked before the product's row", "From the product?", "asked after it"]
    assert claimed[1].version == "2.4.x" and claimed[1].attempts == 1, "it waits its turn, no more, no less"
    assert waiting < later


def test_a_row_left_at_rank_zero_by_an_earlier_release_does_not_jump_the_queue(queue_url):
    queue = make(queue_url)
    ids = [queue.submit(f"q{i}")[0] for i in range(3)]
    with queue.engine.begin() as db:
        db.exec_driver_sql(f"UPDATE docsrag_questions SET claim_rank = 0 WHERE id = {ids[2]}")
        db.exec_driver_sql("DROP TABLE docsrag_schema")  # as before migrations were recorded
    assert [c.id for c in make(queue_url).claim(3, "w")] == ids


@pytest.fixture
def postgres_queue_url(postgres_url):
    metadata.drop_all(create_engine(_engine_url(postgres_url)))
    return postgres_url


def test_a_failure_is_not_written_over_a_lease_another_worker_took(postgres_queue_url):
    """The failing worker's lease expires just as it records the failure; another worker claims the
    question in between its read and its write (injected at that statement)."""
    late = make(postgres_queue_url, lease_s=0.3)
    other = make(postgres_queue_url)
    qid, _ = late.submit("q?")
    late.claim(1, "late")
    time.sleep(0.4)
    taken: list = []

    def other_claims_first(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("UPDATE") and "last_error" in statement and not taken:
            taken.append(other.claim(1, "other"))

    event.listen(late.engine, "before_cursor_execute", other_claims_first)
    outcome = late.fail(qid, "late", "RuntimeError: too late")
    record = late.get(qid)
    if taken[0]:  # the other worker holds it: the late failure must not touch it
        assert (outcome, record["status"], record["lease_owner"]) == (None, "claimed", "other")
    else:
        assert (outcome, record["status"]) == ("failed", "failed")


def test_a_claim_takes_no_more_than_it_asked_for_under_concurrency(postgres_queue_url):
    """The planner may run a LIMIT ... SKIP LOCKED subquery more than once (a nested loop rescans it):
    each rescan skips what others locked meanwhile and picks new rows. Forced here by the planner
    settings that make it likely; a materialized CTE is evaluated once whatever the plan."""
    queue = make(postgres_queue_url)
    for i in range(400):
        queue.submit(f"question {i}")

    def nested_loops(dbapi_connection, _):
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET enable_hashjoin = off; SET enable_mergejoin = off; SET enable_material = off; "
                           "SET enable_seqscan = off")
        dbapi_connection.commit()

    too_many: list[int] = []

    def worker(name):
        mine = make(postgres_queue_url)
        event.listen(mine.engine, "connect", nested_loops)
        mine.engine.dispose()
        while batch := mine.claim(3, name):
            if len(batch) > 3:
                too_many.append(len(batch))

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert too_many == []
    assert queue.counts()["claimed"] == 400


def test_an_answer_carrying_nul_bytes_is_stored_clean(queue_url):
    """PostgreSQL refuses NUL in text: the whole transaction of answers failed with it."""
    queue = make(queue_url)
    ids = [queue.submit(f"q{i}")[0] for i in range(2)]
    queue.claim(2, "w")
    outcome = queue.settle("w", answers={ids[0]: {"answer": "In object storage\x00 [1].", "reasoning": "think\x00ing"},
                                         ids[1]: {"answer": "fine"}})
    assert outcome == {ids[0]: "answered", ids[1]: "answered"}
    assert (queue.get(ids[0])["answer"], queue.get(ids[0])["reasoning"]) == ("In object storage [1].", "thinking")


def test_what_the_server_sent_is_stored_cleaned_and_typed(queue_url):
    from docsrag.tasks.core.records import StoredAnswer, Usage

    queue = make(queue_url)
    qid, _ = queue.submit("q?")
    queue.claim(1, "w")
    outcome = queue.settle("w", answers={qid: StoredAnswer(
        "In object storage\x00 [1].\x1b[2J", "en", reasoning="think\x00ing", model="m\x00",
        usage=Usage.coerced({"prompt_tokens": "12", "completion_tokens": "many", "total_tokens": 3.5}))})
    assert outcome == {qid: "answered"}
    record = queue.get(qid)
    assert (record["answer"], record["reasoning"], record["model"]) == ("In object storage [1].[2J", "thinking", "m")
    assert record["usage"] == {"prompt_tokens": 12, "completion_tokens": 0, "total_tokens": 0, "reasoning_tokens": 0}


def test_a_question_is_stored_as_asked_less_what_the_database_cannot_store(queue_url):
    """A person's question keeps its control characters (the terminal shows them escaped); only NUL
    and a lone surrogate, which PostgreSQL cannot store, go. A question of only NUL is empty."""
    queue = make(queue_url)
    qid, _ = queue.submit("What is \x1b[2Jthis\x00?\x9b \ud800\t")
    assert queue.get(qid)["question"] == "What is \x1b[2Jthis?\x9b \ufffd"
    assert [c.question for c in queue.claim(1, "w")] == ["What is \x1b[2Jthis?\x9b \ufffd"]
    with pytest.raises(QuestionError, match="empty"):
        queue.submit(" \x00 ")


def test_a_failure_reason_is_stored_clean_and_bounded(queue_url):
    queue = make(queue_url)
    qid, _ = queue.submit("q?")
    queue.claim(1, "w")
    assert queue.fail(qid, "w", "InternalServerError: \x00" + "<html>" * 20_000) == "failed"
    error = queue.get(qid)["last_error"]
    assert "\x00" not in error and error.startswith("InternalServerError: <html>") and len(error) <= 2_000


def test_a_row_the_database_refuses_fails_only_its_question(queue_url):
    queue = make(queue_url)
    ids = [queue.submit(f"q{i}")[0] for i in range(3)]
    queue.claim(3, "w")
    bad = {"answer": "ok", "sources": [{"unserializable": {1, 2}}]}
    outcome = queue.settle("w", answers={ids[0]: {"answer": "first"}, ids[1]: bad, ids[2]: {"answer": "third"}})
    assert outcome == {ids[0]: "answered", ids[1]: "failed", ids[2]: "answered"}
    assert [queue.get(i)["answer"] for i in (ids[0], ids[2])] == ["first", "third"]
    record = queue.get(ids[1])
    assert record["status"] == "failed" and record["last_error"].startswith("the answer could not be stored: ")
    assert "SELECT" not in record["last_error"] and "UPDATE" not in record["last_error"], "no SQL in the reason"
