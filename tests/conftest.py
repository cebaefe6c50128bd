"""Shared fixtures: real Prefect (test harness), real Milvus Lite, the real release zips."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Prefect state of the test run lives in a throwaway folder, never in the user's ~/.prefect.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="docsrag-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
for name in [n for n in os.environ if n.startswith("DOCSRAG_") and not n.startswith("DOCSRAG_TEST_")]:
    del os.environ[name]  # a developer's own configuration must not leak into the tests
# A command with no PREFECT_API_URL starts a temporary Prefect server of its own, not one kept after
# the test; the kept server (the default) is tested where it is stopped again (test_background_server.py).
os.environ["DOCSRAG_PREFECT_SERVER"] = "temporary"


def _test_data() -> Path | None:
    path = Path(os.environ.get("DOCSRAG_TEST_DATA", ROOT.parent / "shared"))
    return path if (path / "data" / "releases").is_dir() else None


@pytest.fixture(scope="session")
def releases() -> Path:
    data = _test_data()
    if data is None:
        pytest.skip("release zips not found: set DOCSRAG_TEST_DATA to the folder holding data/releases")
    return data / "data" / "releases"


@pytest.fixture(scope="session")
def eval_dir() -> Path:
    data = _test_data()
    if data is None or not (data / "eval").is_dir():
        pytest.skip("eval set not found: set DOCSRAG_TEST_DATA to the folder holding eval/")
    return data / "eval"


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect API (temporary SQLite server) shared by the session's flow runs."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def llm():
    """The OpenAI-compatible emulator over HTTP, fresh for the test (modules that need it loaded with
    an index or shared across tests define their own)."""
    from docsrag.testing.llm_emulator import Emulator

    emulator = Emulator().start()
    yield emulator
    emulator.stop()


FAQ = "milvus_docs_faq_2.4.x_en.zip"


def ingest_into(home: Path, release: Path, **env: str) -> dict:
    """`docsrag ingest --json` of ``release`` into ``home``, outside any one test (a module's shared
    index); extra settings as DOCSRAG_* names without the prefix. -> the run summary."""
    from docsrag.flows.cli import main

    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as out:
        for name, value in {"HOME": str(home), **env}.items():
            patch.setenv(f"DOCSRAG_{name}", value)
        assert main(["ingest", "--release", str(release), "--json"]) == 0
    return json.loads(out.getvalue().splitlines()[-1])


class Index(NamedTuple):
    home: Path
    summary: dict


@pytest.fixture(scope="module")
def faq_index(tmp_path_factory, prefect_server, releases) -> Index:
    """The FAQ release ingested once per module, for the tests that leave the index as they found
    it (searches, questions, refused ingests): a fresh FAQ ingest costs seconds of embedding."""
    home = tmp_path_factory.mktemp("faq") / "home"
    return Index(home, ingest_into(home, releases / FAQ))


@pytest.fixture
def faq_home(faq_index, monkeypatch) -> Path:
    """DOCSRAG_HOME pointed at the module's FAQ index."""
    monkeypatch.setenv("DOCSRAG_HOME", str(faq_index.home))
    return faq_index.home


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh DOCSRAG_HOME: its own Milvus Lite file, object store and locks."""
    monkeypatch.setenv("DOCSRAG_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


DOCSRAG = str(Path(sys.executable).parent / "docsrag")  # the installed console script


def api_env(**extra: str) -> dict:
    """The environment for a subprocess that should use this session's Prefect API."""
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), **extra}


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway database on the machine's PostgreSQL (DOCSRAG_TEST_POSTGRES_URL names the server)."""
    import uuid

    import sqlalchemy

    admin = os.environ.get("DOCSRAG_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    engine = sqlalchemy.create_engine(admin.replace("postgresql://", "postgresql+psycopg://"),
                                      isolation_level="AUTOCOMMIT")
    name = f"docsrag_test_{uuid.uuid4().hex[:8]}"
    try:
        with engine.connect() as db:
            db.exec_driver_sql(f"CREATE DATABASE {name}")
    except sqlalchemy.exc.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at DOCSRAG_TEST_POSTGRES_URL={admin}: {exc.orig}")
    yield admin.rsplit("/", 1)[0] + f"/{name}"
    with engine.connect() as db:
        db.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def queue_url(request, tmp_path) -> str:
    """A question queue on SQLite and on PostgreSQL (the session's database, emptied for each test)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'questions.db'}"
    import sqlalchemy

    from docsrag.tasks.queue.api_tables import metadata as api_tables
    from docsrag.tasks.queue.questions import metadata as queue_tables

    url = request.getfixturevalue("postgres_url")
    engine = sqlalchemy.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    api_tables.drop_all(engine)
    queue_tables.drop_all(engine)
    engine.dispose()
    return url


@pytest.fixture
def gpu_embeddings(monkeypatch):
    """Whole releases are embedded by an OpenAI-compatible embeddings server (the emulator's, at a
    GPU's pace), as on the cluster: what these tests check is the diff, the reuse and the aliases
    at the scale of real releases, and the real model would spend 15 minutes of a 2-core CPU on
    them (the FAQ tests use the real model)."""
    from docsrag.testing.llm_emulator import Emulator

    server = Emulator().start()
    for name, value in {"EMBEDDING": "openai", "EMBEDDING_BASE_URL": server.url, "EMBEDDING_MODEL": "emulated",
                        "EMBEDDING_BATCH_SIZE": "256", "MULTILINGUAL": "off"}.items():
        monkeypatch.setenv(f"DOCSRAG_{name}", value)
    yield server
    server.stop()


def servers_with_home(prefect_home) -> list[int]:
    """Pids of Prefect API servers running with this PREFECT_HOME (in their environment)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            command, environ = (proc / "cmdline").read_bytes(), (proc / "environ").read_bytes()
        except OSError:
            continue
        if b"prefect.server.api.server:create_app" in command and \
                f"PREFECT_HOME={prefect_home}".encode() in environ.split(b"\0"):
            found.append(int(proc.name))
    # A server's own child between its fork and its exec has the server's command line and
    # environment (CI once counted 2 servers, pids 21735 and 21736): it is not a second server.
    return [pid for pid in found if _parent(pid) not in found]


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
