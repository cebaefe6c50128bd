"""The index lifecycle state machine (docsrag/testing/lifecycle_machine.py) for hundreds of sequences.

Each sequence starts from an empty Milvus and runs up to --steps rules (ingests, rollbacks,
crashes before any Milvus mutation, the next run, second writers), checking every invariant after
each step. Prints the counts per seed and the CPU; exits 1 on the first violation, printing the
shrunk sequence. Last line is JSON.

Run: .venv/bin/python bench/lifecycle.py --sequences 500 --seeds 1 2
     .venv/bin/python bench/lifecycle.py --milvus-uri http://127.0.0.1:19530   # a Milvus server
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu() -> str:
    info = Path("/proc/cpuinfo").read_text()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = [f for f in ("avx2", "avx512_vnni", "amx_tile") if f" {f}" in info]
    return f"{name} ({', '.join(flags)})"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sequences", type=int, default=500, help="per seed")
    parser.add_argument("--steps", type=int, default=20, help="rules per sequence, at most")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--milvus-uri", help="a Milvus server (default: a fresh Milvus Lite file)")
    parser.add_argument("--milvus-token", default="")
    args = parser.parse_args()

    import hypothesis.core
    from hypothesis import HealthCheck, settings
    from pymilvus import MilvusClient

    from docsrag.tasks.index import store
    from docsrag.testing.lifecycle_machine import run_machine

    home = Path(tempfile.mkdtemp(prefix="docsrag-lifecycle-"))
    client = MilvusClient(uri=args.milvus_uri, token=args.milvus_token) if args.milvus_uri \
        else MilvusClient(str(home / "milvus.db"))
    print(f"CPU: {cpu()}; Milvus: {store.capabilities(client).version}", flush=True)
    results = []
    for seed in args.seeds:
        hypothesis.core.global_force_seed = seed  # what pytest's --hypothesis-seed sets
        config = settings(max_examples=args.sequences, stateful_step_count=args.steps, deadline=None,
                          database=None, suppress_health_check=list(HealthCheck))
        started = time.perf_counter()
        try:
            counts = run_machine(client, home, config)
        except AssertionError as exc:  # the shrunk sequence travels in the exception's notes
            print(f"seed {seed}: INVARIANT VIOLATED", flush=True)
            traceback.print_exception(exc, file=sys.stdout)
            print(json.dumps({"seed": seed, "violations": 1}))
            return 1
        seconds = round(time.perf_counter() - started, 1)
        results.append({"seed": seed, "seconds": seconds, "violations": 0, **counts})
        print(f"seed {seed}: {seconds} s, 0 violations, {counts}", flush=True)
    print(json.dumps({"cpu": cpu(), "runs": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
