"""A run started by the ``docsrag`` command, as the flows see it (no Prefect imports here: the
command reads this before Prefect has loaded)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass
class Terminal:
    """Progress bars go to stderr, and the seconds before the flow's first stage (the process
    starting, Prefect's API) are counted in its stage table."""

    process_started: float  # time.perf_counter() at the process's start
    api_wait_from: float | None = None  # when the command started waiting for Prefect's API
    counted: bool = False  # only the first flow of a command pays for its start
    quiet: bool = False  # --quiet: the result only, no progress bar


_TERMINAL: ContextVar[Terminal | None] = ContextVar("docsrag_terminal", default=None)


def current() -> Terminal | None:
    return _TERMINAL.get()


@contextmanager
def from_terminal(terminal: Terminal) -> Iterator[Terminal]:
    token = _TERMINAL.set(terminal)
    try:
        yield terminal
    finally:
        _TERMINAL.reset(token)
