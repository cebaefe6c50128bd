"""Retrieval variants side by side on the dev set (doc-level recall@k, MRR@10).

Each variant indexes the 2.4.x release in its own Milvus Lite collection with the default
embedder; identical texts are embedded once. Prints a markdown table, then a threshold
sweep for "not covered", then one JSON line with every figure.
Run: .venv/bin/python bench/retrieval.py --release ../shared/data/releases/milvus_docs_2.4.x_en.zip
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks import build, chunking, embedding, markdown, release, store  # noqa: E402
from tasks.evaluate import aggregate, load_gold, score  # noqa: E402
from tasks.objectstore import LocalStore  # noqa: E402
from tasks.retrieve import covered, search  # noqa: E402
from tasks.settings import load_settings  # noqa: E402

DEFAULT_CHUNKING = {"max_characters": 1500, "new_after_n_chars": 1000, "combine_text_under_n_chars": 200}


def tutorial_items(root: Path) -> list[dict]:
    """The Milvus "Build RAG" tutorial: every file split on "# ", the raw text embedded."""
    items = []
    for path in sorted(root.rglob("*.md")):
        rel = path.relative_to(root).as_posix()
        for piece in path.read_text("utf-8").split("# "):
            if piece.strip():
                items.append({"doc_path": rel, "heading": "", "text": piece, "embed": piece, "search": piece})
    return items


def markdown_items(root: Path, chunking_config: dict, with_headings: bool, bm25_context: bool = True) -> list[dict]:
    parsed = markdown.parse_release(root)
    chunks = chunking.chunk_documents(parsed.documents, chunking_config, "bench")
    return [{"doc_path": c.doc_path, "heading": c.heading, "text": c.text,
             "embed": c.embed_text if with_headings else c.text,
             "search": c.search_text if bm25_context else c.text} for c in chunks]


class CachedEmbedder:
    def __init__(self, embedder):
        self.embedder, self.cache = embedder, {}

    def embed(self, texts: list[str]) -> list[list[float]]:
        missing = list(dict.fromkeys(t for t in texts if t not in self.cache))
        for start in range(0, len(missing), 256):
            batch = missing[start:start + 256]
            self.cache.update(zip(batch, self.embedder.embed(batch)))
        return [self.cache[t] for t in texts]


def evaluate_variant(client, name: str, items: list[dict], embedder, gold: list[dict], hybrid: bool,
                     settings, rrf_k: int) -> tuple[dict, list[list[dict]]]:
    vectors = embedder.embed([i["embed"] for i in items])
    build.create_collection(client, name, len(vectors[0]), bm25=hybrid, info={})
    rows = [build.row(SimpleNamespace(id=hashlib.sha256(f"{n}:{i['doc_path']}".encode()).hexdigest()[:32],
                                      doc_path=i["doc_path"], title="", heading=i["heading"][:4000],
                                      text=i["text"][:60000], search_text=i["search"][:60000]), v, "bench")
            for n, (i, v) in enumerate(zip(items, vectors))]
    for batch in build.batched(rows, build.COPY_BATCH_ROWS):
        store.upsert(client, name, batch)
    questions = [g["question"] for g in gold]
    hits = search(client, name, embedder.embed(questions), questions, 10, hybrid=hybrid, rrf_k=rrf_k)
    scored = [score(g, h, not covered(h, settings.min_relevance, settings.weak_relevance)) for g, h in zip(gold, hits)]
    return {"chunks": len(items), **aggregate(scored)}, hits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--release", default="../shared/data/releases/milvus_docs_2.4.x_en.zip")
    parser.add_argument("--gold", default="../shared/eval/dev.jsonl")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="docsrag-retrieval-"))
    os.environ["DOCSRAG_HOME"] = str(work)
    settings = load_settings()
    rel = release.fetch_release(args.release, home=work, store=LocalStore(work / "objects"))
    root = release.extract_release(rel, work / "releases", max_bytes=settings.max_archive_bytes,
                                   max_files=settings.max_archive_files)
    gold = load_gold(Path(args.gold))
    embedder = CachedEmbedder(embedding.embedder_for(settings))
    client = store.connect(settings)
    small = {"max_characters": 800, "new_after_n_chars": 500, "combine_text_under_n_chars": 200}
    default = markdown_items(root, DEFAULT_CHUNKING, True)
    variants = [  # label, chunks, hybrid, RRF k
        ("tutorial: split on '# ', dense", tutorial_items(root), False, 60),
        ("markdown chunks, dense", markdown_items(root, DEFAULT_CHUNKING, False), False, 60),
        ("+ title/heading path embedded, dense", default, False, 60),
        ("+ BM25 on the chunk text, RRF k=60", markdown_items(root, DEFAULT_CHUNKING, True, False), True, 60),
        ("+ doc path and headings in the BM25 text", default, True, 60),
        ("+ RRF k=10", default, True, 10),
        ("+ RRF k=5 [default]", default, True, 5),
        ("smaller chunks (800/500), RRF k=10", markdown_items(root, small, True), True, 10),
        ("tutorial chunks, hybrid, RRF k=10", tutorial_items(root), True, 10),
    ]
    results, default_hits = {}, None
    print("| variant | chunks | recall@1 | recall@3 | recall@5 | recall@10 | MRR@10 | contains | not covered |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, (label, items, hybrid, rrf_k) in enumerate(variants):
        figures, hits = evaluate_variant(client, f"bench_{n}", items, embedder, gold, hybrid, settings, rrf_k)
        results[label] = figures
        default_hits = hits if "[default]" in label else default_hits
        print(f"| {label} | {figures['chunks']} | {figures['recall@1']} | {figures['recall@3']} | "
              f"{figures['recall@5']} | {figures['recall@10']} | {figures['mrr@10']} | {figures['contains']} | "
              f"{figures['not_covered_unanswerable']} |", flush=True)
    print("\n| rule | unanswerable said 'not covered' | answerable wrongly 'not covered' |")
    print("|---|---|---|")
    answerable = [bool(g["gold_sources"]) for g in gold]
    sweep = {}
    rules = {f"cosine < {t}": (t, t) for t in (0.3, 0.35, 0.4, 0.45)}
    rules |= {f"cosine < 0.3, or < {w} without dense/BM25 agreement": (0.3, w) for w in (0.35, 0.4, 0.45, 0.5)}
    for rule, (low, weak) in rules.items():
        said = [not covered(h, low, weak) for h in default_hits]
        hit = sum(s for s, a in zip(said, answerable) if not a)
        lost = sum(s for s, a in zip(said, answerable) if a)
        sweep[rule] = {"unanswerable": f"{hit}/{answerable.count(False)}", "answerable_lost": lost}
        print(f"| {rule} | {hit}/{answerable.count(False)} | {lost}/{answerable.count(True)} |")
    print(json.dumps({"variants": results, "not_covered_sweep": sweep}))


if __name__ == "__main__":
    main()
