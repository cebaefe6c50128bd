"""What the API's tests share: the emulated model for the module, the API on real uvicorn with
settings of the test's own, and a client of it."""

from __future__ import annotations

import httpx
import pytest

from docsrag.tasks.core.settings import load_settings
from docsrag.testing.llm_emulator import Emulator

from tests.support.api_server import start_api

QUESTION = "Where does Milvus store data?"


@pytest.fixture(scope="module")
def llm():  # one per module: starting it is cheap, its counters are read per test
    emulator = Emulator().start()
    yield emulator
    emulator.stop()


def api_for(monkeypatch, faq_home, queue_url, llm, **settings):
    for name, value in {"QUEUE_URL": queue_url, "LLM_BASE_URL": llm.url, "RETRY_BACKOFF_S": "0", **settings}.items():
        monkeypatch.setenv(f"DOCSRAG_{name}", str(value))
    return start_api(load_settings())


@pytest.fixture
def api(monkeypatch, faq_home, queue_url, llm):
    running = api_for(monkeypatch, faq_home, queue_url, llm)
    yield running
    running.stop()


@pytest.fixture
def client(api):
    with httpx.Client(base_url=api.url, timeout=60) as session:
        yield session
