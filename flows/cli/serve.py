"""Long-running and server-side commands: api (the HTTP API and its page), automations, and the
Prefect server kept in the background (server start|stop|status)."""

from __future__ import annotations

import json
import sys

from docsrag.flows.cli.common import bounded_int, json_output, prefect_server
from docsrag.tasks.core.settings import Settings


def add_commands(commands) -> None:
    api = commands.add_parser("api", help="serve the questions API and the page to ask on (FastAPI on uvicorn)")
    api.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default loopback; any other needs DOCSRAG_API_TOKENS)")
    api.add_argument("--port", type=bounded_int(1, 65535), default=8080)
    api.add_argument("--answer", action="store_true",
                     help="answer the queue in this process too (the embedded tier: Milvus Lite serves one process)")
    api.set_defaults(run=_api)

    automations = commands.add_parser(
        "automations", parents=[json_output()],
        help="create the shipped automations (failed runs, stale index, dead questions) on the "
             "Prefect server, notifying DOCSRAG_NOTIFY_WEBHOOK_URL or DOCSRAG_NOTIFY_BLOCK")
    automations.set_defaults(run=_automations)

    server = commands.add_parser(
        "server", parents=[json_output()],
        help="Prefect's server kept in the background for docsrag commands with no PREFECT_API_URL")
    server.add_argument("action", choices=("start", "stop", "status"))
    server.set_defaults(run=_server)


def _api(args, settings: Settings) -> int:
    from docsrag.flows.api.app import serve
    from docsrag.tasks.service.guard import loopback

    if not settings.api_tokens and not loopback(args.host):
        print(f"docsrag api: set DOCSRAG_API_TOKENS to listen on {args.host}: without tokens the API answers "
              "loopback clients only", file=sys.stderr)
        return 2
    serve(settings, args.host, args.port, answer_here=args.answer)
    return 0


def _automations(args, settings: Settings) -> int:
    if not prefect_server():
        print("docsrag automations: set PREFECT_API_URL to the Prefect server to create them on", file=sys.stderr)
        return 2
    from docsrag.tasks.ops.automations import apply_automations, notification_block

    names = apply_automations(notification_block(settings))
    print(json.dumps({"automations": names}) if args.json else "\n".join(f"created: {name}" for name in names))
    return 0


def _server(args, settings: Settings) -> int:
    from docsrag.flows.cli import local_server

    if args.action == "stop":
        stopped = local_server.stop_kept()
        print(json.dumps({"stopped": stopped and stopped.pid}) if args.json else
              f"stopped Prefect's server (pid {stopped.pid})" if stopped else "no Prefect server runs in the background")
        return 0
    if args.action == "start":
        local_server.kept_server().wait_ready()
    found = local_server.background_server()
    ui = found and found.ui
    errors = local_server.logged_errors() if found else local_server.LoggedErrors(0, None)
    if args.json:
        print(json.dumps({"running": bool(found), "pid": found and found.pid, "ui": ui,
                          "errors_logged": errors.count, "last_error": errors.last}))
    elif found:
        print(f"Prefect's server runs in the background (pid {found.pid}), its UI at {ui}; "
              "`docsrag server stop` stops it")
        if errors.count:  # a scheduler failing on every loop says so nowhere else
            print(f"it logged {errors.count} error(s) since it started ({local_server.prefect_home() / 'server.log'}); "
                  f"the last: {errors.last}")
    else:
        print("no Prefect server runs in the background")
    return 0
