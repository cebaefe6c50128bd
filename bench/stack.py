"""Full ingest of a release on the local real stack, and the two ways to write it into Milvus.

    make stack-up && .venv/bin/python bench/stack.py [--env .docsrag/stack.env] [--release ZIP]

1. The ingest flow, as users run it, into a fresh alias on the stack's Milvus server:
   ``total_s``, ``write_s`` (the writer's share: batched upserts) and ``rows_per_s``.
2. The same rows written again into fresh collections both ways, measured until every row is
   visible to a query (what publishing needs): batched upserts (128 rows, as the flow) + flush,
   and Milvus bulk import (a JSON rows file in the Milvus bucket + an import job).
Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_env(path: Path) -> None:
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            name, value = line.removeprefix("export ").split("=", 1)
            os.environ[name] = value.strip("'")


def all_rows(client, name: str) -> list[dict]:
    from docsrag.tasks.index.schema import ROW_FIELDS

    iterator = client.query_iterator(name, batch_size=1000, filter="", output_fields=ROW_FIELDS)
    rows = []
    while page := iterator.next():
        rows += [{k: row[k] for k in ROW_FIELDS} | {"dense": [float(v) for v in row["dense"]]} for row in page]
    iterator.close()
    return rows


def wait_visible(client, name: str, expected: int, timeout_s: float = 600) -> None:
    from docsrag.tasks.index import store

    deadline = time.monotonic() + timeout_s
    while store.count(client, name) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: rows not visible after {timeout_s} s")
        time.sleep(0.2)


def write_by_upsert(client, name: str, rows: list[dict]) -> float:
    from docsrag.tasks.index import store
    from docsrag.tasks.index.build import batched

    started = time.perf_counter()
    for batch in batched(rows, 128):
        store.upsert(client, name, batch)
    client.flush(name)
    wait_visible(client, name, len(rows))
    return time.perf_counter() - started


def write_by_bulk_import(client, name: str, rows: list[dict], settings) -> float:
    """Milvus 2.3 import: a row-based JSON file in the bucket the server stores into."""
    import boto3
    from pymilvus import BulkInsertState, connections, utility

    key = f"imports/{name}.json"
    started = time.perf_counter()
    boto3.client("s3", endpoint_url=settings.s3_endpoint_url).put_object(
        Bucket=settings.milvus_bucket, Key=key, Body=json.dumps({"rows": rows}).encode())
    connections.connect("bench", uri=settings.milvus_uri, token=settings.milvus_token.get_secret_value())
    task = utility.do_bulk_insert(name, files=[key], using="bench")
    while (state := utility.get_bulk_insert_state(task, using="bench")).state not in (
            BulkInsertState.ImportCompleted, BulkInsertState.ImportFailed, BulkInsertState.ImportFailedAndCleaned):
        time.sleep(0.2)
    if state.state != BulkInsertState.ImportCompleted:
        raise RuntimeError(f"bulk import failed: {state.failed_reason}")
    wait_visible(client, name, len(rows))  # imported segments are indexed and loaded before queries see them
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", type=Path, default=ROOT / ".docsrag" / "stack.env")
    parser.add_argument("--release", default=str(ROOT.parent / "shared/data/releases/milvus_docs_2.4.x_en.zip"))
    args = parser.parse_args()
    load_env(args.env)
    stamp = time.strftime("%Y%m%d%H%M%S")
    os.environ["DOCSRAG_COLLECTION"] = f"bench_{stamp}"  # never touches the served alias
    from docsrag.flows.ingest import ingest_release
    from docsrag.tasks.core.settings import load_settings
    from docsrag.tasks.index import schema as index
    from docsrag.tasks.index import store

    summary = ingest_release(release=args.release, version=f"bench-{stamp}")
    settings = load_settings()
    client = store.connect(settings)
    rows = all_rows(client, summary.collection)
    timings = {}
    for method in ("upsert", "bulk_import"):
        name = f"bench_{method}_{stamp}"
        index.create_collection(client, name, len(rows[0]["dense"]), bm25=store.capabilities(client).bm25)
        timings[method] = (write_by_upsert(client, name, rows) if method == "upsert"
                           else write_by_bulk_import(client, name, rows, settings))
        client.drop_collection(name)
    for alias in (settings.collection, summary.version_alias):
        client.drop_alias(alias)
    client.drop_collection(summary.collection)

    write_s = summary.stages["write"]
    figures = {
        "rows": len(rows), "total_s": summary.seconds, "write_method": "upsert", "write_s": write_s,
        "rows_per_s": round(len(rows) / write_s, 1),
        "upsert_until_visible_s": round(timings["upsert"], 2),
        "upsert_rows_per_s": round(len(rows) / timings["upsert"], 1),
        "bulk_import_until_visible_s": round(timings["bulk_import"], 2),
        "bulk_import_rows_per_s": round(len(rows) / timings["bulk_import"], 1),
        "bulk_import_vs_upsert": round(timings["bulk_import"] / timings["upsert"], 2),
        "stages": summary.stages,
    }
    print(f"full ingest on the stack: {figures['total_s']} s for {len(rows)} rows; writes {write_s} s "
          f"({figures['rows_per_s']} rows/s)")
    print(f"same rows until visible: upsert {figures['upsert_until_visible_s']} s, "
          f"bulk import {figures['bulk_import_until_visible_s']} s (x{figures['bulk_import_vs_upsert']})")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
