"""The question queue, on SQLite and on the machine's PostgreSQL."""

import threading
import time

import pytest

from docsrag.tasks.queue.questions import QuestionError, Queue


def make(url, **options) -> Queue:
    return Queue(url, **{"lease_s": 60, "backoff_s": 0, **options})


def test_lifecycle_keeps_the_full_record(queue_url):
    queue = make(queue_url)
    qid, created = queue.submit("  Where does Milvus store data?  ", version="2.4.x")
    assert created and queue.get(qid)["status"] == "pending"
    [claimed] = queue.claim(10, "w1")
    assert (claimed.id, claimed.question, claimed.version, claimed.attempts) == (qid, "Where does Milvus store data?", "2.4.x", 1)
    assert queue.answer(qid, "w1", answer="In object storage [1].", reasoning="thinking", model="m",
                        reasoning_effort="low", sources=[{"n": 1, "doc_path": "en/a.md", "heading": "A", "score": 0.5}],
                        usage={"total_tokens": 10}, latency_ms=12)
    record = queue.get(qid)
    assert record["status"] == "answered" and record["answer"] == "In object storage [1]."
    assert record["reasoning"] == "thinking" and record["sources"][0]["doc_path"] == "en/a.md"
    assert record["usage"] == {"total_tokens": 10} and record["latency_ms"] == 12
    assert record["created_at"] <= record["answered_at"]
    assert queue.claim(10, "w2") == []


def test_submit_is_idempotent_with_a_client_key(queue_url):
    queue = make(queue_url)
    first = queue.submit("q?", client_key="req-1")
    assert queue.submit("q?", client_key="req-1") == (first[0], False)
    assert queue.submit("q?")[0] != first[0]
    assert queue.counts()["pending"] == 2


def test_oversized_and_empty_questions_are_refused(queue_url):
    queue = make(queue_url, max_chars=100)
    with pytest.raises(QuestionError, match="101 characters, over the limit of 100 .DOCSRAG_MAX_QUESTION_CHARS"):
        queue.submit("x" * 101)
    with pytest.raises(QuestionError, match="empty"):
        queue.submit("   ")
    assert sum(queue.counts().values()) == 0


def test_concurrent_workers_never_claim_the_same_question(queue_url):
    make(queue_url)  # schema
    for i in range(60):
        make(queue_url).submit(f"question {i}")
    claimed: dict[str, list[int]] = {}

    def worker(name):
        queue, mine = make(queue_url), []
        while batch := queue.claim(4, name):
            mine += [c.id for c in batch]
        claimed[name] = mine

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [qid for ids in claimed.values() for qid in ids]
    assert len(every) == len(set(every)) == 60


def test_expired_lease_is_claimed_again_and_answered_once(queue_url):
    queue = make(queue_url, lease_s=0.5)
    qid, _ = queue.submit("q?")
    assert queue.claim(1, "dead-worker")[0].id == qid
    assert queue.claim(1, "other") == [], "a live lease is respected"
    time.sleep(0.7)
    [again] = queue.claim(1, "other")
    assert again.attempts == 2
    assert queue.answer(qid, "other", answer="second")
    assert not queue.answer(qid, "dead-worker", answer="late"), "a worker that lost its lease cannot overwrite"
    assert queue.get(qid)["answer"] == "second"


def test_failures_back_off_then_dead_letter_with_the_error(queue_url):
    queue = make(queue_url, max_attempts=2, backoff_s=0.3)
    qid, _ = queue.submit("q?")
    queue.claim(1, "w")
    assert queue.fail(qid, "w", "RuntimeError: boom 1") == "failed"
    assert queue.claim(1, "w") == [], "not retried before its backoff"
    time.sleep(0.4)
    assert queue.claim(1, "w")[0].attempts == 2
    assert queue.fail(qid, "w", "RuntimeError: boom 2") == "dead"
    record = queue.get(qid)
    assert (record["status"], record["attempts"], record["last_error"]) == ("dead", 2, "RuntimeError: boom 2")
    time.sleep(0.7)
    assert queue.claim(1, "w") == []


def age(queue: Queue, question_id: int, seconds: float) -> None:
    """As if the question had been submitted ``seconds`` earlier."""
    from docsrag.tasks.queue.questions import questions

    with queue.engine.begin() as db:
        db.execute(questions.update().where(questions.c.id == question_id).values(
            claim_rank=questions.c.claim_rank - seconds))


