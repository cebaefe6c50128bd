"""The lifecycle state machine (docsrag/testing/lifecycle_machine.py), bounded and seeded for the suite;
bench/lifecycle.py runs it for hundreds of sequences."""

from __future__ import annotations

from pymilvus import MilvusClient

from docsrag.testing.lifecycle_machine import Lifecycle, run_machine


def test_every_sequence_of_ingests_rollbacks_crashes_and_second_writers_keeps_the_invariants(tmp_path):
    counts = run_machine(MilvusClient(str(tmp_path / "milvus.db")), tmp_path)
    print("lifecycle on Milvus Lite:", counts)
    assert counts["sequences"] >= 8 and counts["crashes injected"] and counts["repairs"]


def replay(client: MilvusClient, home, steps: list[tuple[str, dict]]) -> None:
    """A sequence the machine found, kept as an example: each step, then every invariant."""
    machine = type("LifecycleOn", (Lifecycle,), {"client": client, "home": home, "counts": {}})()
    for rule, arguments in steps:
        getattr(machine, rule)(**arguments)
        machine.every_alias_serves_a_ready_build_holding_exactly_its_release()
        machine.the_aliases_serve_and_gc_keeps_what_the_model_says()
        machine.no_more_builds_are_kept_than_the_policy_allows()


def test_a_release_the_main_alias_serves_again_after_a_rollback_is_republished_not_built_twice(tmp_path):
    """Found by bench/lifecycle.py (seed 1): 2.5.x:b published under a newer 2.10.x, 2.10.x rolled
    back (the main alias returns to 2.5.x:a while 2_5_x serves 2.5.x:b), then 2.5.x:a again: a
    second build of it made the next rollback land on the first, the same release."""
    ingest = [("ingest", {"rid": rid, "force": True, "contested": 1}) for rid in ("2.5.x:a", "2.10.x:a", "2.5.x:b")]
    replay(MilvusClient(str(tmp_path / "milvus.db")), tmp_path,
           [*ingest, ("rollback", {}), ("ingest", {"rid": "2.5.x:a", "force": False, "contested": 1}),
            ("rollback", {})])
