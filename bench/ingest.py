"""Full ingest of a release on the embedded defaults vs. embedding the same chunks alone.

Last line is JSON: total_s, embed_only_s, ratio (target <= 1.15), parse_s (target < 3),
chunks, peak_rss_mb (target < 2048). Run: .venv/bin/python bench/ingest.py --release PATH
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--release", default="../shared/data/releases/milvus_docs_2.4.x_en.zip")
    args = parser.parse_args()
    os.environ["DOCSRAG_HOME"] = tempfile.mkdtemp(prefix="docsrag-bench-")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from prefect.testing.utilities import prefect_test_harness

    from flows.ingest import ingest_release
    from tasks import chunking, embedding, markdown, release
    from tasks.settings import load_settings

    settings = load_settings(release_url=args.release)
    with prefect_test_harness(server_startup_timeout=120):  # the API is up before the clock starts
        start = time.perf_counter()
        summary = ingest_release(release=args.release)
        total_s = time.perf_counter() - start

    root = Path(settings.home) / "releases" / summary["sha256"]
    start = time.perf_counter()
    parsed = markdown.parse_release(root)
    chunks = chunking.chunk_documents(parsed.documents, settings.chunking_config, settings.embedder_id)
    parse_s = time.perf_counter() - start

    import torch

    embedder = embedding.embedder_for(settings)  # already loaded by the ingest above
    torch.set_num_threads(os.cpu_count() or 1)  # the baseline: one encode call with every core
    texts = [c.embed_text for c in chunks]
    start = time.perf_counter()
    embedder.embed(texts)
    embed_only_s = time.perf_counter() - start

    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    figures = {
        "release": release.release_version(args.release) or Path(args.release).name,
        "total_s": round(total_s, 2), "embed_only_s": round(embed_only_s, 2),
        "ratio": round(total_s / embed_only_s, 3), "ratio_limit": 1.15,
        "parse_s": round(parse_s, 2), "parse_limit_s": 3.0, "parse_ratio": round(parse_s / 3.0, 3),
        "chunks": len(chunks), "peak_rss_mb": round(peak_rss_mb), "peak_rss_limit_mb": 2048,
        "flow_seconds": summary["seconds"], "stages": summary["stages"],
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
