"""What the command groups share: argument parents, parse-time validators, terminal-safe text,
the Prefect API for commands that run flows, and the questions service."""

from __future__ import annotations

import argparse
import functools
import sys
import time
from dataclasses import dataclass

from docsrag.tasks.core.escaping import for_terminal
from docsrag.tasks.core.settings import Settings


def json_output() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--json", action="store_true", help="print JSON")
    return parent


def docs_choice(what: str = "search") -> argparse.ArgumentParser:
    """--version and --lang: which served docs a command reads."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--version", help=f"{what} this docs version instead of the newest")
    parent.add_argument("--lang", help=f"{what} the localized docs in this language (ko, id...; default English)")
    return parent


def bounded_int(low: int, high: int):
    """An argparse type: an integer in [low, high], refused at parse time otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not between {low} and {high}")
        return value

    parse.__name__ = f"integer {low}..{high}"
    return parse


positive = bounded_int(1, 100)


def non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is not a number of seconds >= 0")
    return value


def printable(text: str) -> str:
    """Text from documents or questions, safe for a terminal: C0/C1 controls (escape sequences
    that could rewrite the screen) and bidi overrides printed as their code (tasks/core/escaping.py)."""
    return for_terminal(text)


def runs_flows(command):
    """A command that runs flows gets a Prefect API: the configured server, else Prefect's own server
    kept in the background (started by the first command that needs it) or a temporary one
    (``DOCSRAG_PREFECT_SERVER``; flows/cli/local_server.py), started as the command's first act. The
    command is given ``wait_for_api`` and calls it after the work that can overlap the server's start."""

    @functools.wraps(command)
    def with_api(args, settings: Settings) -> int:
        from docsrag.flows.cli import console
        from docsrag.flows.cli.local_server import prefect_api

        with prefect_api(settings.prefect_server, on_wait=_api_wait_begins, announce=_kept_server_started) as wait, \
                console.view(getattr(args, "console", "default")):
            return command(args, settings, _noting_private_server(wait))

    return with_api


def _noting_private_server(wait):
    """``wait``, which tells the writer slot (tasks/index/writer_lock.py) when the API it makes current is the
    command's own local server (kept or temporary) rather than one configured: no other host shares it."""

    def waited() -> None:
        from prefect.settings import PREFECT_API_URL

        configured = PREFECT_API_URL.value()
        wait()
        if (api := PREFECT_API_URL.value()) and api != configured:
            from docsrag.tasks.index import writer_lock

            writer_lock.on_private_prefect(api)

    return waited


def _kept_server_started(ui: str) -> None:
    print(f"docsrag: Prefect's server now runs in the background for the next commands, its UI at {ui} "
          "(`docsrag server stop` stops it)", file=sys.stderr)


def _api_wait_begins() -> None:
    from docsrag.tasks.core.terminal import current

    if terminal := current():
        terminal.api_wait_from = time.perf_counter()


def prefect_server() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def service(settings: Settings, announce: bool = False):
    """The questions service; ``announce``: a new question is announced to the Prefect server
    (when one is configured), flushed before the command exits."""
    from docsrag.tasks.index import store
    from docsrag.tasks.service.service import Service

    announcer = None
    if announce and prefect_server():
        from docsrag.flows.answer import announce_question as announcer
    # Milvus Lite serves one process per file: a command that opened it would keep a worker started
    # beside it (or after it, in the same process tree) from opening the index. Against a Milvus
    # server the repeat check costs one call; on Milvus Lite the API (one long-lived process) does it.
    server = store.is_server(settings.milvus_uri)
    return Service(settings, announce=announcer, check_repeats=server)


def api_holding_index(settings: Settings) -> RunningApi | None:
    """The `docsrag api` process that holds the Milvus Lite folder, when one does. The embedded tier
    serves one process: beside it, `ask` leaves the answering to its worker and `search` asks it."""
    from pathlib import Path

    from docsrag.tasks.index import store

    if store.is_server(settings.milvus_uri) or not (holder := store.lite_holder(Path(settings.milvus_uri))):
        return None
    argv = list(holder.argv)
    if "api" not in argv or not any(word.endswith("docsrag") for word in argv[:argv.index("api")]):
        return None
    host = _option(argv, "--host", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # listening everywhere: loopback reaches it
    return RunningApi(holder.pid, f"http://{host}:{_option(argv, '--port', '8080')}", answers="--answer" in argv)


def _option(argv: list[str], name: str, default: str) -> str:
    """An option's value as argparse read it: ``--port 8081`` or ``--port=8081``."""
    for word, after in zip(argv, argv[1:] + [""]):
        if word == name and after:
            return after
        if word.startswith(f"{name}="):
            return word.split("=", 1)[1]
    return default


@dataclass(frozen=True)
class RunningApi:
    pid: int
    url: str
    answers: bool  # started with --answer: its worker answers the queue

    def call(self, settings: Settings, method: str, path: str, what: str, **request) -> dict:
        """A request to it with this machine's first API token (an operator's first): the JSON body,
        or a DocsragError saying it does not answer or what it refused."""
        import httpx

        from docsrag.tasks.core.errors import DocsragError

        token = next(iter(api_tokens(settings)), None)
        try:
            answer = httpx.request(method, f"{self.url}{path}", timeout=120, **request,
                                   headers={"Authorization": f"Bearer {token}"} if token else {})
        except httpx.HTTPError as exc:
            raise DocsragError(f"`docsrag api` (pid {self.pid}) holds the index but {self.url} does not answer "
                               f"({exc}); stop it and {what} again") from None
        if answer.status_code >= 300:
            json_body = "json" in answer.headers.get("content-type", "")
            reason = answer.json().get("reason") if json_body else answer.text[:200]
            raise DocsragError(f"the running `docsrag api` (pid {self.pid}) refused to {what}: {reason}")
        return answer.json()


def api_tokens(settings: Settings) -> list[str]:
    """The API tokens this machine's settings hold (an operator's first), for a call to its own API."""
    from docsrag.tasks.core.settings import split_setting

    held = [settings.api_operator_tokens, settings.api_tokens]
    return [token for secret in held if secret for token in split_setting(secret.get_secret_value())]
