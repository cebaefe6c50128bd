"""Both models on the cores: today's layout (each batch runs MiniLM then USE, two batches at once)
against two task streams (MiniLM over every batch on one core, USE over every batch on the other).

The first chunks of a release, one thread per model per stream, in one process as the flow runs
them; the batch layout is timed before and after the streams (a shared machine drifts).
Last line JSON. Run: .venv/bin/python bench/streams.py [--chunks 512]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from docsrag.tasks.core.objectstore import LocalStore  # noqa: E402
from docsrag.tasks.core.settings import load_settings  # noqa: E402
from docsrag.tasks.embed import embedding, runtime
from docsrag.tasks.ingest import chunking, markdown  # noqa: E402
from docsrag.tasks.ingest.release import extract_release, fetch_release  # noqa: E402

BATCH = 128


def chunk_texts(release: str, limit: int) -> list[str]:
    work = Path(tempfile.mkdtemp(prefix="docsrag-streams-"))
    settings = load_settings(home=work)
    rel = fetch_release(release, home=work, store=LocalStore(work / "objects"))
    root = extract_release(rel, work / "releases", max_bytes=settings.max_archive_bytes,
                           max_files=settings.max_archive_files)
    chunks = chunking.chunk_documents(markdown.parse_release(root).documents, settings.chunking_config, "bench")
    return [c.embed_text for c in chunks][:limit]


def timed(*workers) -> float:
    threads = [threading.Thread(target=work) for work in workers]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return round(time.perf_counter() - start, 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--release", default=str(ROOT.parent / "shared/data/releases/milvus_docs_2.4.x_en.zip"))
    parser.add_argument("--chunks", type=int, default=512)
    args = parser.parse_args()
    settings = load_settings()
    texts = chunk_texts(args.release, args.chunks)
    folder = Path(embedding._local_model_path(settings.embedding_model))
    variant = embedding.local_variant(settings)
    minilm = runtime.onnx_embedder(folder, variant, settings.model_cache, embedding.max_tokens(settings), 1, variant)
    use = embedding.MultilingualEmbedder(threads=1)
    minilm.embed(texts[:16]), use.embed(texts[:16])  # first calls allocate
    batches = [texts[i:i + BATCH] for i in range(0, len(texts), BATCH)]

    def both_models(part):
        return lambda: [(minilm.embed(b), use.embed(b)) for b in part]

    def batch_layout() -> float:
        return timed(both_models(batches[0::2]), both_models(batches[1::2]))

    before = batch_layout()
    streams = timed(lambda: [minilm.embed(b) for b in batches], lambda: [use.embed(b) for b in batches])
    after = batch_layout()
    figures = {"cpu": runtime.cpu(), "chunks": len(texts), "variant": variant, "batch_layout_s": [before, after],
               "streams_s": streams, "streams_over_batches": round(streams / min(before, after), 3)}
    print(f"batches (MiniLM then USE, 2 at once): {before} / {after} s; streams: {streams} s ({figures['cpu']})")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
