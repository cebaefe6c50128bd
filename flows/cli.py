"""``docsrag``: the command line over the flows. Settings are built here, once per command, and
handed to the flows it calls (``tasks.settings.given``); a deployment's run builds its own."""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import signal
import sys
import time

from tasks import release
from tasks.escaping import for_terminal
from tasks.settings import Settings, SettingsError, given, load_settings


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
    from tasks.terminal import Terminal, from_terminal

    terminal = Terminal(process_started=started or time.perf_counter())
    args = _parser().parse_args(argv)
    try:
        # Fail before starting Prefect when the configuration is wrong.
        with given(load_settings(release_url=getattr(args, "release", None))) as settings, from_terminal(terminal):
            return args.run(args, settings)
    except SettingsError as exc:
        print(f"docsrag: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the flows' own errors already say what to fix
        print(f"docsrag {args.command}: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="docsrag", description="Keep a docs release searchable and answerable.")
    commands = parser.add_subparsers(dest="command", required=True)

    ingest = commands.add_parser("ingest", help="ingest a docs release into the served collection")
    ingest.add_argument("--release", help="zip URL (https, s3, file) or path; default DOCSRAG_RELEASE_URL")
    ingest.add_argument("--version", help="docs version; default: read from the asset name")
    ingest.add_argument("--force", action="store_true", help="publish even when the guard rails refuse")
    ingest.add_argument("--publish-main", action="store_true",
                        help="serve a release without a version (e.g. docs.zip) as the main alias too")
    ingest.add_argument("--task-runner", metavar="dask[=ADDRESS]",
                        help="embed on Dask: a local cluster, or the scheduler at ADDRESS (default: threads)")
    ingest.add_argument("--json", action="store_true", help="print the run summary as JSON")
    ingest.set_defaults(run=_ingest)

    search = commands.add_parser("search", help="search the served collection")
    search.add_argument("query", nargs="?", help="text to search for")
    search.add_argument("--file", help="JSON lines with id and question; prints one result line each")
    search.add_argument("-k", type=_positive, default=5, help="results per query")
    search.add_argument("--version", help="search this docs version instead of the newest")
    search.add_argument("--lang", help="search the localized docs in this language (ko, id...; default English)")
    search.add_argument("--json", action="store_true")
    search.set_defaults(run=_search)

    ask = commands.add_parser("ask", help="queue a question (and wait for its answer)")
    ask.add_argument("question")
    ask.add_argument("--version", help="answer from this docs version instead of the newest")
    ask.add_argument("--lang", help="answer from the localized docs in this language (default: English docs)")
    ask.add_argument("--answer-in", metavar="LANG", help="ISO 639-1 code to answer in (default: the question's)")
    ask.add_argument("--key", help="client key: asking again with the same key returns the same question")
    ask.add_argument("--priority", type=int, default=0, metavar="N",
                     help="-10..10: each level counts as five minutes of waiting (the rest are never starved)")
    ask.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                     help="wait this long for the answer; answer it here when no worker takes it")
    ask.add_argument("--json", action="store_true")
    ask.set_defaults(run=_ask)

    answer = commands.add_parser("answer", help="drain the queue once: answer until it is empty")
    answer.add_argument("--max", type=int, help="claim at most this many questions")
    answer.add_argument("--max-seconds", type=float, default=3600, help="stop claiming after this long")
    answer.add_argument("-k", type=_positive, help="sources per question (default DOCSRAG_TOP_K)")
    answer.add_argument("--json", action="store_true")
    answer.set_defaults(run=_answer)

    show = commands.add_parser("show", help="show a question and its answer")
    show.add_argument("id", type=int)
    show.add_argument("--reasoning", action="store_true", help="include the model's reasoning")
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=_show)

    listing = commands.add_parser("questions", help="list queued and answered questions")
    listing.add_argument("--status", choices=["pending", "claimed", "answered", "failed", "dead"])
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--stats", action="store_true",
                         help="counts per status, the oldest waiting question's age, answers/s lately")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=_questions)

    watch = commands.add_parser("watch", help="look for new docs releases")
    watch.add_argument("--once", action="store_true", required=True,
                       help="check once (schedule the watch-releases deployment to keep watching)")
    watch.add_argument("--ingest", action="store_true", help="ingest new releases here instead of emitting events")
    watch.add_argument("--json", action="store_true")
    watch.set_defaults(run=_watch)

    evaluate = commands.add_parser("eval", help="measure retrieval on a gold set (JSON lines)")
    evaluate.add_argument("--gold", required=True, help="JSON lines with question and gold_sources")
    evaluate.add_argument("-k", type=_positive, default=10)
    evaluate.add_argument("--version", help="evaluate this docs version's index")
    evaluate.add_argument("--lang", help="evaluate the localized docs in this language (default English)")
    evaluate.add_argument("--answers", action="store_true", help="also ask the LLM; check answers cite a gold doc")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(run=_eval)

    automations = commands.add_parser(
        "automations", help="create the shipped automations (failed runs, stale index, dead questions) on the "
                            "Prefect server, notifying DOCSRAG_NOTIFY_WEBHOOK_URL or DOCSRAG_NOTIFY_BLOCK")
    automations.add_argument("--json", action="store_true")
    automations.set_defaults(run=_automations)

    rollback = commands.add_parser("rollback", help="serve the previous collection again")
    rollback.add_argument("--lang", help="roll back the localized docs in this language (default English)")
    rollback.add_argument("--json", action="store_true")
    rollback.set_defaults(run=_rollback)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{value} is not between 1 and 100")
    return value


