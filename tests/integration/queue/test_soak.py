"""A short fault soak (docsrag/testing/fault_soak.py): 3 worker processes, one PostgreSQL queue of 300
questions, the seeded faults of bench/soak.py squeezed into its span: a poison question per 100,
per-request resets, timeouts, trickled bodies, NUL bytes, bad usage, huge citations, 503 bursts, an
HTML page for 10 s, a SIGKILLed worker, a PostgreSQL crash-restart and a Milvus restart."""

import pytest

from docsrag.testing.fault_soak import PG_BIN, Plan, soak, start_stack, stop_stack

from tests.conftest import FAQ, ingest_into


@pytest.fixture(scope="module")
def stack(tmp_path_factory, prefect_server, releases):
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"the soak starts its own PostgreSQL cluster: {PG_BIN}/initdb not found")
    root = tmp_path_factory.mktemp("soak")

    def ingest(release, env):
        ingest_into(root / "home", release, **{k.removeprefix("DOCSRAG_"): v for k, v in env.items()})

    stack = start_stack(root, releases / FAQ, ingest)
    yield stack
    stop_stack(stack)


def test_no_question_lost_none_answered_twice_under_seeded_faults(stack, tmp_path):
    result = soak(stack, Plan.drawn(seed=7, span_s=25), questions=300, workers=3, tmp=tmp_path, limit_s=100)
    assert result.violations() == [], result.to_dict()
    assert (result.answered, result.dead_poison, result.poison) == (297, 3, 3)
    assert len(result.events) == 6, "every scheduled fault happened"
    assert {"nul", "reset", "html", "poison"} <= set(result.injected), result.injected
