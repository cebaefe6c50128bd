"""The lifecycle state machine (tests/lifecycle_machine.py), bounded and seeded for the suite;
bench/lifecycle.py runs it for hundreds of sequences."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test
from pymilvus import MilvusClient

from .lifecycle_machine import Lifecycle

BOUNDED = settings(max_examples=8, stateful_step_count=15, deadline=None, derandomize=True, database=None,
                   suppress_health_check=list(HealthCheck))


def run_machine(client: MilvusClient, home, config: settings = BOUNDED) -> dict[str, int]:
    machine = type("LifecycleOn", (Lifecycle,), {"client": client, "home": home, "counts": {}})
    run_state_machine_as_test(machine, settings=config)
    return machine.counts


def test_every_sequence_of_ingests_rollbacks_crashes_and_second_writers_keeps_the_invariants(tmp_path):
    counts = run_machine(MilvusClient(str(tmp_path / "milvus.db")), tmp_path)
    print("lifecycle on Milvus Lite:", counts)
    assert counts["sequences"] >= 8 and counts["crashes injected"] and counts["repairs"]
