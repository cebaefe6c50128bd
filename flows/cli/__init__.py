"""``docsrag``: the command line over the flows and the questions service. Settings are built
here, once per command, and handed to the flows it calls (``docsrag.tasks.core.settings.given``); a
deployment's run builds its own.

One module per command group, each adding its commands to the parser with the shared argument
parents of ``docsrag.flows.cli.common``:

- ``docsrag.flows.cli.index``: ingest, search, rollback, watch, eval (the docs index);
- ``docsrag.flows.cli.questions``: ask, show, questions, answer (the queue, through ``docsrag.tasks.service.service``);
- ``docsrag.flows.cli.serve``: api (the HTTP API and page), automations.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback

from docsrag.flows.cli import defaults, index, questions, serve
from docsrag.flows.cli.common import printable  # noqa: F401 - part of the CLI's interface
from docsrag.tasks.core.errors import DocsragError
from docsrag.tasks.core.settings import SettingsError, given, load_settings
from docsrag.tasks.ingest import release


def _process_started() -> float:
    """The process's start on the ``time.perf_counter()`` scale (Linux: /proc; elsewhere: now)."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return time.perf_counter() - max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter()


class Terminated(KeyboardInterrupt):
    """SIGTERM: the platform or the scheduler stops the command."""


def run() -> None:
    """The console script. SIGTERM stops a command promptly: the flow run is marked crashed by
    Prefect, and the process exits without waiting for network reads still blocked in threads."""

    def terminate(signum, frame):
        release.stopping.set()
        raise Terminated()

    signal.signal(signal.SIGTERM, terminate)
    code = main(started=_process_started())
    if release.stopping.is_set():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(143)
    sys.exit(code)


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """``started``: when the process started (the console script); a caller in a running process
    (a test) starts the clock here."""
    from docsrag.tasks.core.terminal import Terminal, from_terminal

    defaults.apply()  # before anything imports Prefect (flows/cli/defaults.py)
    terminal = Terminal(process_started=started or time.perf_counter())
    args = parser().parse_args(argv)
    try:
        # Fail before starting Prefect when the configuration is wrong.
        with given(load_settings(release_url=getattr(args, "release", None))) as settings, from_terminal(terminal):
            return args.run(args, settings)
    except SettingsError as exc:
        print(f"docsrag: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except DocsragError as exc:  # says what failed, why and what to do: one line, no traceback
        print(f"docsrag {args.command}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug must look like a bug: its traceback, then what it was
        traceback.print_exc()
        print(f"docsrag {args.command}: unexpected {type(exc).__name__}: {exc} (the traceback above; please "
              "report it)", file=sys.stderr)
        return 1


def parser() -> argparse.ArgumentParser:
    built = argparse.ArgumentParser(prog="docsrag", description="Keep a docs release searchable and answerable.")
    commands = built.add_subparsers(dest="command", required=True)
    for group in (index, questions, serve):
        group.add_commands(commands)
    return built


if __name__ == "__main__":
    run()