def printable(text: str) -> str:
    """Text from documents or questions, safe for a terminal: C0/C1 controls (escape sequences
    that could rewrite the screen) and bidi overrides printed as their code (tasks/escaping.py)."""
    return for_terminal(text)


def _runs_flows(command):
    """A command that runs flows gets a Prefect API: the configured server, or Prefect's temporary
    one started as the command's first act (flows/temporary_api.py). The command is given
    ``wait_for_api`` and calls it after the work that can overlap the server's start."""

    @functools.wraps(command)
    def with_api(args, settings: Settings) -> int:
        from flows.temporary_api import prefect_api

        with prefect_api(on_wait=_api_wait_begins) as wait_for_api:
            return command(args, settings, wait_for_api)

    return with_api


def _api_wait_begins() -> None:
    from tasks.terminal import current

    if terminal := current():
        terminal.api_wait_from = time.perf_counter()


@_runs_flows
def _ingest(args, settings: Settings, wait_for_api) -> int:
    from tasks import embedding

    embedding.preload(settings)  # the model loads beside the imports and Prefect's start
    from flows.ingest import ingest_release, task_runner
    from tasks.release import has_credentials

    flow = ingest_release
    if args.task_runner:
        flow = ingest_release.with_options(task_runner=task_runner(args.task_runner, settings))
    # Flow parameters are stored by Prefect and shown in its UI: a URL with credentials travels in
    # the settings only (they hold it already).
    release = None if args.release and has_credentials(args.release) else args.release
    wait_for_api()
    s = flow(release=release, version=args.version, force=args.force, publish_main=args.publish_main)
    if args.json:
        print(json.dumps(s.to_dict()))
    else:
        state = "unchanged" if s.unchanged else f"published {s.collection}"
        served = s.alias if s.named_version or args.publish_main else (
            f"{s.version_alias} only (no version in its name: --version or --publish-main serves it as {s.alias})")
        print(f"{s.version}: {state} as {served} — {s.documents} documents, {s.chunks} chunks ({s.embedded} "
              f"embedded, {s.reused} reused, {s.deleted} deleted), {len(s.skipped)} skipped, {s.seconds} s")
    return 0


