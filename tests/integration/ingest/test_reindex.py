"""Incremental re-indexing on the real releases: diff, reuse, resume, guard rails, rollback."""

import json
import os
import re
import signal
import subprocess
import zipfile
from pathlib import Path

import pytest

from docsrag.flows.cli import main
from docsrag.tasks.core.settings import load_settings
from docsrag.tasks.embed import embedding
from docsrag.tasks.index import schema as index
from docsrag.tasks.index import store, writer_lock
from docsrag.tasks.ingest import chunking, markdown

from tests.conftest import DOCSRAG, ROOT, api_env


def ingest(capsys, *args: str) -> dict:
    code = main(["ingest", *args, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def served_ids(alias="milvus_docs") -> set[str]:
    client = store.connect(load_settings())
    return set(store.doc_of_ids(client, store.loaded(client, alias)))


def fresh_build_ids(summary: dict) -> set[str]:
    """The ids a fresh build of that release holds: its own parse and chunking, nothing else."""
    settings = load_settings()
    parsed = markdown.parse_release(settings.home / "releases" / summary["sha256"])
    return {c.id for c in chunking.chunk_documents(parsed.documents, settings.chunking_config, embedding.resolve(settings).id)}






def test_full_release_then_unchanged_then_next_release(releases, tmp_path, prefect_server, capsys, monkeypatch,
                                                       gpu_embeddings):
    monkeypatch.setenv("DOCSRAG_HOME", str(tmp_path / "home"))
    summary = ingest(capsys, "--release", str(releases / "milvus_docs_2.4.x_en.zip"))
    with zipfile.ZipFile(releases / "milvus_docs_2.4.x_en.zip") as z:
        pages = [n for n in z.namelist() if n.endswith(".md") and "/fragments/" not in n]
    assert summary["documents"] == len(pages) == 209
    assert summary["embedded"] == summary["chunks"] == len(served_ids()) == len(fresh_build_ids(summary))
    assert gpu_embeddings.embedded == summary["chunks"] + 1, "every chunk, and the dimension probe"
    assert summary["skipped"] == []
    assert {w["path"] for w in summary["warnings"]} == {"en/adminGuide/upgrade_milvus_standalone-helm.md"}
    # Fragments are included where they are used, not indexed on their own.
    client = store.connect(load_settings())
    hits = client.query(store.loaded(client, "milvus_docs"), filter='doc_path == "en/faq/operational_faq.md"',
                        output_fields=["text"])
    assert any("SIMD" in h["text"] for h in hits)
    assert not client.query("milvus_docs", filter='doc_path like "en/fragments/%"', output_fields=["id"])

    # The same release again: nothing embedded, nothing written, the alias stays.
    again = ingest(capsys, "--release", str(releases / "milvus_docs_2.4.x_en.zip"))
    assert (again["unchanged"], again["embedded"], again["reused"]) == (True, 0, 0)
    assert again["collection"] == summary["collection"]
    assert index.builds_of(client, "milvus_docs") == [summary["collection"]]

    # The next release: only new ids are embedded; the result equals a fresh 2.5.x build.
    old_ids = served_ids()
    update = ingest(capsys, "--release", str(releases / "milvus_docs_2.5.x_en.zip"))
    new_ids = served_ids()
    assert new_ids == fresh_build_ids(update)
    assert update["chunks"] == len(new_ids) == store.count(client, store.loaded(client, "milvus_docs"))
    assert update["embedded"] == len(new_ids - old_ids)
    assert update["reused"] == len(new_ids & old_ids) > 0
    assert update["deleted"] == len(old_ids - new_ids)
    changes = update["document_changes"]
    assert changes["removed"] >= 45 - 15  # removed pages (fragments were never documents)
    assert changes["added"] >= 184 - 19 and changes["unchanged"] > 0
    assert not update["unchanged"]

    # Versions side by side: 2.4.x stays searchable under its own alias.
    assert store.served_collection(client, "milvus_docs_2_4_x") == summary["collection"]
    assert store.served_collection(client, "milvus_docs_2_5_x") == update["collection"]
    assert main(["search", "Where does Milvus store data?", "--version", "2.4.x", "--json"]) == 0
    assert {r["version"] for r in json.loads(capsys.readouterr().out)["results"]} == {"2.4.x"}
    assert main(["search", "Where does Milvus store data?", "--json"]) == 0
    assert {r["version"] for r in json.loads(capsys.readouterr().out)["results"]} == {"2.5.x"}

    # Re-ingesting the older version does not take the main alias back.
    older = ingest(capsys, "--release", str(releases / "milvus_docs_2.4.x_en.zip"))
    assert older["unchanged"] and store.served_collection(client, "milvus_docs") == update["collection"]


def faq_subset(releases: Path, target: Path, keep: set[str]) -> Path:
    with zipfile.ZipFile(releases / "milvus_docs_faq_2.4.x_en.zip") as src, zipfile.ZipFile(target, "w") as out:
        for info in src.infolist():
            if info.is_dir() or Path(info.filename).name in keep:
                out.writestr(info, src.read(info))
    return target


def test_guard_rail_refuses_losing_most_documents_then_force_and_rollback(home, prefect_server, releases,
                                                                         tmp_path, capsys):
    first = ingest(capsys, "--release", str(releases / "milvus_docs_faq_2.4.x_en.zip"))
    small = faq_subset(releases, tmp_path / "milvus_docs_2.4.x_en.zip", {"product_faq.md"})
    assert main(["ingest", "--release", str(small)]) == 1
    err = capsys.readouterr().err
    assert "keeps 1 of the 4 documents served now (3 lost, more than half)" in err and "--force" in err
    client = store.connect(load_settings())
    assert store.served_collection(client, "milvus_docs") == first["collection"]
    assert index.builds_of(client, "milvus_docs") == [first["collection"]], "nothing was built"

    forced = ingest(capsys, "--release", str(small), "--force")
    assert store.served_collection(client, "milvus_docs") == forced["collection"]
    assert forced["document_changes"]["removed"] == 3 and forced["embedded"] == 0

    assert main(["rollback", "--json"]) == 0
    moved = json.loads(capsys.readouterr().out)
    assert moved == {"alias": "milvus_docs", "from": forced["collection"], "to": first["collection"]}
    assert store.served_collection(client, "milvus_docs") == first["collection"]
    assert store.served_collection(client, "milvus_docs_2_4_x") == first["collection"], "the version alias too"
    assert len(served_ids()) == first["chunks"]


def test_rollback_of_a_new_version_removes_the_version_alias_that_publish_created(home, prefect_server, releases,
                                                                                 capsys):
    faq = str(releases / "milvus_docs_faq_2.4.x_en.zip")
    first = ingest(capsys, "--release", faq)
    newer = ingest(capsys, "--release", faq, "--version", "2.5.x")
    client = store.connect(load_settings())
    assert store.served_collection(client, "milvus_docs") == newer["collection"]

    assert main(["rollback"]) == 0
    assert store.served_collection(client, "milvus_docs") == first["collection"]
    assert store.served_collection(client, "milvus_docs_2_4_x") == first["collection"]
    assert store.served_collection(client, "milvus_docs_2_5_x") is None, "nothing serves the build rolled back from"
    assert client.has_collection(newer["collection"]), "kept: the build itself is not dropped"


def test_rollback_with_nothing_before_says_so(home, prefect_server, releases, capsys):
    ingest(capsys, "--release", str(releases / "milvus_docs_faq_2.4.x_en.zip"))
    assert main(["rollback"]) == 1
    assert "nothing to roll back to" in capsys.readouterr().err


def test_second_concurrent_ingest_exits_with_a_clear_message(home, prefect_server, releases):
    settings = load_settings()
    with writer_lock.file_lock(settings.home, settings.collection):
        result = subprocess.run([DOCSRAG, "ingest", "--release", str(releases / "milvus_docs_faq_2.4.x_en.zip")],
                                capture_output=True, text=True, env=api_env(), cwd=ROOT, timeout=300)
    assert result.returncode == 1
    assert re.search(r"another ingest or rollback of 'milvus_docs' is running on this host \(host \S+ pid \d+ "
                     r"since .* UTC\)", result.stderr)
    assert store.served_collection(store.connect(settings), "milvus_docs") is None


def test_killed_ingest_resumes_without_re_embedding_finished_batches(home, prefect_server, releases, capsys):
    env = api_env(DOCSRAG_EMBEDDING_BATCH_SIZE="4", DOCSRAG_EMBEDDING_CONCURRENCY="1")
    proc = subprocess.Popen([DOCSRAG, "ingest", "--verbose", "--release",
                             str(releases / "milvus_docs_faq_2.4.x_en.zip")],
                            stderr=subprocess.PIPE, env=env, cwd=ROOT, start_new_session=True)
    seen = b""
    while proc.poll() is None:
        seen += proc.stderr.read1(4096)
        # The progress bar is drawn on a terminal only: count the written batches in the run's log
        # (task states: --verbose).
        if len(re.findall(rb"Task run 'write-batch-\w+' - Finished in state Completed", seen)) >= 3:
            os.killpg(proc.pid, signal.SIGKILL)  # mid-embedding, no chance to clean up
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, seen.decode(errors="replace")[-2000:]

    client = store.connect(load_settings())
    staging = index.builds_of(client, "milvus_docs")
    assert len(staging) == 1 and store.served_collection(client, "milvus_docs") is None
    written = store.count(client, store.loaded(client, staging[0]))
    assert written >= 12

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DOCSRAG_EMBEDDING_BATCH_SIZE", "4")
        patch.setenv("DOCSRAG_EMBEDDING_CONCURRENCY", "1")
        resumed = ingest(capsys, "--release", str(releases / "milvus_docs_faq_2.4.x_en.zip"))
    assert resumed["collection"] == staging[0]
    assert resumed["embedded"] == resumed["chunks"] - written
    assert resumed["resumed"] == written, "the rows carried over are said (they were neither embedded nor reused)"
    assert store.count(client, staging[0]) == resumed["chunks"] == len(served_ids())
