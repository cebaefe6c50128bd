"""Citations that link (issue 31): the published page of each source, deep-linked to its heading by
the docs site's own anchor rule; one document once in a result list, one heading once per answer."""

from __future__ import annotations

import pytest

from docsrag.tasks.core.links import anchor, page_url
from docsrag.tasks.core.records import Hit
from docsrag.tasks.core.settings import SettingsError, load_settings

MILVUS_IO = "https://milvus.io/docs/v{version}/{doc_id}"


@pytest.mark.parametrize("heading, expected", [
    # The site's own rule, as its blog posts show it: spaces to '-', punctuation dropped.
    ("What Makes GPT-oss Special and Why You Should Care?", "What-Makes-GPT-oss-Special-and-Why-You-Should-Care"),
    ("Product FAQ > Where does Milvus store data?", "Where-does-Milvus-store-data"),  # the last of a heading path
    ("How much does Milvus cost?", "How-much-does-Milvus-cost"),
    ("Can I use Milvus 2.x with MinIO (S3), or not?", "Can-I-use-Milvus-2x-with-MinIO-S3-or-not"),
    ("Milvus에서 데이터는 어떻게 저장되나요?", "Milvus에서-데이터는-어떻게-저장되나요"),  # letters of any script stay
])
def test_an_anchor_follows_the_sites_rule(heading, expected):
    assert anchor(heading) == expected


def test_a_source_links_to_its_page_and_heading():
    url = page_url(MILVUS_IO, "2.4.x", "en/faq/product_faq.md", "Product FAQ > Where does Milvus store data?",
                   title="Product FAQ")
    assert url == "https://milvus.io/docs/v2.4.x/product_faq.md#Where-does-Milvus-store-data"
    # A chunk of the page's top (no heading below the title) links to the page itself.
    assert page_url(MILVUS_IO, "2.4.x", "en/faq/product_faq.md", "Product FAQ", title="Product FAQ") == \
        "https://milvus.io/docs/v2.4.x/product_faq.md"
    assert page_url("https://docs.example.com/{version}/{doc_path}", "2.5.x", "en/a b/c.md", "T > x y",
                    title="T") == "https://docs.example.com/2.5.x/en/a%20b/c.md#x-y"
    assert page_url("", "2.4.x", "en/faq/product_faq.md", "Product FAQ > Where?", title="Product FAQ") == ""


def test_the_docs_url_setting_is_checked(monkeypatch):
    assert load_settings().docs_url == MILVUS_IO, "the shipped docs (milvus.io) link by default"
    monkeypatch.setenv("DOCSRAG_DOCS_URL", "")
    assert load_settings().docs_url == "", "empty: no links"
    for wrong in ("milvus.io/docs/{version}/{doc_id}", "javascript:alert(1)//{doc_id}",
                  "https://milvus.io/docs/{release}/{doc_id}"):
        monkeypatch.setenv("DOCSRAG_DOCS_URL", wrong)
        with pytest.raises(SettingsError, match="DOCSRAG_DOCS_URL"):
            load_settings()


def _hit(doc: str, heading: str, score: float, text: str = "t") -> Hit:
    return Hit(f"{doc}#{heading}#{score}", doc, "Title", heading, "2.4.x", text, score, score)


def test_a_result_list_holds_each_document_once():
    from docsrag.tasks.answer.retrieve import one_per_document

    hits = [_hit("a.md", "A > x", 0.9), _hit("a.md", "A > y", 0.8), _hit("b.md", "B", 0.7), _hit("c.md", "C", 0.6)]
    assert [h.doc_path for h in one_per_document(hits, 2)] == ["a.md", "b.md"]
    assert one_per_document(hits, 5)[0].heading == "A > x", "the document's best chunk stands for it"


def test_an_answers_citations_hold_each_heading_once():
    from docsrag.tasks.answer.generate import numbered_sources

    hits = [_hit("a.md", "A > x", 0.9, "one"), _hit("b.md", "B", 0.8), _hit("a.md", "A > x", 0.7, "two"),
            _hit("a.md", "A > y", 0.6)]
    sources = numbered_sources(hits)
    assert [(s.n, s.doc_path, s.heading) for s in sources] == [(1, "a.md", "A > x"), (2, "b.md", "B"),
                                                                (3, "a.md", "A > y")]
    assert sources[0].text == "one\n\ntwo", "the heading's chunks are merged, none lost to the model"