def test_oldest_first_and_a_priority_gets_a_bounded_head_start(queue_url):
    queue = make(queue_url)
    waited_long, _ = queue.submit("asked ten minutes ago")
    age(queue, waited_long, 600)
    recent = [queue.submit(f"recent {i}")[0] for i in range(3)]
    urgent, _ = queue.submit("urgent", priority=1)  # five minutes ahead: before the recent ones only
    assert [c.id for c in queue.claim(10, "w")] == [waited_long, urgent, *recent]
    with pytest.raises(QuestionError, match="priority must be between -10 and 10"):
        queue.submit("too eager", priority=11)


def test_released_questions_get_their_attempt_back_and_keep_the_reason(queue_url):
    queue = make(queue_url)
    ids = [queue.submit(f"q{i}")[0] for i in range(3)]
    assert [c.attempts for c in queue.claim(3, "w")] == [1, 1, 1]
    assert queue.release(ids[:2], "w", "the LLM server at http://x failed: APIConnectionError") == 2
    assert queue.release(ids[:2], "other", "not mine") == 0
    record = queue.get(ids[0])
    assert (record["status"], record["attempts"]) == ("pending", 0)
    assert "APIConnectionError" in record["last_error"]
    assert [c.id for c in queue.claim(3, "w2")] == ids[:2]


def test_a_renewed_lease_is_not_taken_over(queue_url):
    queue = make(queue_url, lease_s=0.5)
    qid, _ = queue.submit("q?")
    queue.claim(1, "w")
    for _ in range(3):
        time.sleep(0.3)
        assert queue.renew([qid], "w") == {qid}
    assert queue.claim(1, "other") == []
    assert queue.renew([qid], "other") == set()
    assert queue.answer(qid, "w", answer="kept")


def test_a_question_whose_workers_all_died_ends_dead_with_the_reason(queue_url):
    queue = make(queue_url, lease_s=0.2, max_attempts=2)
    qid, _ = queue.submit("kills its worker")
    queue.claim(1, "w1")
    time.sleep(0.3)
    [again] = queue.claim(1, "w2")
    assert again.attempts == 2 and "lease expired" in queue.get(qid)["last_error"]
    time.sleep(0.3)
    assert queue.claim(1, "w3") == []
    record = queue.get(qid)
    assert (record["status"], record["attempts"]) == ("dead", 2)
    assert "lease expired) on all 2 attempts" in record["last_error"]


def test_stats_count_waiting_age_and_recent_answers(queue_url):
    queue = make(queue_url)
    ids = [queue.submit(f"q{i}")[0] for i in range(4)]
    for c in queue.claim(2, "w"):
        queue.answer(c.id, "w", answer="a")
    time.sleep(0.2)
    stats = queue.stats(window_s=60)
    assert stats.counts["answered"] == 2 and stats.counts["pending"] == 2
    assert stats.oldest_waiting_s >= 0.2 and stats.answers_per_s == round(2 / 60, 3)
    assert len(ids) == 4


def test_the_question_language_is_detected_at_submit(queue_url):
    queue = make(queue_url)
    korean, _ = queue.submit("Milvus에서는 데이터가 어떻게 저장되나요?")
    english, _ = queue.submit("Where does Milvus store data?")
    assert (queue.get(korean)["lang"], queue.get(english)["lang"]) == ("ko", "en")
    assert [c.lang for c in queue.claim(10, "w")] == ["ko", "en"]


def test_a_language_given_at_submit_is_kept(queue_url):
    queue = make(queue_url)
    qid, _ = queue.submit("Where does Milvus store data?", lang="id")
    assert queue.get(qid)["lang"] == "id"
    with pytest.raises(QuestionError, match="ISO 639-1 code like 'ko', not 'Korean'"):
        queue.submit("q?", lang="Korean")


def test_a_queue_from_before_languages_gets_the_column_on_open(queue_url):
    queue = make(queue_url)
    qid, _ = queue.submit("Where does Milvus store data?")
    with queue.engine.begin() as db:
        db.exec_driver_sql("ALTER TABLE docsrag_questions DROP COLUMN lang")  # as the previous release created it
        db.exec_driver_sql("DROP TABLE docsrag_schema")  # which recorded no migrations
    reopened = make(queue_url)
    [claimed] = reopened.claim(1, "w")
    assert (claimed.id, claimed.lang) == (qid, None), "an old question has no language until it is answered"
    assert reopened.get(qid)["lang"] is None


def test_a_client_key_belongs_to_its_owner(queue_url):
    queue = make(queue_url)
    first, _ = queue.submit("q?", client_key="req-1", owner="t-a")
    assert queue.submit("other?", client_key="req-1", owner="t-b")[0] != first, "another owner's key is its own"
    assert queue.submit("q?", client_key="req-1", owner="t-a") == (first, False)
    assert queue.submit("q?", client_key="req-1") != (first, False), "the machine's own key ('') too"