def _search(args, settings: Settings) -> int:
    from tasks.generate import searched_as
    from tasks.retrieve import Retriever

    if bool(args.query) == bool(args.file):
        print("docsrag search: give a query or --file, not both", file=sys.stderr)
        return 2
    retriever = Retriever(settings)
    if args.file:
        with open(args.file, encoding="utf-8") as lines:
            items = [json.loads(line) for line in filter(str.strip, lines)]
        for item, query in zip(items, searched_as(settings, [item["question"] for item in items])):
            hits = retriever.search([query], args.k, args.version, args.lang)[0]
            print(json.dumps({"id": item.get("id"), "query": item["question"], **_translated(item["question"], query),
                              "results": _results(hits)}))
        return 0
    [query] = searched_as(settings, [args.query])
    hits = _results(retriever.search([query], args.k, args.version, args.lang)[0])
    if args.json:
        print(json.dumps({"query": args.query, **_translated(args.query, query), "results": hits}))
    else:
        if query != args.query:
            print(printable(f"(searched as: {query})"))
        for n, hit in enumerate(hits, 1):
            print(printable(f"{n}. {hit['doc_path']} — {hit['heading']} ({hit['score']:.4f})"))
            print("   " + printable(" ".join(hit["text"].split())[:300]))
    return 0


def _translated(question: str, query: str) -> dict:
    return {"searched_as": query} if query != question else {}


def _results(hits: list[dict]) -> list[dict]:
    return [{k: hit[k] for k in ("doc_path", "heading", "score", "relevance", "text", "version")} for hit in hits]


def _queue(settings: Settings):
    from tasks.questions import Queue

    return Queue.from_settings(settings)


def _ask(args, settings: Settings) -> int:
    queue = _queue(settings)
    question_id, created = queue.submit(args.question, version=args.version, client_key=args.key,
                                        priority=args.priority, lang=args.answer_in, docs_lang=args.lang)
    server = _prefect_server()
    if created and server:
        from flows.answer import announce_question

        announce_question(question_id, args.version)
    record = _wait_for_answer(queue, question_id, args.wait, settings, worker_expected=bool(server))
    if args.json:
        shown = {"id": question_id, "status": record["status"], "lang": record["lang"]}
        if record["status"] == "answered":
            shown.update(answer=record["answer"], sources=record["sources"])
        print(json.dumps(shown))
    elif record["status"] == "answered":
        _print_record(record, reasoning=False)
    else:
        print(f"question {question_id}: {record['status']}")
    return 0


# With a server, a worker started by the question's event should claim it well within this.
WORKER_GRACE_S = 30.0


def _wait_for_answer(queue, question_id: int, wait_s: float, settings, worker_expected: bool) -> dict:
    """Poll until answered (or dead). With no worker to expect, or none taking the question
    within the grace period, answer it here: the same drain a worker runs."""
    started = time.monotonic()
    record = queue.get(question_id)
    while record["status"] not in ("answered", "dead") and time.monotonic() - started < wait_s:
        waited = time.monotonic() - started
        if record["status"] == "pending" and (not worker_expected or waited > min(WORKER_GRACE_S, wait_s / 2)):
            _drain_here(settings, queue, max_seconds=max(1.0, wait_s - waited))
        else:
            time.sleep(0.5)
        record = queue.get(question_id)
    return record


def _drain_here(settings, queue, max_seconds: float) -> None:
    import asyncio
    import uuid

    from tasks.drain import Drain
    from tasks.retrieve import Retriever

    retriever = Retriever(settings)
    retriever.collection()
    asyncio.run(Drain(settings, queue, retriever, owner=f"cli-{uuid.uuid4().hex[:12]}",
                      max_seconds=max_seconds).run())


def _prefect_server() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@_runs_flows
def _answer(args, settings: Settings, wait_for_api) -> int:
    from flows.answer import answer_questions

    wait_for_api()
    summary = answer_questions(max_seconds=args.max_seconds, max_questions=args.max, top_k=args.k).to_dict()
    print(json.dumps(summary) if args.json else
          f"claimed {summary['claimed']}, answered {summary['answered']} ({summary['not_covered']} not covered), "
          f"failed {summary['failed']}, dead {summary['dead']}, put back {summary['released']}, "
          f"{summary['answers_per_s']} answers/s")
    return 0


