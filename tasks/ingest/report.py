"""What a run tells people: Prefect artifacts for the UI and a JSON summary for machines."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from prefect import get_client
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from tqdm import tqdm

from docsrag.tasks.core.escaping import for_markdown, for_terminal
from docsrag.tasks.core.redaction import redact_text
from docsrag.tasks.core.summaries import IngestSummary
from docsrag.tasks.core.terminal import current

SHOWN_PROBLEMS = 50  # files named one by one in the log; the artifact and the JSON hold them all


def progress_bar(total: int, desc: str) -> tqdm:
    """A bar on a terminal only: in a log (stderr to a file or a pipe) each redraw is a line of its
    own and the final one was written twice (the last update, then close). On a terminal the bar is
    cleared when done (``leave=False``): the flow's "Embedded N chunks" line states the result once."""
    terminal = current()
    shown = terminal is not None and not terminal.quiet and total and sys.stderr.isatty()
    return tqdm(total=total, unit="chunk", desc=desc, disable=not shown, leave=False)


class StageClock:
    """Seconds spent per named stage, in the order the stages ran. Started from the terminal,
    the first stages are ``start-up`` (interpreter, imports, settings) and ``prefect-api``
    (Prefect's temporary server, the flow run's creation), so the table adds up to the command."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._open: dict[str, float] = {}
        self.started = time.perf_counter()
        terminal = current()
        if terminal and terminal.api_wait_from and not terminal.counted:
            terminal.counted = True
            self.seconds["start-up"] = round(terminal.api_wait_from - terminal.process_started, 3)
            self.seconds["prefect-api"] = round(self.started - terminal.api_wait_from, 3)
            self.started = terminal.process_started

    @contextmanager
    def __call__(self, stage: str):
        start = self._open[stage] = time.perf_counter()
        try:
            yield
        finally:
            del self._open[stage]
            self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - start, 3)

    def run(self, stage: str, step, *args, **kwargs):
        """``step(*args, **kwargs)``, timed as ``stage``: a flow reads one line per stage."""
        with self(stage):
            return step(*args, **kwargs)

    def elapsed(self, stage: str) -> float:
        """Seconds so far in a stage still running (or done)."""
        return self.seconds.get(stage, 0.0) + (time.perf_counter() - self._open[stage] if stage in self._open else 0.0)

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
    for kind, problem in problems[:SHOWN_PROBLEMS]:  # paths and reasons come from the archive: escaped
        logger.warning("%s %s: %s", kind, for_terminal(problem["path"][:300]),
                       for_terminal(redact_text(problem["reason"][:500])))
    if len(problems) > SHOWN_PROBLEMS:
        logger.warning("... and %d more (see the run's summary artifact)", len(problems) - SHOWN_PROBLEMS)


def publish_artifacts(summary: IngestSummary, documents: dict[str, str], chunks_per_doc: dict[str, int]) -> None:
    key = summary.alias.replace("_", "-")
    create_markdown_artifact(markdown=summary_markdown(summary), key=f"{key}-ingest-summary",
                             description=f"Ingest of {summary.release}")
    rows = [{"document": path, "status": status, "chunks": chunks_per_doc.get(path, 0)}
            for path, status in documents.items()]
    create_table_artifact(table=rows, key=f"{key}-ingest-documents", description="Documents and their chunks")


def summary_markdown(s: IngestSummary) -> str:
    """The run's summary artifact. Paths and reasons come from the archive (and errors may quote
    URLs): literal, redacted text, never markup of their own (tasks/core/escaping.py)."""
    docs = s.document_changes
    lines = [
        f"# Ingest of docs {s.version}: {'unchanged' if s.unchanged else 'published'}",
        "",
        "| | |",
        "|---|---|",
        f"| release | {for_markdown(redact_text(s.release))} |",
        f"| sha256 | `{s.sha256}` ({s.size:,} bytes) |",
        f"| documents | {s.documents} (added {docs['added']}, changed {docs['changed']}, "
        f"removed {docs['removed']}, unchanged {docs['unchanged']}) |",
        f"| chunks | {s.chunks} (embedded {s.embedded}, reused {s.reused}, resumed {s.resumed}, deleted {s.deleted}) |",
        f"| collection | `{s.collection}` served as `{s.alias}` and `{s.version_alias}` |",
        f"| previous collection | `{s.previous_collection}` |",
        # A damaged collection --force moved out: where it is kept, for whoever reads the run later.
        *(f"| set aside, damaged | `{a['collection']}`, kept in {for_markdown(a['kept_in'])} |" for a in s.set_aside),
        f"| search | {s.search} |",
        f"| seconds | {s.seconds} (about {s.seconds_saved} s saved by reusing vectors) |",
        "",
        "## Seconds per stage",
        "",
        "| stage | seconds |",
        "|---|---|",
        *(f"| {stage} | {sec} |" for stage, sec in s.stages.items()),
    ]
    for title, items in (("Skipped files", s.skipped), ("Parsed best-effort", s.warnings)):
        if items:
            lines += ["", f"## {title}", "", "| file | reason |", "|---|---|"]
            lines += [f"| {for_markdown(item['path'])} | {for_markdown(redact_text(item['reason']))} |"
                      for item in items]
    return "\n".join(lines)
