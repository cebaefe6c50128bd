"""A localized docs tree (the docs site's ko/, id/... folders zipped like the English release)
is served on its own aliases; --lang picks it, English stays the default."""

import zipfile
from pathlib import Path

import pytest

from docsrag.flows.cli import main
from docsrag.tasks.core.settings import load_settings
from docsrag.tasks.index import store
from docsrag.testing.llm_emulator import Emulator

from tests.conftest import FAQ, ingest_into
from tests.integration.ingest.test_ingest import cli_json


def korean_faq(releases: Path, target: Path) -> Path:
    """The FAQ release with its en/ tree moved to ko/ (the test's stand-in for translated pages)."""
    with zipfile.ZipFile(releases / FAQ) as src, zipfile.ZipFile(target, "w") as out:
        for info in src.infolist():
            name = "ko/" + info.filename.removeprefix("en/") if info.filename.startswith("en/") else info.filename
            if not info.is_dir():
                out.writestr(name, src.read(info))
    return target


@pytest.fixture(scope="module")
def localized_index(tmp_path_factory, prefect_server, releases) -> tuple[Path, dict, dict]:
    """The English and the Korean FAQ trees in one home, ingested once for the module."""
    folder = tmp_path_factory.mktemp("localized")
    english = ingest_into(folder / "home", releases / FAQ)
    korean = ingest_into(folder / "home", korean_faq(releases, folder / "milvus_docs_faq_2.4.x_ko.zip"))
    return folder / "home", english, korean


@pytest.fixture
def both_ingested(localized_index, monkeypatch) -> tuple[dict, dict]:
    home, english, korean = localized_index
    monkeypatch.setenv("DOCSRAG_HOME", str(home))
    return english, korean


def test_a_korean_tree_is_served_on_its_own_aliases(both_ingested):
    english, korean = both_ingested
    assert (korean["lang"], korean["alias"], korean["version_alias"]) == ("ko", "milvus_docs_ko",
                                                                         "milvus_docs_2_4_x_ko")
    assert korean["embedded"] == korean["chunks"] == english["chunks"], "its own chunks, not the English ones"
    client = store.connect(load_settings())
    assert store.served_collection(client, "milvus_docs_2_4_x_ko") == korean["collection"]
    assert store.served_collection(client, "milvus_docs") == english["collection"], "English is untouched"
    assert store.served_collection(client, "milvus_docs_2_4_x") == english["collection"]


def test_search_takes_english_by_default_and_the_localized_docs_with_lang(both_ingested, capsys):
    default = cli_json(capsys, "search", "Where does Milvus store data?")
    korean = cli_json(capsys, "search", "Where does Milvus store data?", "--lang", "ko")
    assert {r["doc_path"].split("/")[0] for r in default["results"]} == {"en"}
    assert {r["doc_path"].split("/")[0] for r in korean["results"]} == {"ko"}


def test_a_language_nobody_ingested_says_what_to_do(both_ingested, capsys):
    assert main(["search", "Where does Milvus store data?", "--lang", "id"]) == 1
    assert "no id docs are served yet: run `docsrag ingest` first" in capsys.readouterr().err


def test_a_question_asked_for_the_korean_docs_is_answered_from_them(both_ingested, capsys, monkeypatch):
    emulator = Emulator().start()
    monkeypatch.setenv("DOCSRAG_LLM_BASE_URL", emulator.url)
    try:
        asked = cli_json(capsys, "ask", "Where does Milvus store data?", "--lang", "ko")
        assert cli_json(capsys, "answer")["answered"] == 1
        shown = cli_json(capsys, "show", str(asked["id"]))
    finally:
        emulator.stop()
    assert shown["status"] == "answered" and shown["sources"]
    assert {s["doc_path"].split("/")[0] for s in shown["sources"]} == {"ko"}
