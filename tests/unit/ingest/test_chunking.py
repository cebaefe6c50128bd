"""Chunk ids: stable across runs and releases, sensitive to what was embedded and how."""

from docsrag.tasks.ingest.chunking import chunk_document
from docsrag.tasks.ingest.markdown import parse_document

CONFIG = {"max_characters": 400, "new_after_n_chars": 300, "combine_text_under_n_chars": 0}
DOC = "---\ntitle: Product FAQ\n---\n# Product FAQ\n\n## Where does Milvus store data?\n\nIn object storage.\n\n" \
      "## How fast is it?\n\nFast.\n"


def chunks(text=DOC, path="en/faq/product_faq.md", config=CONFIG, embedder="local:m"):
    return chunk_document(parse_document(path, text), config, embedder)


def test_chunks_carry_doc_path_title_and_heading_path():
    first = chunks()[0]
    assert first.doc_path == "en/faq/product_faq.md" and first.title == "Product FAQ"
    assert any(c.heading == "Product FAQ > Where does Milvus store data?" for c in chunks())


def test_ids_are_stable_across_runs():
    assert [c.id for c in chunks()] == [c.id for c in chunks()]


def test_unchanged_section_keeps_its_id_when_another_changes():
    before = {c.heading: c.id for c in chunks()}
    after = {c.heading: c.id for c in chunks(DOC.replace("Fast.", "Very fast."))}
    assert before["Product FAQ > Where does Milvus store data?"] == after["Product FAQ > Where does Milvus store data?"]
    assert before["Product FAQ > How fast is it?"] != after["Product FAQ > How fast is it?"]


def test_ids_change_with_doc_path_chunking_and_embedder():
    base = {c.id for c in chunks()}
    assert base.isdisjoint(c.id for c in chunks(path="en/faq/other.md"))
    assert base.isdisjoint(c.id for c in chunks(config={**CONFIG, "max_characters": 401}))
    assert base.isdisjoint(c.id for c in chunks(embedder="openai:other"))


def test_identical_sections_get_distinct_ids():
    doc = "# T\n\n" + "".join("## Same\n\n" + "x " * 200 + "\n\n" for _ in range(2))
    ids = [c.id for c in chunks(doc)]
    assert len(ids) == len(set(ids))


def test_long_sections_are_split_under_the_limit():
    long = "# T\n\n" + "\n\n".join("word " * 60 for _ in range(10))
    pieces = chunks(long)
    assert len(pieces) > 1 and all(len(c.text) <= CONFIG["max_characters"] for c in pieces)


def test_embedded_text_names_the_section():
    assert chunks()[1].embed_text.startswith("Product FAQ > Where does Milvus store data?\n\n")


def test_bm25_text_adds_the_words_of_the_doc_path():
    chunk = chunks(path="en/getstarted/offline/install_offline-helm.md")[1]
    assert chunk.search_text == "en getstarted offline install offline helm\n" + chunk.embed_text
