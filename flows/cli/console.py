"""What Prefect's console logging shows while a ``docsrag`` command runs a flow.

Prefect prints every task run's state (``Finished in state Completed()``, two per embedding batch)
and, when a flow fails, the exception's traceback: a person at a terminal reads the flow's own
lines, one per stage, and the command's one line about what failed. Everything still reaches
Prefect's API (its handler is another one), so the UI keeps the whole story.

- ``quiet``: errors only (the command prints its summary);
- ``default``: the flows' own lines, the run's UI link and Prefect's retry notices;
- ``verbose``: everything Prefect prints, tracebacks of the errors a person can act on left out;
- ``debug``: everything, as Prefect prints it.

Each line is written above the progress bar (tqdm clears it, writes, draws it again), never
after it on the bar's own line.
"""

from __future__ import annotations

import copy
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from docsrag.tasks.core.errors import DocsragError

Mode = Literal["quiet", "default", "verbose", "debug"]


class _AboveTheBar(logging.Handler):
    """Prefect's console handler, behind the choice of lines and tqdm's write mode."""

    def __init__(self, inner: logging.Handler, mode: Mode):
        super().__init__(inner.level)
        self.inner, self.mode = inner, mode
        self.prefect = str(Path(__import__("prefect").__file__).parent)

    def emit(self, record: logging.LogRecord) -> None:
        shown = self.shown(record)
        if shown is None:
            return
        from tqdm import tqdm

        with tqdm.external_write_mode(file=sys.stderr):
            self.inner.handle(shown)

    def shown(self, record: logging.LogRecord) -> logging.LogRecord | None:
        if self.mode == "debug":
            return record
        from_prefect = record.pathname.startswith(self.prefect)
        if self.mode == "quiet":
            return None if from_prefect or record.levelno < logging.ERROR else _without_our_traceback(record)
        if self.mode == "default" and from_prefect and not _kept_from_prefect(record):
            return None
        return _without_our_traceback(record)


def _kept_from_prefect(record: logging.LogRecord) -> bool:
    """Of Prefect's own lines, by default: the run's UI link, a retry about to happen, and warnings
    from outside the engines (the client, the server). Task states and the failure of the run are
    left out: the command says how it ended, in one line (or with the traceback of a bug)."""
    message = str(record.msg)
    if message.startswith("View at ") or "Retry %s/%s will start" in message:
        return True
    return record.levelno >= logging.WARNING and not record.name.startswith(("prefect.flow_runs", "prefect.task_runs"))


def _without_our_traceback(record: logging.LogRecord) -> logging.LogRecord:
    """A DocsragError's message says what to do; its traceback is for --debug."""
    if record.exc_info and isinstance(record.exc_info[1], DocsragError):
        record = copy.copy(record)
        record.exc_info, record.exc_text = None, None
    return record


@contextmanager
def view(mode: Mode) -> Iterator[None]:
    """Prefect's console handlers (on the root logger) wrapped while the command runs."""
    import prefect.main  # noqa: F401 - sets up Prefect's logging (at its first use), whose handlers are wrapped here
    from prefect.logging.handlers import PrefectConsoleHandler

    root = logging.getLogger()
    wrapped: dict[int, tuple[PrefectConsoleHandler, object]] = {}
    for n, handler in enumerate(root.handlers):
        if isinstance(handler, PrefectConsoleHandler):
            # The command's stderr as it is now: Prefect bound the one of the moment its logging was
            # set up (in a process that runs several commands, a test's, maybe closed since).
            wrapped[n] = handler, handler.console.file
            handler.console.file = sys.stderr
            root.handlers[n] = _AboveTheBar(handler, mode)
    try:
        yield
    finally:
        for n, (handler, stream) in wrapped.items():
            handler.console.file = stream
            if n < len(root.handlers) and isinstance(root.handlers[n], _AboveTheBar):
                root.handlers[n] = handler
