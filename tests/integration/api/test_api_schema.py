"""A tester nobody here wrote: schemathesis generates requests from the API's own OpenAPI schema
and sends them to the running API (real uvicorn, SQLite queue, FAQ index, the emulator).
Bounded: a few dozen valid and a few dozen invalid cases per operation. Every response must be no
5xx, a documented status, the documented content type and body schema, and refused without a
valid token."""

from __future__ import annotations

import itertools

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_schema_conformance,
    status_code_conformance,
)

from docsrag.flows.api import schema
from docsrag.tasks.core.records import QueueStats
from docsrag.tasks.core.settings import load_settings
from docsrag.tasks.queue.feedback import FeedbackTotals
from docsrag.tasks.service.coverage import CoverageGap
from docsrag.tasks.service.service import ServiceStats
from docsrag.testing.llm_emulator import Emulator

from tests.support.api_server import start_api

TOKEN = "schema-test-token"
MAX_EXAMPLES = 25  # per operation: the bound that keeps this test under a minute on 2 cores
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          ignored_auth]


@pytest.fixture(scope="module")
def running(faq_index, tmp_path_factory):
    emulator = Emulator().start()
    # An operator's token: every route answers it (a caller token's 403 on /v1/stats is tested beside the API)
    env = {"HOME": str(faq_index.home), "LLM_BASE_URL": emulator.url, "API_OPERATOR_TOKENS": TOKEN,
           "QUEUE_URL": f"sqlite:///{tmp_path_factory.mktemp('schema') / 'questions.db'}",
           "API_RATE_PER_MIN": "1000000", "API_MAX_WAIT_S": "1", "RETRY_BACKOFF_S": "0"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(f"DOCSRAG_{name}", value)
        api = start_api(load_settings())
        api.service.submit("Where does Milvus store data?")  # question 1 exists, answered: ids hit both paths
        api.drain()
        yield api
        api.stop()
    emulator.stop()


@pytest.fixture(scope="module")
def api_schema(running):
    return schemathesis.openapi.from_url(f"{running.url}/openapi.json")


def test_the_api_keeps_its_schema(running, api_schema):
    # Driven from inside the test (schemathesis' pytest loader does not run under this pytest):
    # one hypothesis run per operation, on the schema the running API serves.
    for result, mode in itertools.product(api_schema.get_all_operations(), GenerationMode):
        operation = result.ok()

        @given(case=operation.as_strategy(generation_mode=mode))
        # derandomized: the same cases on every run, so a failure in CI reproduces here
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  derandomize=True)
        def keeps_its_schema(case):
            case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS)

        keeps_its_schema()


def test_every_operation_refuses_a_call_without_a_token(running, api_schema):
    operations = [(op.method.upper(), op.path) for op in (result.ok() for result in api_schema.get_all_operations())]
    assert len(operations) == 6
    with httpx.Client(base_url=running.url, timeout=30) as client:
        for method, path in operations:
            response = client.request(method, path.replace("{question_id}", "1"), json={"question": "x"})
            assert response.status_code == 401, (method, path, response.text)
            assert "bearer token" in response.json()["reason"]


def test_versions_are_listed_and_an_unknown_one_is_refused_at_submit(running):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=running.url, headers=headers, timeout=30) as client:
        [corpus] = client.get("/v1/versions").json()["corpora"]
        assert (corpus["alias"], corpus["serves_version"]) == ("milvus_docs", "2.4.x")
        assert [v["version"] for v in corpus["versions"]] == ["2.4.x"]
        refused = client.post("/v1/questions", json={"question": "Where does Milvus store data?", "version": "2.9.x"})
        assert refused.status_code == 404, refused.text  # at once: never queued, failed and retried
        assert "served: 2.4.x" in refused.json()["reason"]
        assert client.get("/v1/search", params={"q": "x", "version": "2.9.x"}).json()["reason"] == \
            refused.json()["reason"], "one answer for one mistake"
        accepted = client.post("/v1/questions", json={"question": "Where does Milvus store data?", "version": "2.4.x"})
        assert accepted.status_code == 202


def test_sources_and_hits_carry_the_url_of_their_page(running):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=running.url, headers=headers, timeout=30) as client:
        results = client.get("/v1/search", params={"q": "Where does Milvus store data?", "k": 5}).json()["results"]
        assert results[0]["url"].startswith("https://milvus.io/docs/v2.4.x/product_faq.md#")
        assert len({hit["doc_path"] for hit in results}) == len(results), "each document once"
        sources = client.get("/v1/questions/1").json()["sources"]
        assert sources and all(s["url"].startswith("https://milvus.io/docs/v2.4.x/") for s in sources)
        assert all(s["version"] == "2.4.x" for s in sources)
        assert len({(s["doc_path"], s["heading"]) for s in sources}) == len(sources), "each heading once"


def test_the_stats_model_is_built_from_the_records_it_shows():
    """A field added to a record reaches the schema: the model and the served dict name the same
    fields, in the same order (schema.py builds Stats, CoverageGap and FeedbackTotals from them)."""
    gap = CoverageGap("faq.md", "Where", not_covered=1, not_helpful=2, examples=["q"])
    stats = ServiceStats(QueueStats({"pending": 1}, None, 0.5, 300.0), 3, FeedbackTotals(4, 5), [gap])
    served = stats.to_dict()
    assert list(schema.Stats.model_fields) == list(served)
    assert list(schema.CoverageGap.model_fields) == list(served["coverage_gaps"][0])
    assert schema.Stats.model_validate(served).model_dump() == served
