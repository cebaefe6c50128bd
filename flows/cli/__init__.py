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
import difflib
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


INTERRUPTED = "interrupted: run the same command again to resume"


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """``started``: when the process started (the console script); a caller in a running process
    (a test) starts the clock here."""
    from docsrag.tasks.core.terminal import Terminal, from_terminal

    defaults.apply()  # before anything imports Prefect (flows/cli/defaults.py)
    args = parse(argv)
    terminal = Terminal(process_started=started or time.perf_counter(), quiet=args.quiet)
    debug = args.debug
    try:
        # Fail before starting Prefect when the configuration is wrong.
        with given(load_settings(release_url=getattr(args, "release", None))) as settings, from_terminal(terminal):
            debug = args.debug or settings.debug
            args.console = "debug" if debug else "quiet" if args.quiet else "verbose" if args.verbose else "default"
            code = args.run(args, settings)
            sys.stdout.flush()  # a reader gone (`| head -1`) is met here, not at the interpreter's exit
            return code
    except SettingsError as exc:
        print(f"docsrag: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{INTERRUPTED}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _reader_gone()
    except DocsragError as exc:  # says what failed, why and what to do: at most three lines, no traceback
        if debug:
            traceback.print_exc()
        print(f"docsrag {args.command}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug must look like a bug: its traceback, then what it was
        traceback.print_exc()
        print(f"docsrag {args.command}: unexpected {type(exc).__name__}: {exc} (the traceback above; please "
              "report it)", file=sys.stderr)
        return 1


def _reader_gone() -> int:
    """The reader of stdout closed it (``| head -1``): nothing more to say to anyone. stdout points
    at /dev/null from here, so the interpreter's last flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, what a shell shows for a command its pipe's reader left


def parser() -> argparse.ArgumentParser:
    built = argparse.ArgumentParser(prog="docsrag", description="Keep a docs release searchable and answerable.")
    commands = built.add_subparsers(dest="command", required=True)
    for group in (index, questions, serve):
        group.add_commands(commands)
    for command in commands.choices.values():
        _add_output_choice(command)
    return built


def _add_output_choice(command: argparse.ArgumentParser) -> None:
    """How much a command prints while it runs (flows/cli/console.py); --debug shows tracebacks."""
    said = command.add_mutually_exclusive_group()
    said.add_argument("-v", "--verbose", action="store_true",
                      help="also print Prefect's own lines (task states); they are in its UI either way")
    said.add_argument("-q", "--quiet", action="store_true", help="print only the result (and errors)")
    command.add_argument("--debug", action="store_true",
                         help="print tracebacks of expected errors too (or DOCSRAG_DEBUG=1)")


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The arguments; an option the command does not know is refused by the command's own parser,
    with its usage and the closest option it has (argparse would print the top-level usage)."""
    top = parser()
    args, unknown = top.parse_known_args(argv)
    if unknown:
        command = top._subparsers._group_actions[0].choices[args.command]
        command.error(f"unrecognized arguments: {' '.join(_with_guess(command, word) for word in unknown)}")
    return args


def _with_guess(command: argparse.ArgumentParser, word: str) -> str:
    if not word.startswith("-"):
        return word
    options = [option for action in command._actions for option in action.option_strings]
    guess = difflib.get_close_matches(word.split("=", 1)[0], options, n=1)
    return f"{word} (did you mean {guess[0]}?)" if guess else word


if __name__ == "__main__":
    run()
