"""End to end on the embedded defaults: real Prefect API, real Milvus Lite, real model."""

import asyncio
import json
import zipfile

import pytest

from docsrag.flows.cli import main
from docsrag.tasks.core.settings import load_settings
from docsrag.tasks.index import store


def cli_json(capsys, *args: str):
    code = main([*args, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def faq_ingested(faq_index, faq_home) -> dict:
    return faq_index.summary


def test_faq_release_is_ingested_and_served(faq_ingested):
    summary = faq_ingested
    assert (summary["version"], summary["documents"], summary["alias"]) == ("2.4.x", 4, "milvus_docs")
    assert summary["sha256"] == "781537dc762b25210896bfeb7cd4f921c246f6624123ed19589c7885c0a6c4df"
    assert summary["embedded"] == summary["chunks"] > 40 and summary["skipped"] == []
    client = store.connect(load_settings())
    assert store.served_collection(client, "milvus_docs") == summary["collection"]
    assert store.served_collection(client, "milvus_docs_2_4_x") == summary["collection"]
    assert store.count(client, store.loaded(client, "milvus_docs")) == summary["chunks"]
    assert summary["search"].startswith("hybrid")


def test_search_finds_the_product_faq_first(faq_ingested, capsys):
    result = cli_json(capsys, "search", "How is data stored in milvus?")
    assert result["query"] == "How is data stored in milvus?"
    assert result["results"][0]["doc_path"] == "en/faq/product_faq.md"
    assert {"doc_path", "heading", "score", "text"} <= set(result["results"][0])


def test_search_file_answers_each_question(faq_ingested, capsys, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"id": "a", "question": "Where does Milvus store data?"}\n'
                         '{"id": "b", "question": "Is Docker the only way to install Milvus?"}\n')
    assert main(["search", "--file", str(questions), "-k", "3", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["id"] for line in lines] == ["a", "b"]
    assert lines[0]["results"][0]["doc_path"] == "en/faq/product_faq.md"
    assert lines[1]["results"][0]["doc_path"] == "en/faq/operational_faq.md"
    assert all(len(line["results"]) == 3 for line in lines)


def test_run_is_explained_by_artifacts(faq_ingested):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def latest(key):
        async with get_client() as client:
            found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                                sort=ArtifactSort.CREATED_DESC)
            return found[0]

    summary = asyncio.run(latest("milvus-docs-ingest-summary"))
    assert summary.type == "markdown" and faq_ingested["sha256"] in summary.data
    assert "Seconds per stage" in summary.data
    table = asyncio.run(latest("milvus-docs-ingest-documents"))
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {row["document"] for row in rows} == {f"en/faq/{n}.md" for n in
                                                   ("operational_faq", "performance_faq", "product_faq", "troubleshooting")}


def test_json_report_is_archived_in_the_object_store(faq_ingested, faq_home):
    home = faq_home
    reports = list((home / "objects" / "reports" / "2.4.x").glob("*.json"))
    assert len(reports) == 1
    assert json.loads(reports[0].read_text())["collection"] == faq_ingested["collection"]
    assert (home / "objects" / faq_ingested["archived"]).is_file()


def test_bad_release_fails_clearly_and_keeps_the_index(faq_ingested, tmp_path, capsys):
    corrupt = tmp_path / "milvus_docs_2.6.x_en.zip"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip")
    assert main(["ingest", "--release", str(corrupt)]) == 1
    assert "not a valid zip archive" in capsys.readouterr().err
    assert main(["ingest", "--release", str(tmp_path / "missing.zip")]) == 1
    assert "release file not found" in capsys.readouterr().err
    client = store.connect(load_settings())
    assert store.served_collection(client, "milvus_docs") == faq_ingested["collection"]
    assert cli_json(capsys, "search", "Where does Milvus store data?")["results"]


def test_search_before_any_ingest_says_what_to_do(home, capsys):
    assert main(["search", "anything"]) == 1
    assert "run `docsrag ingest` first" in capsys.readouterr().err


def test_hostile_release_is_refused_before_anything_changes(faq_ingested, tmp_path, capsys):
    hostile = tmp_path / "milvus_docs_2.4.x_en.zip"
    with zipfile.ZipFile(hostile, "w") as z:
        z.writestr("en/faq/ok.md", "# Ok\n")
        z.writestr("../../outside.md", "# Evil\n")
    assert main(["ingest", "--release", str(hostile)]) == 1
    assert "escapes the release folder" in capsys.readouterr().err
    assert not (tmp_path.parent / "outside.md").exists()
    assert store.served_collection(store.connect(load_settings()), "milvus_docs") == faq_ingested["collection"]


def test_dask_task_runner_gives_the_same_ids_and_vectors(tmp_path, prefect_server, releases, capsys, monkeypatch):
    """Embedding batches on an existing Dask cluster (local worker processes) build the same index."""
    from distributed import Client, LocalCluster

    from docsrag.tasks.embed import embedding

    monkeypatch.setenv("DOCSRAG_EMBEDDING_BATCH_SIZE", "8")  # several batches, spread over the workers
    built = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as dask:
        for runner in ("threads", f"dask={cluster.scheduler_address}"):
            monkeypatch.setenv("DOCSRAG_HOME", str(tmp_path / runner.split("=")[0]))
            extra = ["--task-runner", runner] if runner.startswith("dask") else []
            summary = cli_json(capsys, "ingest", "--release", str(releases / "milvus_docs_faq_2.4.x_en.zip"),
                               *extra)
            client = store.connect(load_settings())
            rows = client.query(store.loaded(client, summary["collection"]), filter="", output_fields=["dense"],
                                limit=1000)
            built[runner.split("=")[0]] = {row["id"]: row["dense"] for row in rows}
        # the model was loaded where the batches ran: in the Dask workers
        loaded = dask.run(lambda: embedding._cached_embedder.cache_info().currsize)
        assert sum(loaded.values()) >= 1, loaded
    assert built["dask"].keys() == built["threads"].keys() and len(built["dask"]) == summary["chunks"]
    drift = max(abs(a - b) for key, vector in built["dask"].items() for a, b in zip(vector, built["threads"][key]))
    assert drift < 1e-5  # the same model in other processes: equal up to float rounding


def test_versions_lists_what_is_served(faq_ingested, capsys):
    listed = cli_json(capsys, "versions")
    [corpus] = listed["corpora"]
    collection = faq_ingested["collection"]
    assert (corpus["lang"], corpus["alias"], corpus["serves"], corpus["serves_version"]) == \
        ("en", "milvus_docs", collection, "2.4.x")
    [version] = corpus["versions"]
    assert (version["version"], version["alias"], version["collection"], version["rows"]) == \
        ("2.4.x", "milvus_docs_2_4_x", collection, faq_ingested["chunks"])
    assert version["built_at"].startswith("20") and version["built_at"].endswith("+00:00")
    assert version["rollback_targets"] == [] and corpus["rollback_to"] is None
    assert main(["versions"]) == 0
    shown = capsys.readouterr().out
    assert "2.4.x" in shown and "milvus_docs_2_4_x" in shown and "nothing to roll back to" in shown


def test_an_unknown_version_is_refused_naming_what_is_served(faq_ingested, capsys):
    assert main(["search", "where is data stored", "--version", "2.4"]) == 1
    err = capsys.readouterr().err
    assert "served: 2.4.x" in err and "did you mean 2.4.x?" in err and len(err.splitlines()) == 1
    assert main(["ask", "where is data stored", "--version", "2.9.x"]) == 1
    assert "served: 2.4.x" in capsys.readouterr().err
    assert main(["questions", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [], "nothing was queued"


def test_human_search_names_the_version_links_and_shows_each_document_once(faq_ingested, capsys):
    assert main(["search", "Where does Milvus store data?", "-k", "4"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("docs 2.4.x") and "relevance" in lines[0], "which docs, and what the % means"
    ranked = [line for line in lines if line[:1].isdigit()]
    assert len(ranked) == 4 and all(line.endswith("%)") for line in ranked), ranked
    docs = [line.split(" — ")[0].split(". ", 1)[1] for line in ranked]
    assert len(set(docs)) == 4, f"a document twice: {docs}"
    assert "https://milvus.io/docs/v2.4.x/product_faq.md#" in out
    assert "milvus_docs_" not in out, "versions, never collection names"
    found = cli_json(capsys, "search", "Where does Milvus store data?", "-k", "4")
    assert found["results"][0]["url"].startswith("https://milvus.io/docs/v2.4.x/product_faq.md#")
