"""What a run tells people: Prefect artifacts for the UI and a JSON summary for machines."""

from __future__ import annotations

import time
from contextlib import contextmanager

from prefect import get_client
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

SHOWN_PROBLEMS = 50  # files named one by one in the log; the artifact and the JSON hold them all


class StageClock:
    """Seconds spent per named stage, in the order the stages ran."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - start, 3)

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self.started, 3)


def name_run(name: str) -> None:
    """Runs named for what they did (``ingest 2.5.x (3,371 new)``), not ``crouching-loon``."""
    run_id = flow_run.get_id()
    if run_id:
        with get_client(sync_client=True) as client:
            client.update_flow_run(run_id, name=name)


def log_problems(logger, skipped: list[dict], warnings: list[dict]) -> None:
    """One WARNING per file that was skipped or indexed best-effort, with its reason."""
    problems = [("skipped", p) for p in skipped] + [("warning", p) for p in warnings]
    for kind, problem in problems[:SHOWN_PROBLEMS]:
        logger.warning("%s %s: %s", kind, problem["path"][:300], problem["reason"][:500])
    if len(problems) > SHOWN_PROBLEMS:
        logger.warning("... and %d more (see the run's summary artifact)", len(problems) - SHOWN_PROBLEMS)


def publish_artifacts(summary: dict, documents: dict[str, str], chunks_per_doc: dict[str, int]) -> None:
    key = summary["alias"].replace("_", "-")
    create_markdown_artifact(markdown=summary_markdown(summary), key=f"{key}-ingest-summary",
                             description=f"Ingest of {summary['release']}")
    rows = [{"document": path, "status": status, "chunks": chunks_per_doc.get(path, 0)}
            for path, status in documents.items()]
    create_table_artifact(table=rows, key=f"{key}-ingest-documents", description="Documents and their chunks")


def summary_markdown(s: dict) -> str:
    docs = s["document_changes"]
    lines = [
        f"# Ingest of docs {s['version']}: {'unchanged' if s['unchanged'] else 'published'}",
        "",
        "| | |",
        "|---|---|",
        f"| release | `{s['release']}` |",
        f"| sha256 | `{s['sha256']}` ({s['size']:,} bytes) |",
        f"| documents | {s['documents']} (added {docs['added']}, changed {docs['changed']}, "
        f"removed {docs['removed']}, unchanged {docs['unchanged']}) |",
        f"| chunks | {s['chunks']} (embedded {s['embedded']}, reused {s['reused']}, deleted {s['deleted']}) |",
        f"| collection | `{s['collection']}` served as `{s['alias']}` and `{s['version_alias']}` |",
        f"| previous collection | `{s['previous_collection']}` |",
        f"| search | {s['search']} |",
        f"| seconds | {s['seconds']} (about {s['seconds_saved']} s saved by reusing vectors) |",
        "",
        "## Seconds per stage",
        "",
        "| stage | seconds |",
        "|---|---|",
        *(f"| {stage} | {sec} |" for stage, sec in s["stages"].items()),
    ]
    for title, items in (("Skipped files", s["skipped"]), ("Parsed best-effort", s["warnings"])):
        if items:
            lines += ["", f"## {title}", "", "| file | reason |", "|---|---|"]
            lines += [f"| `{item['path']}` | {item['reason']} |" for item in items]
    return "\n".join(lines)
