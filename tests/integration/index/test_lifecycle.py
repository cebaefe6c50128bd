"""The index lifecycle as an operator runs it: versions side by side, a rollback after garbage
collection, a crash between two alias moves, two ingests at once (one host, two hosts), a
resumed build whose inputs changed, and Milvus's dangling aliases. Small cuts of the real
2.4.x/2.5.x releases, embedded by the emulator's embeddings server."""

from __future__ import annotations

import fcntl
import json
import re
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from pymilvus import MilvusClient

from docsrag.flows.cli import main
from docsrag.tasks.core.settings import load_settings
from docsrag.tasks.embed import embedding
from docsrag.tasks.index import build, store
from docsrag.tasks.ingest import chunking, markdown
from docsrag.testing.milvus_server import MilvusServer

from tests.conftest import DOCSRAG, ROOT, api_env
from tests.integration.ingest.test_hostile import Server, send

# Pages of 2.5.x; the first two are in 2.4.x too (unchanged between them).
SHARED = ["adminGuide/chunk_cache.md", "adminGuide/configure_access_logs.md"]
ONLY_25 = ["adminGuide/clouds/aws/s3.md", "adminGuide/config_jaeger_tracing.md", "adminGuide/connect_kafka_ssl.md",
           "adminGuide/clouds/aws/aws_layer7.md", "adminGuide/configure-querynode-localdisk.md"]
ONLY_24 = ["migrate/m2m.md", "migrate/f2m.md", "reference/boolean.md"]
INFRA = ROOT / "infra"


