"""The question's language: detected offline, Korean and Indonesian on the dev sets, English when unsure."""

import json

from docsrag.tasks.core.language import LANGUAGES, detect, name


def dev(eval_dir, file):
    return [json.loads(line) for line in (eval_dir / file).read_text(encoding="utf-8").splitlines() if line.strip()]


def test_korean_and_indonesian_dev_questions_are_detected(eval_dir):
    items = dev(eval_dir, "dev_ko_id.jsonl")
    assert {item["lang"] for item in items} == {"ko", "id"}
    assert [(item["id"], detect(item["question"])) for item in items] == [(item["id"], item["lang"]) for item in items]


def test_english_dev_questions_are_english(eval_dir):
    questions = [item["question"] for item in dev(eval_dir, "dev.jsonl")]
    questions += [item["english"] for item in dev(eval_dir, "dev_ko_id.jsonl")]
    assert [q for q in questions if detect(q) != "en"] == []


def test_english_terms_inside_a_korean_question_keep_it_korean():
    assert detect("pymilvus MilvusClient.search() 사용법") == "ko"
    assert detect("Milvus에서 HNSW index의 M 파라미터는?") == "ko"
    assert detect("BM25 지원?") == "ko"


def test_indonesian_is_not_read_as_malay():
    assert detect("Bagaimana cara membuat collection di Milvus?") == "id"


def test_short_or_ambiguous_text_counts_as_english():
    for text in ("", "   ", "ok", "Milvus", "milvus.yaml", "HNSW?"):
        assert detect(text) == "en", text


def test_every_detected_language_has_a_name_for_the_prompt():
    assert (name("ko"), name("id"), name("en")) == ("Korean", "Indonesian", "English")
    assert name("xx") == name(None) == "English"
    assert set(LANGUAGES) >= {"en", "ko", "id"}
