"""One writer per Milvus server: the writer slot holds only where every writer shares it.

Real Milvus server (docsrag/testing/milvus_server.py), real Prefect servers (each command's own temporary
one, or the session's), the real CLI.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from pymilvus import MilvusClient

from docsrag.tasks.core.settings import SettingsError, load_settings
from docsrag.tasks.index import writer_lock
from docsrag.testing.milvus_server import MilvusServer

from tests.conftest import DOCSRAG, FAQ, ROOT

NO_SHARED_PREFECT = "no Prefect server that every writer shares"


def _private_prefect_env(home, milvus_uri: str, **extra: str) -> dict[str, str]:
    """A host of its own: its own DOCSRAG_HOME and PREFECT_HOME, no PREFECT_API_URL (the command starts
    a temporary Prefect server of its own, DOCSRAG_PREFECT_SERVER=temporary from conftest)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    (home / "prefect").mkdir(parents=True, exist_ok=True)
    return {**env, "DOCSRAG_HOME": str(home), "PREFECT_HOME": str(home / "prefect"),
            "DOCSRAG_MILVUS_URI": milvus_uri, "DOCSRAG_MULTILINGUAL": "off", **extra}


def _builds(milvus: MilvusServer) -> list[str]:
    return [c for c in MilvusClient(uri=milvus.uri).list_collections() if c.startswith("milvus_docs__")]


def test_two_hosts_each_on_its_own_prefect_are_refused_a_milvus_server_and_one_sole_writer_ingests(
        tmp_path, releases):
    from docsrag.testing.llm_emulator import Emulator

    milvus = MilvusServer(tmp_path / "milvus").start()
    llm = Emulator().start()
    embed = {"DOCSRAG_EMBEDDING": "openai", "DOCSRAG_EMBEDDING_BASE_URL": llm.url, "DOCSRAG_EMBEDDING_MODEL": "emulated"}
    command = [DOCSRAG, "ingest", "--release", str(releases / FAQ)]
    try:
        hosts = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                  env=_private_prefect_env(tmp_path / name, milvus.uri, **embed))
                 for name in ("host-a", "host-b")]
        for host, name in zip(hosts, ("host-a", "host-b")):
            _, err = host.communicate(timeout=300)
            assert host.returncode == 1, err
            assert NO_SHARED_PREFECT in err and "PREFECT_API_URL" in err and "DOCSRAG_SOLE_WRITER=true" in err, err
            assert not (tmp_path / name / "downloads").exists(), "refused before anything is fetched"
        assert llm.embedded == 0 and _builds(milvus) == []

        sole = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300,
                              env=_private_prefect_env(tmp_path / "host-a", milvus.uri, DOCSRAG_SOLE_WRITER="true",
                                                       **embed))
        assert sole.returncode == 0, sole.stderr
        builds = _builds(milvus)
        assert len(builds) == 1 and MilvusClient(uri=milvus.uri).describe_alias("milvus_docs")["collection_name"] == \
            builds[0]
    finally:
        llm.stop()
        milvus.kill()


def test_a_rollback_on_a_milvus_server_with_no_shared_prefect_is_refused(tmp_path):
    # Nothing need listen there: the refusal comes before Milvus is asked anything.
    env = _private_prefect_env(tmp_path / "home", "http://127.0.0.1:9")
    result = subprocess.run([DOCSRAG, "rollback"], capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert result.returncode == 1 and NO_SHARED_PREFECT in result.stderr, result.stderr
    assert "DOCSRAG_SOLE_WRITER=true" in result.stderr


def test_a_rollback_on_a_milvus_server_takes_the_writer_slot_of_the_shared_prefect(prefect_server, home,
                                                                                   monkeypatch, capsys):
    from prefect.concurrency.sync import concurrency

    from docsrag.flows.cli import main

    monkeypatch.setenv("DOCSRAG_MILVUS_URI", "http://127.0.0.1:9")
    settings = load_settings()
    with writer_lock.held(settings.model_copy(update={"home": home.parent / "another-host"})):
        assert main(["rollback"]) == 1
    assert f"holds the writer slot {writer_lock.slot_name(settings)!r}" in capsys.readouterr().err
    with concurrency(writer_lock.slot_name(settings), strict=True, max_retries=0, lease_duration=60):
        pass  # the refused rollback left the slot free


@pytest.mark.parametrize("lease", ["30", "59"])
def test_a_writer_lease_under_prefects_minimum_is_refused_at_load(lease, monkeypatch):
    monkeypatch.setenv("DOCSRAG_WRITER_LEASE_S", lease)
    with pytest.raises(SettingsError, match="DOCSRAG_WRITER_LEASE_S"):
        load_settings()


def test_a_slot_prefect_refuses_to_lease_is_an_error_not_another_writer(prefect_server, home):
    settings = load_settings(milvus_uri="http://127.0.0.1:9")
    unleasable = settings.model_copy(update={"writer_lease_s": 30.0})  # as a setting validated elsewhere could be
    with pytest.raises(Exception) as refused:
        with writer_lock.held(unleasable):
            pass
    assert "lease_duration" in str(refused.value) and "holds the writer slot" not in str(refused.value)


def test_a_writer_that_waits_takes_the_slot_once_its_holder_lets_go(prefect_server, home):
    import threading
    import time

    settings = load_settings(milvus_uri="http://127.0.0.1:9", writer_wait_s=30)
    taken, let_go = threading.Event(), threading.Event()

    def first_host():
        with writer_lock.held(settings.model_copy(update={"home": home.parent / "another-host"})):
            taken.set()
            let_go.wait(30)

    holder = threading.Thread(target=first_host)
    holder.start()
    assert taken.wait(30)
    threading.Timer(2.0, let_go.set).start()
    began = time.monotonic()
    with writer_lock.held(settings):
        waited = time.monotonic() - began
    holder.join(30)
    assert 1.5 < waited < 20
