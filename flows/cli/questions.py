"""The question queue: ask, show, questions, answer (through ``docsrag.tasks.service.service``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from docsrag.flows.cli.common import (
    RunningApi,
    api_holding_index,
    bounded_int,
    docs_choice,
    json_output,
    non_negative,
    positive,
    prefect_server,
    printable,
    runs_flows,
    service,
)
from docsrag.tasks.core.records import (  # not docsrag.tasks.queue.questions: SQLAlchemy only where the queue is used
    MAX_CLIENT_KEY_CHARS,
    MAX_PRIORITY,
    STATUSES,
)
from docsrag.tasks.core.settings import Settings

if TYPE_CHECKING:
    from docsrag.tasks.service.service import QuestionView, Submitted

# What `show --json` prints: the question as a reader sees it (never the lease or the worker).
_PUBLIC = ("id", "question", "version", "lang", "status", "answer", "sources", "model", "reasoning_effort", "usage",
           "latency_ms", "attempts", "last_error", "created_at", "answered_at", "repeat_of", "collection",
           "untranslated")


def add_commands(commands) -> None:
    out = json_output()

    ask = commands.add_parser("ask", parents=[out, docs_choice("answer from")],
                              help="queue a question (and wait for its answer)")
    ask.add_argument("question")
    ask.add_argument("--answer-in", metavar="LANG", help="ISO 639-1 code to answer in (default: the question's)")
    ask.add_argument("--key", type=client_key,
                     help=f"client key (1-{MAX_CLIENT_KEY_CHARS} characters): asking again with the same key "
                          "returns the same question")
    ask.add_argument("--priority", type=bounded_int(-MAX_PRIORITY, MAX_PRIORITY), default=0, metavar="N",
                     help=f"-{MAX_PRIORITY}..{MAX_PRIORITY}: each level counts as five minutes of waiting "
                          "(the rest are never starved)")
    ask.add_argument("--wait", type=non_negative, default=0, metavar="SECONDS",
                     help="wait this long for the answer; answer it here when no worker takes it")
    ask.set_defaults(run=_ask)

    answer = commands.add_parser("answer", parents=[out], help="drain the queue once: answer until it is empty")
    answer.add_argument("--max", type=bounded_int(1, 10**6), help="claim at most this many questions")
    answer.add_argument("--max-seconds", type=non_negative, default=3600, help="stop claiming after this long")
    answer.add_argument("-k", type=positive, help="sources per question (default DOCSRAG_TOP_K)")
    answer.set_defaults(run=_answer)

    show = commands.add_parser("show", parents=[out], help="show a question and its answer")
    show.add_argument("id", type=int)
    show.add_argument("--reasoning", action="store_true", help="include the model's reasoning")
    show.set_defaults(run=_show)

    listing = commands.add_parser("questions", parents=[out], help="list queued and answered questions")
    listing.add_argument("--status", choices=STATUSES)
    listing.add_argument("--limit", type=bounded_int(1, 10_000), default=50)
    listing.add_argument("--stats", action="store_true",
                         help="counts per status, the oldest waiting question's age, answers/s lately, "
                              "repeats answered, feedback and coverage gaps")
    listing.set_defaults(run=_questions)


def client_key(text: str) -> str:
    """An argparse type: the queue's bound on a key (PostgreSQL's column), checked before any database."""
    if not 1 <= len(text) <= MAX_CLIENT_KEY_CHARS:
        raise argparse.ArgumentTypeError(f"a client key holds 1 to {MAX_CLIENT_KEY_CHARS} characters, "
                                         f"not {len(text)}")
    return text


def _ask(args, settings: Settings) -> int:
    questions = service(settings, announce=True)
    beside = api_holding_index(settings)  # it holds the index: it checks what is served, its worker answers
    submitted = _submit_through(beside, settings, args) if beside else questions.submit(
        args.question, version=args.version, docs_lang=args.lang, answer_in=args.answer_in, priority=args.priority,
        client_key=args.key)
    view = questions.wait(submitted.id, args.wait, answer_here=beside is None,
                          worker_expected=bool(prefect_server()) or beside is not None)
    if beside and not beside.answers and not view.final:
        print(f"docsrag ask: question {view.id} is queued; `docsrag api` (pid {beside.pid}) holds the index without "
              "--answer: restart it with --answer, or run `docsrag answer` once it stops", file=sys.stderr)
    if args.json:
        shown = {"id": view.id, "status": view.status, "lang": view.lang, "repeat_of": view.repeat_of}
        if view.status == "answered":
            shown.update(answer=view.answer, sources=[source.cited for source in view.sources],
                         untranslated=view.untranslated)
        print(json.dumps(shown))
    elif view.status == "answered":
        _print_view(view, reasoning=False)
    else:
        print(f"question {view.id}: {view.status}")
    return 0


def _submit_through(api: RunningApi, settings: Settings, args) -> Submitted:
    """Queued by the `docsrag api` that holds the Milvus Lite folder: only it can check that the docs
    asked for are served (and find a repeat), as it does for any caller."""
    from docsrag.tasks.service.service import Submitted

    asked = {"question": args.question, "version": args.version, "lang": args.lang, "answer_in": args.answer_in,
             "priority": args.priority, "client_key": args.key}
    body = api.call(settings, "POST", "/v1/questions", "queue the question",
                    json={name: value for name, value in asked.items() if value is not None})
    return Submitted(body["id"], body["status"], True, body.get("repeat_of"))


@runs_flows
def _answer(args, settings: Settings, wait_for_api) -> int:
    from docsrag.flows.answer import answer_questions

    wait_for_api()
    summary = answer_questions(max_seconds=args.max_seconds, max_questions=args.max, top_k=args.k).to_dict()
    print(json.dumps(summary) if args.json else
          f"claimed {summary['claimed']}, answered {summary['answered']} ({summary['not_covered']} not covered), "
          f"failed {summary['failed']}, dead {summary['dead']}, put back {summary['released']}, "
          f"{summary['answers_per_s']} answers/s")
    return 0


def _show(args, settings: Settings) -> int:
    from docsrag.tasks.service.service import (
        UnknownQuestion,  # the service's imports (pymilvus, openai) only where it is used
    )

    try:
        view = service(settings).show(args.id)
    except UnknownQuestion:
        print(f"docsrag show: no question {args.id}", file=sys.stderr)
        return 1
    if args.json:
        shown = view.to_dict(reasoning=args.reasoning)
        print(json.dumps({k: shown[k] for k in _PUBLIC + (("reasoning",) if args.reasoning else ())}))
    else:
        _print_view(view, reasoning=args.reasoning)
    return 0


def _print_view(view: QuestionView, reasoning: bool) -> None:
    print(printable(f"[{view.id}] {view.question}") + f"\n({view.status})")
    if view.untranslated:  # the answer (above all a "not covered" one) is worth less: the reader is told why
        print(printable(f"(searched as asked: {view.untranslated})"))
    if view.repeat_of:
        print(f"answered at submit from question {view.repeat_of} (the same question, same docs served)")
    if view.answer:
        print(f"\n{printable(view.answer)}\n")
    for source in view.sources:
        print(printable(f"  [{source.n}] {source.doc_path} — {source.heading}"))
        if source.url:
            print(printable(f"      {source.url}"))
    if view.last_error:
        print(printable(f"last error: {view.last_error}"))
    if reasoning and view.reasoning:
        print(f"\nreasoning:\n{printable(view.reasoning)}")


def _questions(args, settings: Settings) -> int:
    questions = service(settings)
    if args.stats:
        stats = questions.stats().to_dict()
        print(json.dumps(stats) if args.json else _stats_text(stats))
        return 0
    records = questions.list(args.status, args.limit)
    if args.json:
        print(json.dumps([{k: r[k] for k in ("id", "status", "lang", "question", "attempts", "created_at")}
                          for r in records]))
        return 0
    for r in records:
        print(f"{r['id']:>6}  {r['status']:<8}  {printable(r['question'][:90])}")
    return 0


def _stats_text(stats: dict) -> str:
    lines = ["  ".join(f"{status} {n}" for status, n in stats["counts"].items()),
             f"oldest waiting: {_age(stats['oldest_waiting_s'])}",
             f"answers/s over the last {stats['window_s'] / 60:.0f} min: {stats['answers_per_s']}",
             f"answered from repeats: {stats['answered_from_repeats']}",
             f"feedback: {stats['feedback']['helpful']} helpful, {stats['feedback']['not_helpful']} not helpful"]
    for gap in stats["coverage_gaps"]:
        lines.append(printable(f"  gap: {gap['doc_path']} — {gap['heading']}: {gap['not_covered']} not covered, "
                               f"{gap['not_helpful']} not helpful"))
    if stats["translation_gaps"]["not_covered"]:
        lines.append(f"not covered after a search as asked, untranslated: {stats['translation_gaps']['not_covered']} "
                     "(a gap in translation, not in the docs: no LLM translated them)")
    return "\n".join(lines)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "nothing waits"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