_PUBLIC = ("id", "question", "version", "lang", "status", "answer", "sources", "model", "reasoning_effort", "usage",
           "latency_ms", "attempts", "last_error", "created_at", "answered_at")


def _show(args, settings: Settings) -> int:
    record = _queue(settings).get(args.id)
    if record is None:
        print(f"docsrag show: no question {args.id}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({k: record[k] for k in _PUBLIC + (("reasoning",) if args.reasoning else ())}))
    else:
        _print_record(record, reasoning=args.reasoning)
    return 0


def _print_record(record: dict, reasoning: bool) -> None:
    print(printable(f"[{record['id']}] {record['question']}") + f"\n({record['status']})")
    if record["answer"]:
        print(f"\n{printable(record['answer'])}\n")
    for source in record["sources"] or []:
        print(printable(f"  [{source['n']}] {source['doc_path']} — {source['heading']}"))
    if record["last_error"]:
        print(printable(f"last error: {record['last_error']}"))
    if reasoning and record["reasoning"]:
        print(f"\nreasoning:\n{printable(record['reasoning'])}")


def _questions(args, settings: Settings) -> int:
    queue = _queue(settings)
    if args.stats:
        stats = queue.stats().as_dict()
        print(json.dumps(stats) if args.json else
              "  ".join(f"{status} {n}" for status, n in stats["counts"].items()) +
              f"\noldest waiting: {_age(stats['oldest_waiting_s'])}\n"
              f"answers/s over the last {stats['window_s'] / 60:.0f} min: {stats['answers_per_s']}")
        return 0
    records = queue.list(args.status, args.limit)
    if args.json:
        print(json.dumps([{k: r[k] for k in ("id", "status", "lang", "question", "attempts", "created_at")}
                          for r in records]))
    for r in records if not args.json else []:
        print(f"{r['id']:>6}  {r['status']:<8}  {printable(r['question'][:90])}")
    return 0


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "nothing waits"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


@_runs_flows
def _watch(args, settings: Settings, wait_for_api) -> int:
    from flows.watch import watch_releases

    wait_for_api()
    summary = watch_releases(ingest=args.ingest).to_dict()
    print(json.dumps(summary) if args.json else
          f"new: {', '.join(summary['new']) or 'none'} ({summary['seen']} seen, {summary['events']} events)")
    return 0


@_runs_flows
def _eval(args, settings: Settings, wait_for_api) -> int:
    from flows.evaluate import evaluate_retrieval

    wait_for_api()
    figures = evaluate_retrieval(gold=args.gold, k=args.k, version=args.version, answers=args.answers,
                                 docs_lang=args.lang).to_dict()
    if args.json:
        print(json.dumps(figures))
        return 0
    languages = figures.pop("by_language", {})
    print("\n".join(f"{k:>26}  {v}" for k, v in figures.items()))
    for lang, part in languages.items():
        print(f"\n{lang}:\n" + "\n".join(f"{k:>26}  {v}" for k, v in part.items()))
    return 0


def _automations(args, settings: Settings) -> int:
    if not _prefect_server():
        print("docsrag automations: set PREFECT_API_URL to the Prefect server to create them on", file=sys.stderr)
        return 2
    from tasks.automations import apply_automations, notification_block

    names = apply_automations(notification_block(settings))
    print(json.dumps({"automations": names}) if args.json else "\n".join(f"created: {name}" for name in names))
    return 0


def _rollback(args, settings: Settings) -> int:
    from tasks import publish, store, writer_lock
    from tasks.index import Corpus

    corpus = Corpus(settings.collection, args.lang or "en")
    alias = corpus.alias
    with writer_lock.held(settings):
        current, previous = publish.rollback(store.connect(settings), corpus)
    if args.json:
        print(json.dumps({"alias": alias, "from": current, "to": previous}))
    else:
        print(f"{alias}: {current} -> {previous}")
    return 0


if __name__ == "__main__":
    run()