def cut(source: Path, pages: list[str], target: Path, edited: str | None = None) -> Path:
    """A release zip of a few pages of ``source``; ``edited``: a page republished with a new line."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as out:
        for page in pages:
            text = src.read(f"en/{page}")
            out.writestr(f"en/{page}", text + (b"\n\nRepublished: one more paragraph.\n" if page == edited else b""))
    return target


@pytest.fixture
def v25(releases, tmp_path) -> Path:
    return cut(releases / "milvus_docs_2.5.x_en.zip", SHARED + ONLY_25, tmp_path / "milvus_docs_2.5.x_en.zip")


@pytest.fixture
def v24(releases, tmp_path) -> Path:
    return cut(releases / "milvus_docs_2.4.x_en.zip", SHARED + ONLY_24, tmp_path / "milvus_docs_2.4.x_en.zip")


def ingest(capsys, *args: str) -> dict:
    code = main(["ingest", *args, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def refused(capsys, *args: str) -> str:
    assert main([*args]) == 1
    return capsys.readouterr().err


def served(alias: str) -> str | None:
    return store.served_collection(store.connect(load_settings()), alias)


def served_ids(alias: str) -> set[str]:
    client = store.connect(load_settings())
    return set(store.doc_of_ids(client, store.loaded(client, alias)))


# -- 1. an older version beside a newer one ---------------------------------------------------------

def test_an_older_version_is_served_beside_a_newer_one_without_a_guard_rail(home, prefect_server, gpu_embeddings,
                                                                           v25, v24, capsys):
    newer = ingest(capsys, "--release", str(v25))
    older = ingest(capsys, "--release", str(v24))  # keeps 2 of 2.5.x's 7 pages: the main alias does not move
    assert served("milvus_docs") == served("milvus_docs_2_5_x") == newer["collection"]
    assert served("milvus_docs_2_4_x") == older["collection"] != newer["collection"]
    assert older["documents"] == 5


# -- 2. garbage collection keeps the rollback target ------------------------------------------------

def test_rollback_after_an_older_version_and_a_republished_release_lands_on_the_first_build(
        home, prefect_server, gpu_embeddings, v25, v24, releases, tmp_path, capsys):
    first = ingest(capsys, "--release", str(v25))
    ingest(capsys, "--release", str(v24), "--force")  # --force: today's main refuses it (case 1)
    (tmp_path / "again").mkdir()
    republished = cut(releases / "milvus_docs_2.5.x_en.zip", SHARED + ONLY_25,
                      tmp_path / "again" / "milvus_docs_2.5.x_en.zip", edited=ONLY_25[0])
    second = ingest(capsys, "--release", str(republished))
    assert served("milvus_docs") == second["collection"] != first["collection"]

    assert main(["rollback", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["to"] == first["collection"]
    assert served("milvus_docs") == served("milvus_docs_2_5_x") == first["collection"]


# -- 3. a crash between the two alias moves ---------------------------------------------------------

class Killed(Exception):
    """The process dies here (in-process stand-in for a SIGKILL at this exact call)."""


def test_a_run_killed_between_the_version_and_the_main_alias_is_repaired_by_the_next_run(
        home, prefect_server, gpu_embeddings, v25, capsys, monkeypatch):
    point = store.point_alias

    def dies_on_the_main_alias(client, alias, collection):
        if alias == "milvus_docs":
            raise Killed("killed before the main alias moved")
        point(client, alias, collection)

    monkeypatch.setattr(store, "point_alias", dies_on_the_main_alias)
    assert "killed before the main alias moved" in refused(capsys, "ingest", "--release", str(v25))
    assert served("milvus_docs_2_5_x") is not None and served("milvus_docs") is None
    monkeypatch.setattr(store, "point_alias", point)

    again = ingest(capsys, "--release", str(v25))
    assert again["unchanged"] and served("milvus_docs") == served("milvus_docs_2_5_x") == again["collection"]
    assert main(["search", "chunk cache", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"]


# -- 4. two ingests at once on one host -------------------------------------------------------------

def test_a_second_ingest_on_the_host_fetches_nothing_while_the_first_holds_the_corpus(home, prefect_server,
                                                                                    gpu_embeddings, v25):
    requests: list[str] = []
    server = Server(lambda h: (requests.append(h.path), send(h, 200, v25.read_bytes())))
    lock = home / "locks" / "milvus_docs.lock"
    lock.parent.mkdir(parents=True)
    try:
        with lock.open("a+") as held:  # the first ingest, as far as the host can tell
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.write("pid 4242 since 2026-12-04 21:00:00 UTC")
            held.flush()
            result = subprocess.run([DOCSRAG, "ingest", "--release", f"{server.base}/milvus_docs_2.5.x_en.zip"],
                                    capture_output=True, text=True, env=api_env(), cwd=ROOT, timeout=300)
    finally:
        server.stop()
    assert result.returncode == 1 and "pid 4242 since 2026-12-04 21:00:00 UTC" in result.stderr
    assert requests == [], "nothing fetched before the corpus is held"
    assert not (home / "downloads").exists() and not (home / "releases").exists()


def test_an_extracted_tree_missing_a_file_is_extracted_again_not_reused(home, prefect_server, gpu_embeddings, v25,
                                                                       capsys):
    first = ingest(capsys, "--release", str(v25))
    (home / "releases" / first["sha256"] / "en" / ONLY_25[0]).unlink()  # what a concurrent run's wipe left
    again = ingest(capsys, "--release", str(v25))
    assert again["unchanged"] and again["documents"] == first["documents"] == 7


# -- 5. two hosts, one Milvus server, one Prefect server ----------------------------------------------

def test_two_hosts_ingesting_one_corpus_on_one_milvus_server_take_turns(tmp_path, prefect_server, v25, capsys):
    from docsrag.testing.llm_emulator import Emulator

    milvus = MilvusServer(tmp_path / "milvus").start()
    slow = Emulator(embed_rate=5.0).start()  # ~10 s of embedding: the second host arrives meanwhile
    env = {"DOCSRAG_MILVUS_URI": milvus.uri, "DOCSRAG_EMBEDDING": "openai", "DOCSRAG_EMBEDDING_BASE_URL": slow.url,
           "DOCSRAG_EMBEDDING_MODEL": "emulated", "DOCSRAG_MULTILINGUAL": "off", "DOCSRAG_EMBEDDING_BATCH_SIZE": "8"}
    command = [DOCSRAG, "ingest", "--release", str(v25)]
    try:
        first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                 env=api_env(**env, DOCSRAG_HOME=str(tmp_path / "host-a")))
        _wait_for_embedding(slow, first)
        second = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300,
                                env=api_env(**env, DOCSRAG_HOME=str(tmp_path / "host-b")))
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
        assert second.returncode == 1, second.stderr
        assert re.search(rf"holds the writer slot 'docsrag-writer-milvus-docs-[0-9a-f]{{8}}' \(.*pid {first.pid} "
                         r"since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\)", second.stderr), second.stderr
        assert not (tmp_path / "host-b" / "downloads").exists(), "the second host fetched nothing"
        client = MilvusClient(uri=milvus.uri)
        builds = [c for c in client.list_collections() if c.startswith("milvus_docs__")]
        assert len(builds) == 1 and client.describe_alias("milvus_docs")["collection_name"] == builds[0]
    finally:
        slow.stop()
        milvus.kill()


def _wait_for_embedding(emulator, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while emulator.embedded <= 1:  # the dimension probe, then the first batch
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the first ingest never started embedding"
        time.sleep(0.05)


# -- 6. a resumed build whose inputs changed ----------------------------------------------------------

def test_a_build_killed_before_validation_then_run_with_another_file_budget_serves_exactly_the_new_release(
        home, prefect_server, gpu_embeddings, v25, capsys, monkeypatch):
    def killed(*args):
        raise Killed("killed once every row was written")

    with monkeypatch.context() as patch:
        patch.setattr(build, "validate", killed)
        assert "killed once every row was written" in refused(capsys, "ingest", "--release", str(v25))

    # The largest page is over the new budget: it is skipped, and every other page's ids stay.
    monkeypatch.setenv("DOCSRAG_MAX_FILE_BYTES", "15000")
    resumed = ingest(capsys, "--release", str(v25))
    assert [s["path"] for s in resumed["skipped"]] == [f"en/{ONLY_25[2]}"]
    settings = load_settings()
    parsed = markdown.parse_release(home / "releases" / resumed["sha256"], markdown.Budgets.of(settings))
    expected = {c.id for c in chunking.chunk_documents(parsed.documents, settings.chunking_config,
                                                       embedding.resolve(settings).id)}
    assert served_ids("milvus_docs") == expected


# -- 7. dangling aliases --------------------------------------------------------------------------------

class Milvus254:
    """Milvus 2.5.4 after a collection with an alias was dropped (milvus#40236): the alias is no
    longer listed, and creating it again is refused. A wrapper at the call site over a real client."""

    def __init__(self, client: MilvusClient, hidden: str):
        self.client, self.hidden = client, hidden

    def __getattr__(self, name):
        return getattr(self.client, name)

    def list_aliases(self, *args, **kwargs):
        found = self.client.list_aliases(*args, **kwargs)
        return {**found, "aliases": [a for a in found.get("aliases", []) if a != self.hidden]}


def test_a_dangling_alias_is_repointed_not_created_again(tmp_path):
    client = MilvusClient(str(tmp_path / "milvus.db"))
    for name in ("old", "new"):
        client.create_collection(name, dimension=4)
    client.create_alias("old", "milvus_docs")
    store.point_alias(Milvus254(client, "milvus_docs"), "milvus_docs", "new")
    assert client.describe_alias("milvus_docs")["collection_name"] == "new"


def test_the_cluster_runs_a_milvus_that_cannot_leave_a_dangling_alias():
    compose = yaml.safe_load((INFRA / "compose" / "docker-compose.yaml").read_text())
    tags = {compose["services"]["milvus"]["image"].rsplit(":v", 1)[1],
            yaml.safe_load((INFRA / "helm" / "milvus-values.yaml").read_text())["image"]["all"]["tag"].lstrip("v")}
    assert len(tags) == 1 and tuple(int(p) for p in tags.pop().split(".")) >= (2, 5, 5)


# -- 8. damaged state ------------------------------------------------------------------------------------

@pytest.mark.parametrize("found, said", [
    (b"SQLite format 3\x00" + bytes(4080), "an older Milvus Lite's file"),
    (b"\x89 not a database " * 200, "not a Milvus Lite folder"),
])
def test_a_milvus_lite_path_that_is_a_file_is_said_to_be_one_not_another_command_using_it(home, capsys, found,
                                                                                           said):
    home.mkdir(parents=True)
    (home / "milvus.db").write_bytes(found)
    err = refused(capsys, "rollback")
    assert f"{home / 'milvus.db'} is a file" in err and said in err, err
    assert "another docsrag command" not in err


def _damage(home: Path, collection: str) -> Path:
    """A truncated write of one of the collection's segment files (no parquet footer) -> that file."""
    segment = next((home / "milvus.db" / "collections" / collection).rglob("*.parquet"))
    segment.write_bytes(segment.read_bytes()[:100])
    return segment


def _docsrag(*args: str) -> subprocess.CompletedProcess:
    """Each command a process of its own, as an operator runs them: a process that read a build
    before its file was damaged still serves it from memory."""
    return subprocess.run([DOCSRAG, *args], capture_output=True, text=True, env=api_env(), cwd=ROOT, timeout=300)


def _summary(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def damaged_served_build(home, prefect_server, gpu_embeddings, v24, v25) -> tuple[str, str, Path]:
    """2.4.x built, then 2.5.x built and served by the main alias, one of its segment files then
    truncated -> (the 2.4.x build, the damaged 2.5.x build, its damaged file)."""
    older = _summary(_docsrag("ingest", "--release", str(v24), "--json"))["collection"]
    served_build = _summary(_docsrag("ingest", "--force", "--release", str(v25), "--json"))["collection"]
    return older, served_build, _damage(home, served_build)


def test_a_plain_ingest_names_the_damage_and_ingest_force_sets_each_damaged_build_aside(
        home, damaged_served_build, v25, capsys):
    older, served_build, segment = damaged_served_build
    plain = _docsrag("ingest", "--release", str(v25))
    err = plain.stderr.strip().splitlines()[-1]
    assert plain.returncode == 1, plain.stderr[-3000:]
    assert f"the collection {served_build!r} in {home / 'milvus.db'} is damaged" in err and str(segment) in err, err
    assert "docsrag ingest --force" in err and "docsrag rollback" in err, err
    assert "refused a write" not in err and "still serve the previous" not in err, err

    _damage(home, older)  # a second damaged build: each is set aside in turn
    forced = _docsrag("ingest", "--force", "--release", str(v25), "--json")
    summary = _summary(forced)
    rebuilt = summary["collection"]
    assert summary["previous_collection"] == served_build  # what the main alias served until this run
    assert {a["collection"] for a in summary["set_aside"]} == {served_build, older}
    kept = home / "milvus.db.damaged"
    for damaged in (served_build, older):
        assert f"{damaged!r} is damaged: set aside in {kept / damaged}" in forced.stderr, forced.stderr[-3000:]
    assert (kept / served_build / segment.relative_to(segment.parents[3])).stat().st_size == 100  # kept as it was

    client = store.connect(load_settings())
    assert rebuilt not in (served_build, older, None) and served_build not in client.list_collections()
    assert store.aliases(client) == {"milvus_docs": rebuilt, "milvus_docs_2_5_x": rebuilt}  # none on what is gone
    assert main(["search", "chunk cache", "--json"]) == 0 and json.loads(capsys.readouterr().out)["results"]


def test_rollback_sets_a_damaged_served_build_aside_and_serves_the_sound_one_before_it(
        home, damaged_served_build, capsys):
    older, served_build, _ = damaged_served_build
    rolled = _docsrag("rollback", "--json")
    assert _summary(rolled) == {"alias": "milvus_docs", "from": served_build, "to": older}
    assert f"{served_build!r} is damaged: set aside in {home / 'milvus.db.damaged' / served_build}" in rolled.stderr

    client = store.connect(load_settings())
    assert store.aliases(client) == {"milvus_docs": older, "milvus_docs_2_4_x": older}
    assert main(["search", "chunk cache", "--json"]) == 0 and json.loads(capsys.readouterr().out)["results"]
