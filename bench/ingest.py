"""Ingest as a user runs it: `docsrag ingest` wall time against the embedding it replaces, one run.

Each figure is one `docsrag ingest` process on the embedded defaults (Milvus Lite, the packaged
models, the precision `auto` measured on this CPU), timed from start to exit; the model's export
and the precision measurement happen once, in a warm-up FAQ ingest, as they do once per machine.

- cli_wall_s: 2.4.x on a fresh home (both models: MiniLM and the multilingual field); its ratio
  to `baseline_s`, the same chunk texts embedded by sentence-transformers fp32 (MiniLM alone, every
  core) in this same run: target <= 0.4;
- unchanged_wall_s: the same release again, the median of 5 runs (target <= 5 s; each run waits 0-1 s
  at its end for Prefect's heartbeat thread, which sleeps in 1 s steps); kept_start_s: its start (start-up +
  prefect-api) on the Prefect server the first command kept in the background (target <= 2 s);
  faq_wall_s: the 4-file FAQ zip on a fresh home (target <= 6 s); each with its stage table
  (start-up and prefect-api included); the unchanged run again with a temporary server per command,
  for comparison; then `docsrag server stop` and a look for any process of the server left;
- quality: dev-set recall@5 / MRR@10 of the fresh index, English and ko/id as asked (the 20 of
  ../shared/eval and the 60 of bench/eval), beside the figures before this change, within 0.01;
- peak RSS of the CLI processes (< 2 GiB).
Every figure is printed beside the CPU model and its flags: the development machines differ ~3x.
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
TARGETS = {"cli_wall_ratio": 0.4, "unchanged_wall_s": 5.0, "kept_start_s": 2.0, "faq_wall_s": 6.0, "peak_rss_mb": 2048}
# Before this change, on the CPU these targets were last measured on (2-core AMD EPYC, AVX-512 VNNI: int8;
# the session-start code, the multilingual field on whole chunks), the same CLI and `docsrag eval`.
# Two builds of identical vectors differ by up to 0.017 MRR on the 60 (Milvus Lite's top-10 order
# among near-equal and duplicate chunks): judge a change within 0.01 by bench/retrieval.py --cuts,
# which compares variants on one build each of the same chunks.
QUALITY_BEFORE = {"en": {"recall@5": 1.0, "mrr@10": 0.897}, "ko_id": {"recall@5": 0.85, "mrr@10": 0.727},
                  "ko_id_more": {"recall@5": 0.833, "mrr@10": 0.700}}


def run(home: Path, *args: str, **env: str) -> tuple[float, dict]:
    """One CLI command as a user runs it; -> (wall seconds, its JSON)."""
    start = time.perf_counter()
    done = subprocess.run([DOCSRAG, *args, "--json"], env={**os.environ, "DOCSRAG_HOME": str(home), **env},
                          cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"docsrag {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start, json.loads(done.stdout.splitlines()[-1])


def quality(home: Path, gold: str) -> dict:
    _, figures = run(home, "eval", "--gold", gold)
    return {"recall@5": figures["recall@5"], "mrr@10": figures["mrr@10"]}


def baseline(home: Path, release_sha: str) -> tuple[float, int]:
    """The release's chunk texts embedded by sentence-transformers fp32 (MiniLM, every core), as
    before any of the ONNX work. -> (seconds, chunks)"""
    from docsrag.tasks.core.settings import load_settings
    from docsrag.tasks.embed import embedding
    from docsrag.tasks.ingest import chunking, markdown

    settings = load_settings(home=home, embedding_precision="torch", multilingual="off")
    parsed = markdown.parse_release(home / "releases" / release_sha)
    texts = [c.embed_text for c in chunking.chunk_documents(parsed.documents, settings.chunking_config, "bench")]
    embedder = embedding.LocalEmbedder(settings.embedding_model)
    embedder.embed(texts[:32])  # torch's first call allocates
    start = time.perf_counter()
    for first in range(0, len(texts), settings.embedding_batch_size):
        embedder.embed(texts[first:first + settings.embedding_batch_size])
    return time.perf_counter() - start, len(texts)


def stop_server(prefect_home: Path) -> dict:
    """`docsrag server stop`, then a look for any process of the server left (by its pid and port)."""
    from docsrag.flows.cli.local_server import background_server

    found = background_server(prefect_home)
    stopping = time.perf_counter()
    subprocess.run([DOCSRAG, "server", "stop"], env={**os.environ, "PREFECT_HOME": str(prefect_home)},
                   capture_output=True, check=True)
    left = found and _still_running(str(found.port))
    return {"server_stop_s": round(time.perf_counter() - stopping, 2), "server_gone_after_stop": not left}


def _still_running(port: str) -> list[str]:
    """Any process whose command line names the server's port (the server itself while it runs; an
    exited one waiting to be reaped has no command line)."""
    return [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and _listens_on(p, port)]


def _listens_on(process: Path, port: str) -> bool:
    try:
        return port in (process / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--release", default=str(ROOT.parent / "shared/data/releases/milvus_docs_2.4.x_en.zip"))
    parser.add_argument("--faq", default=str(ROOT.parent / "shared/data/releases/milvus_docs_faq_2.4.x_en.zip"))
    parser.add_argument("--gold", default=str(ROOT.parent / "shared/eval/dev.jsonl"))
    parser.add_argument("--ko-id", default=str(ROOT.parent / "shared/eval/dev_ko_id.jsonl"))
    parser.add_argument("--ko-id-more", default=str(ROOT / "bench/eval/dev_ko_id_more.jsonl"))
    args = parser.parse_args()
    from docsrag.tasks.embed import runtime

    scratch = Path(tempfile.mkdtemp(prefix="docsrag-bench-"))
    # As a user's shell: none of Prefect's settings (the command sets its own defaults).
    for name in ("PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK", "DOCSRAG_PREFECT_SERVER"):
        os.environ.pop(name, None)
    os.environ["PREFECT_HOME"] = str(scratch / "prefect")
    # The first command on the machine: the export and precision measurement, and the server it keeps.
    first_wall_s, first = run(scratch / "warm", "ingest", "--release", args.faq)
    try:
        cli_wall_s, summary = run(scratch / "default", "ingest", "--release", args.release)
        reruns = sorted((run(scratch / "default", "ingest", "--release", args.release) for _ in range(5)),
                        key=lambda done: done[0])
        unchanged_wall_s, unchanged = reruns[len(reruns) // 2]
        faq_wall_s, faq = run(scratch / "faq", "ingest", "--release", args.faq)
        temporary_wall_s, temporary = run(scratch / "default", "ingest", "--release", args.release,
                                          DOCSRAG_PREFECT_SERVER="temporary", PREFECT_HOME=str(scratch / "temporary"))
        peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        measured_quality = {name: quality(scratch / "default", gold) for name, gold in
                            (("en", args.gold), ("ko_id", args.ko_id), ("ko_id_more", args.ko_id_more))}
    finally:
        stopped = stop_server(scratch / "prefect")
    baseline_s, chunks = baseline(scratch / "default", summary["sha256"])
    start = {name: round(stages["start-up"] + stages["prefect-api"], 2) for name, stages in (
        ("first", first["stages"]), ("unchanged", unchanged["stages"]), ("temporary", temporary["stages"]))}

    from docsrag.tasks.core.settings import load_settings
    from docsrag.tasks.embed import embedding

    figures = {
        "cpu": runtime.cpu(), "cores": os.cpu_count(), "release": summary["version"], "chunks": chunks,
        "embedder": embedding.resolve(load_settings(home=scratch / "default")).id,
        "precision": embedding.resolve(load_settings(home=scratch / "default")).variant,
        "cli_wall_s": round(cli_wall_s, 2), "baseline_s": round(baseline_s, 2),
        "cli_wall_ratio": round(cli_wall_s / baseline_s, 3),
        "unchanged_wall_s": round(unchanged_wall_s, 2), "unchanged": all(done["unchanged"] for _, done in reruns),
        "unchanged_walls_s": [round(wall, 2) for wall, _ in reruns],
        "faq_wall_s": round(faq_wall_s, 2), "peak_rss_mb": round(peak_rss_mb),
        "quality": measured_quality, "quality_before": QUALITY_BEFORE,
        "quality_within_0.01": all(measured_quality[s][k] >= QUALITY_BEFORE[s][k] - 0.01
                                   for s in QUALITY_BEFORE for k in QUALITY_BEFORE[s]),
        "kept_start_s": start["unchanged"], "first_command_start_s": start["first"],
        "first_command_wall_s": round(first_wall_s, 2), "temporary_unchanged_wall_s": round(temporary_wall_s, 2),
        "temporary_start_s": start["temporary"], **stopped,
        "stages": summary["stages"], "unchanged_stages": unchanged["stages"], "faq_stages": faq["stages"],
    }
    figures["of_target"] = {name: round(figures[name] / limit, 3) for name, limit in TARGETS.items()}
    print(f"CPU: {figures['cpu']} ({figures['cores']} cores; shared machines: judge by the ratios)")
    for name, limit in TARGETS.items():
        print(f"{name}: {figures[name]} (target <= {limit}; {figures['of_target'][name]} of it)")
    print(f"quality en / ko-id recall@5, MRR@10: {measured_quality} (before: {QUALITY_BEFORE})")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
