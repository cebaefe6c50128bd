"""Ingest as a user runs it: `docsrag ingest` wall time, fresh and unchanged, beside the embedder before.

Each figure is one `docsrag ingest` process on the embedded defaults (Prefect's temporary server,
Milvus Lite, the packaged models already installed and exported), timed from start to exit:
- cli_wall_s: 2.4.x on a fresh home with the defaults (the English model at the precision `auto`
  picks on this CPU, plus the multilingual field) (target <= 25 s); where `auto` picks int8,
  cli_wall_english_s (DOCSRAG_MULTILINGUAL=off) and cli_wall_fp32_s (torch fp32, English only);
- unchanged_wall_s: the same release again (target <= 5 s); faq_wall_s: the 4-file FAQ zip on a
  fresh home (target <= 6 s); each with its stage table (start-up and prefect-api included);
- server_wall_s: 2.4.x with DOCSRAG_EMBEDDING=openai against the emulator's embeddings endpoint
  at 5,000 inputs/s, multilingual off as on the cluster (target <= 1.5 x chunks / 5,000 +
  unchanged_wall_s, the fixed cost of a run);
- embed_only_s: the same chunks embedded alone (both models, as the default flow does) in one
  process with every core; ratio = the flow's own seconds (from its first stage) / embed_only_s;
- quality guard: dev-set recall@5 and MRR@10 of the default index (English and ko/id questions),
  and where `auto` picks int8, of the English-only int8 index against torch fp32 (within 0.01).
Last line is JSON. Run: .venv/bin/python bench/ingest.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DOCSRAG = str(Path(sys.executable).parent / "docsrag")
SERVER_RATE = 5000


def run(home: Path, *args: str, **env: str) -> tuple[float, dict]:
    """One CLI command as a user runs it; -> (wall seconds, its JSON)."""
    start = time.perf_counter()
    done = subprocess.run([DOCSRAG, *args, "--json"], env={**os.environ, "DOCSRAG_HOME": str(home), **env},
                          cwd=ROOT, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, json.loads(done.stdout.splitlines()[-1])


def quality(home: Path, gold: str, **env: str) -> dict:
    _, figures = run(home, "eval", "--gold", gold, **env)
    return {"recall@5": figures["recall@5"], "mrr@10": figures["mrr@10"]}


def flow_seconds(summary: dict) -> float:
    """The flow's own seconds: from its first stage, without the process start and Prefect's API."""
    return summary["seconds"] - summary["stages"].get("start-up", 0) - summary["stages"].get("prefect-api", 0)


def embed_only(home: Path, release_sha: str) -> tuple[float, float, int]:
    """Parse + chunk, then the chunks embedded alone with every core. -> (embed s, parse s, chunks)"""
    from tasks import chunking, embedding, markdown
    from tasks.settings import load_settings

    settings = load_settings(home=home, embedding_concurrency=1)  # one batch at a time: every core on it
    root = home / "releases" / release_sha
    start = time.perf_counter()
    chunks = chunking.chunk_documents(markdown.parse_release(root).documents, settings.chunking_config,
                                      settings.embedder_id)
    parse_s = time.perf_counter() - start
    embedders = [e for e in (embedding.embedder_for(settings), embedding.multilingual_for(settings)) if e]
    texts = [c.embed_text for c in chunks]
    start = time.perf_counter()
    for first in range(0, len(texts), settings.embedding_batch_size):
        for embedder in embedders:
            embedder.embed(texts[first:first + settings.embedding_batch_size])
    return time.perf_counter() - start, parse_s, len(chunks)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--release", default=str(ROOT.parent / "shared/data/releases/milvus_docs_2.4.x_en.zip"))
    parser.add_argument("--faq", default=str(ROOT.parent / "shared/data/releases/milvus_docs_faq_2.4.x_en.zip"))
    parser.add_argument("--gold", default=str(ROOT.parent / "shared/eval/dev.jsonl"))
    parser.add_argument("--ko-id", default=str(ROOT.parent / "shared/eval/dev_ko_id.jsonl"))
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="docsrag-bench-"))
    os.environ.update(PREFECT_HOME=str(scratch / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                      DO_NOT_TRACK="true", HF_HUB_OFFLINE="1")
    os.environ.pop("PREFECT_API_URL", None)
    run(scratch / "warm", "ingest", "--release", args.faq)  # the ONNX export and OS caches, once

    cli_wall_s, summary = run(scratch / "default", "ingest", "--release", args.release)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    unchanged_wall_s, unchanged = run(scratch / "default", "ingest", "--release", args.release)
    faq_wall_s, faq = run(scratch / "faq", "ingest", "--release", args.faq)
    # Where `auto` picks int8 (a VNNI CPU), the English model alone at that precision and at torch
    # fp32, for the speed-up and the quality guard. Elsewhere it picks ONNX fp32, torch's own vectors
    # (cosine 1.0000): the default run is the fp32 figure, and the guard holds by construction.
    compared = summary_precision() == "int8"
    if compared:
        english_wall_s, english = run(scratch / "english", "ingest", "--release", args.release,
                                      DOCSRAG_MULTILINGUAL="off")
        fp32_wall_s, fp32 = run(scratch / "fp32", "ingest", "--release", args.release,
                                DOCSRAG_EMBEDDING_PRECISION="torch", DOCSRAG_MULTILINGUAL="off")

    emulator = subprocess.Popen([sys.executable, "-m", "tests.llm_emulator", "--port", "0", "--embed-rate",
                                 str(SERVER_RATE)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        url = emulator.stdout.readline().split()[-1]
        server_wall_s, served = run(scratch / "server", "ingest", "--release", args.release,
                                    DOCSRAG_EMBEDDING="openai", DOCSRAG_EMBEDDING_BASE_URL=url,
                                    DOCSRAG_EMBEDDING_MODEL="emulated-minilm", DOCSRAG_EMBEDDING_BATCH_SIZE="256",
                                    DOCSRAG_EMBEDDING_CONCURRENCY="4", DOCSRAG_MULTILINGUAL="off")
    finally:
        emulator.terminate()

    embed_only_s, parse_s, chunks = embed_only(scratch / "default", summary["sha256"])
    server_limit_s = 1.5 * chunks / SERVER_RATE + unchanged_wall_s
    default_quality = {"en": quality(scratch / "default", args.gold), "ko_id": quality(scratch / "default", args.ko_id)}
    comparison = {}
    if compared:
        english_quality = quality(scratch / "english", args.gold, DOCSRAG_MULTILINGUAL="off")
        fp32_quality = quality(scratch / "fp32", args.gold, DOCSRAG_EMBEDDING_PRECISION="torch",
                               DOCSRAG_MULTILINGUAL="off")
        comparison = {
            "cli_wall_english_s": round(english_wall_s, 2), "cli_wall_fp32_s": round(fp32_wall_s, 2),
            "english_stages": english["stages"], "fp32_stages": fp32["stages"],
            "quality_english_default_precision": english_quality, "quality_fp32": fp32_quality,
            "quality_within_0.01": all(abs(english_quality[k] - fp32_quality[k]) <= 0.01 for k in english_quality)}
    figures = {
        "release": summary["version"], "chunks": chunks, "precision": summary_precision(),
        "cli_wall_s": round(cli_wall_s, 2), "cli_wall_limit_s": 25, "cli_wall_ratio": round(cli_wall_s / 25, 3),
        "unchanged_wall_s": round(unchanged_wall_s, 2), "unchanged_limit_s": 5,
        "unchanged_ratio": round(unchanged_wall_s / 5, 3), "unchanged": unchanged["unchanged"],
        "faq_wall_s": round(faq_wall_s, 2), "faq_limit_s": 6, "faq_ratio": round(faq_wall_s / 6, 3),
        "server_wall_s": round(server_wall_s, 2), "server_limit_s": round(server_limit_s, 2),
        "server_ratio": round(server_wall_s / server_limit_s, 3),
        "flow_s": round(flow_seconds(summary), 2), "embed_only_s": round(embed_only_s, 2),
        "ratio": round(flow_seconds(summary) / embed_only_s, 3), "parse_s": round(parse_s, 2),
        "peak_rss_mb": round(peak_rss_mb),
        "stages": summary["stages"], "unchanged_stages": unchanged["stages"], "faq_stages": faq["stages"],
        "server_stages": served["stages"], "quality_default": default_quality, **comparison,
    }
    for name in ("cli_wall", "unchanged", "faq", "server"):
        limit = figures[f"{name}_limit_s"]
        print(f"{name}: {figures[f'{name}_s' if name == 'cli_wall' else f'{name}_wall_s']} s (limit {limit} s)")
    print(json.dumps(figures))


def summary_precision() -> str:
    from tasks.settings import load_settings

    return load_settings().embedding_precision


if __name__ == "__main__":
    main()