def test_a_client_key_is_bounded_alike_on_sqlite_and_postgresql(queue_url):
    queue = make(queue_url)
    with pytest.raises(QuestionError, match="client key must be 1 to 200 characters, not 201"):
        queue.submit("q?", client_key="k" * 201)
    assert queue.submit("q?", client_key="k" * 200)[1]


def test_timestamps_come_back_utc_aware(queue_url):
    queue = make(queue_url)
    qid, _ = queue.submit("q?")
    record = queue.get(qid)
    assert record["created_at"].endswith("+00:00") and record["available_at"].endswith("+00:00"), record


def test_a_queue_with_a_global_client_key_is_migrated_to_one_per_owner(queue_url):
    """A queue as schema 2 made it (``UNIQUE (client_key)``, no owner) keeps its rows and keys."""
    from sqlalchemy import MetaData, Table, create_engine

    from docsrag.tasks.queue.schema import questions, schema

    old = MetaData()
    columns = [column._copy() for column in questions.columns if column.name != "owner"]
    next(c for c in columns if c.name == "client_key").unique = True
    table = Table(questions.name, old, *columns)
    Table(schema.name, old, *[column._copy() for column in schema.columns])
    engine = create_engine(queue_url.replace("postgresql://", "postgresql+psycopg://"))
    old.create_all(engine)
    with engine.begin() as db:
        db.execute(table.insert().values(question="asked before", client_key="req-1"))
        db.execute(old.tables[schema.name].insert().values(version=2))
    engine.dispose()
    queue = make(queue_url)
    [row] = queue.list()
    assert (row["question"], row["owner"], row["client_key"]) == ("asked before", "", "req-1")
    assert queue.submit("q?", client_key="req-1") == (row["id"], False), "its key still names it"
    assert queue.submit("q?", client_key="req-1", owner="t-b")[1], "another owner may use the same key"


def test_feedback_from_before_owners_keeps_one_vote_per_question(queue_url):
    """Feedback as schema 3 kept it (no owner, every vote a row of its own) is migrated under the
    queue's lock: each question keeps its latest vote, as its asker's, and a later vote replaces it."""
    from sqlalchemy import MetaData, Table

    from docsrag.tasks.queue.api_tables import feedback, open_tables
    from docsrag.tasks.queue.feedback import Feedback, FeedbackTotals
    from docsrag.tasks.queue.schema import schema

    queue = make(queue_url)
    asked, _ = queue.submit("q?", owner="t-a")
    other, _ = queue.submit("other?", owner="t-b")
    old = Table(feedback.name, MetaData(), *[c._copy() for c in feedback.columns if c.name != "owner"])
    with queue.engine.begin() as db:
        old.create(db)
        for question_id, helpful in ((asked, True), (asked, False), (asked, False), (other, True)):
            db.execute(old.insert().values(question_id=question_id, helpful=helpful))
        db.execute(schema.delete().where(schema.c.version > 3))  # as schema 3 left the queue
    reopened = make(queue_url)
    open_tables(reopened.engine)
    votes = Feedback(reopened.engine)
    assert votes.totals() == FeedbackTotals(helpful=1, not_helpful=1), "asked: its last vote; other: its one"
    votes.add(asked, True, owner="t-a")
    assert votes.totals() == FeedbackTotals(helpful=2, not_helpful=0), "the asker's vote, replaced"
    assert Feedback(make(queue_url).engine).totals() == FeedbackTotals(2, 0), "opened again: migrated once"


def test_a_queue_from_schema_4_gets_the_untranslated_column(queue_url):
    from docsrag.tasks.answer.generate import NO_TRANSLATION
    from docsrag.tasks.core.records import StoredAnswer

    queue = make(queue_url)
    qid, _ = queue.submit("Di mana Milvus menyimpan data?")
    with queue.engine.begin() as db:  # as schema 4 left it
        db.exec_driver_sql("ALTER TABLE docsrag_questions DROP COLUMN untranslated")
        db.exec_driver_sql("DELETE FROM docsrag_schema WHERE version > 4")
    reopened = make(queue_url)
    assert reopened.get(qid)["untranslated"] is None and reopened.claim(1, "w")
    assert reopened.answer(qid, "w", **StoredAnswer("Dokumentasi...", "id", untranslated=NO_TRANSLATION).row())
    assert reopened.get(qid)["untranslated"] == NO_TRANSLATION
