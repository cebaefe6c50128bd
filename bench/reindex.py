"""Incremental re-indexing figures on the embedded defaults (one process, one Prefect API).

unchanged_s: re-run over an unchanged 2.4.x; update_s / update_embedded: 2.4.x -> 2.5.x;
full_s: a fresh 2.5.x build. Targets: unchanged_s <= 5% of full_s;
update_s <= (update_embedded / chunks of 2.5.x) * full_s + 10 s. Last line is JSON.
Run: .venv/bin/python bench/reindex.py --releases ../shared/data/releases
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed_ingest(release: Path, home: str) -> tuple[float, dict]:
    from docsrag.flows.ingest import ingest_release

    os.environ["DOCSRAG_HOME"] = home
    start = time.perf_counter()
    summary = ingest_release(release=str(release))
    return time.perf_counter() - start, summary.to_dict()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--releases", default="../shared/data/releases")
    args = parser.parse_args()
    releases = Path(args.releases)
    old, new = releases / "milvus_docs_2.4.x_en.zip", releases / "milvus_docs_2.5.x_en.zip"
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        incremental = tempfile.mkdtemp(prefix="docsrag-reindex-")
        timed_ingest(old, incremental)  # warm-up and the starting point; also loads the model
        unchanged_s, unchanged = timed_ingest(old, incremental)
        update_s, update = timed_ingest(new, incremental)
        full_s, full = timed_ingest(new, tempfile.mkdtemp(prefix="docsrag-fresh-"))

    update_limit = update["embedded"] / full["chunks"] * full_s + 10
    print(json.dumps({
        "unchanged_s": round(unchanged_s, 2), "unchanged_embedded": unchanged["embedded"],
        "unchanged_limit_s": round(0.05 * full_s, 2), "unchanged_ratio": round(unchanged_s / (0.05 * full_s), 3),
        "update_s": round(update_s, 2), "update_embedded": update["embedded"], "update_reused": update["reused"],
        "update_deleted": update["deleted"], "update_limit_s": round(update_limit, 2),
        "update_ratio": round(update_s / update_limit, 3),
        "full_s": round(full_s, 2), "chunks_2_5_x": full["chunks"],
        "same_ids_as_fresh": update["chunks"] == full["chunks"],
    }))


if __name__ == "__main__":
    main()
