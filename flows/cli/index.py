"""The docs index: ingest, search, rollback, watch, eval."""

from __future__ import annotations

import json
import sys
from functools import partial
from typing import TYPE_CHECKING

from docsrag.flows.cli.common import (
    RunningApi,
    api_holding_index,
    docs_choice,
    json_output,
    positive,
    printable,
    runs_flows,
    service,
)
from docsrag.tasks.core.settings import Settings

if TYPE_CHECKING:
    from docsrag.tasks.service.service import SearchResults


def add_commands(commands) -> None:
    out = json_output()

    ingest = commands.add_parser("ingest", parents=[out], help="ingest a docs release into the served collection")
    ingest.add_argument("--release", help="zip URL (https, s3, file) or path; default DOCSRAG_RELEASE_URL")
    ingest.add_argument("--version", help="docs version; default: read from the asset name")
    ingest.add_argument("--force", action="store_true", help="publish even when the guard rails refuse; "
                        "set a damaged Milvus Lite collection aside (in <milvus folder>.damaged/) and build anew")
    ingest.add_argument("--publish-main", action="store_true",
                        help="serve a release without a version (e.g. docs.zip) as the main alias too")
    ingest.add_argument("--task-runner", metavar="dask[=ADDRESS]",
                        help="embed on Dask: a local cluster, or the scheduler at ADDRESS (default: threads)")
    ingest.set_defaults(run=_ingest)

    search = commands.add_parser("search", parents=[out, docs_choice()], help="search the served collection")
    search.add_argument("query", nargs="?", help="text to search for")
    search.add_argument("--file", help="JSON lines with id and question; prints one result line each")
    search.add_argument("-k", type=positive, default=5, help="results per query")
    search.set_defaults(run=_search)

    watch = commands.add_parser("watch", parents=[out], help="look for new docs releases")
    watch.add_argument("--once", action="store_true", required=True,
                       help="check once (schedule the watch-releases deployment to keep watching)")
    watch.add_argument("--ingest", action="store_true", help="ingest new releases here instead of emitting events")
    watch.set_defaults(run=_watch)

    evaluate = commands.add_parser("eval", parents=[out, docs_choice("evaluate")],
                                   help="measure retrieval on a gold set (JSON lines)")
    evaluate.add_argument("--gold", required=True, help="JSON lines with question and gold_sources")
    evaluate.add_argument("-k", type=positive, default=10)
    evaluate.add_argument("--answers", action="store_true", help="also ask the LLM; check answers cite a gold doc")
    evaluate.set_defaults(run=_eval)

    versions = commands.add_parser("versions", parents=[out],
                                   help="list what is served: versions, aliases, collections, rollback targets")
    versions.set_defaults(run=_versions)

    rollback = commands.add_parser("rollback", parents=[out], help="serve the previous collection again (a damaged "
                                   "Milvus Lite collection is set aside first, in <milvus folder>.damaged/)")
    rollback.add_argument("--lang", help="roll back the localized docs in this language (default English)")
    rollback.set_defaults(run=_rollback)


def _ingest(args, settings: Settings) -> int:
    """What can be checked at the door is, before Prefect starts: no Failed run in the UI for a typo."""
    from docsrag.tasks.ingest.release import ReleaseUnreachable, check_source

    check_source(settings.release_url, args.version)
    try:
        return _run_ingest(args, settings)
    except ReleaseUnreachable as exc:
        hint = "check the URL and the network" if args.release else \
            "no network? pass --release PATH to ingest a docs release zip on disk"
        raise ReleaseUnreachable(f"{exc}; {hint}") from None


@runs_flows
def _run_ingest(args, settings: Settings, wait_for_api) -> int:
    # The flow loads the model in the background from its first stage; loaded here too, beside the
    # imports, it took the GIL from them: an unchanged run started 0.3-0.4 s later (kept server).
    from docsrag.flows.ingest import ingest_release, task_runner
    from docsrag.tasks.ingest.release import has_credentials

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
        resumed = f", {s.resumed} resumed" if s.resumed else ""
        print(f"{s.version}: {state} as {served} — {s.documents} documents, {s.chunks} chunks ({s.embedded} "
              f"embedded, {s.reused} reused{resumed}, {s.deleted} deleted), {len(s.skipped)} skipped, {s.seconds} s")
    return 0


def _search(args, settings: Settings) -> int:
    if bool(args.query) == bool(args.file):
        print("docsrag search: give a query or --file, not both", file=sys.stderr)
        return 2
    questions = service(settings)
    if args.file:
        with open(args.file, encoding="utf-8") as lines:
            items = [json.loads(line) for line in filter(str.strip, lines)]
        for item in items:
            found = questions.search(item["question"], args.k, args.version, args.lang)
            print(json.dumps({"id": item.get("id"), **found.to_dict()}))
        return 0
    found = questions.search(args.query, args.k, args.version, args.lang) if not (beside := api_holding_index(settings)) \
        else _search_through(beside, settings, args)
    if args.json:
        print(json.dumps(found.to_dict()))
        return 0
    _print_results(found, args.version)
    return 0


def _search_through(api: RunningApi, settings: Settings, args) -> SearchResults:
    """The search, asked of the `docsrag api` that holds the Milvus Lite folder (one process per folder)."""
    from docsrag.tasks.core.records import Hit
    from docsrag.tasks.service.service import SearchResults

    params = {"q": args.query, "k": args.k, **{k: v for k, v in (("version", args.version), ("lang", args.lang)) if v}}
    body = api.call(settings, "GET", "/v1/search", "search", params=params)
    hits = [Hit("", r["doc_path"], "", r["heading"], r["version"], r["text"], r["score"], r["relevance"],
                url=r.get("url", "")) for r in body["results"]]
    return SearchResults(body["query"], body.get("searched_as") or body["query"], hits, body.get("note"))


def _print_results(found, version: str | None) -> None:
    """Ranked as the hybrid search fused them (RRF, whose score says nothing outside its list); the
    percentage is the relevance a person can compare: the passage's cosine similarity to the question."""
    searched = sorted({hit.version for hit in found.results}) or [version or "newest"]
    print(printable(f"docs {', '.join(searched)}{'' if version else ' (newest)'}: best match first; "
                    "relevance = similarity of the passage to the question"))
    if found.searched_as != found.query:
        print(printable(f"(searched as: {found.searched_as})"))
    elif found.note:
        print(f"({found.note})")
    for n, hit in enumerate(found.results, 1):
        print(printable(f"{n}. {hit.doc_path} — {hit.heading} (relevance {max(0.0, hit.relevance):.0%})"))
        if hit.url:
            print("   " + printable(hit.url))
        print("   " + printable(" ".join(hit.text.split())[:300]))


def _versions(args, settings: Settings) -> int:
    from dataclasses import asdict

    from docsrag.tasks.index import served, store

    with store.damage_reported(settings.milvus_uri):
        corpora = served.corpora(store.connect(settings), settings.collection)
    if args.json:
        print(json.dumps({"corpora": [asdict(corpus) for corpus in corpora]}))
        return 0
    if not corpora:
        print("nothing is served yet: run `docsrag ingest` first")
    for corpus in corpora:
        print(_corpus_text(corpus))
    return 0


def _corpus_text(corpus) -> str:
    """One corpus as a person reads it: what the main alias serves, then a line per version."""
    back = f"rollback serves {corpus.rollback_to}" if corpus.rollback_to else "nothing to roll back to"
    main = f"{corpus.serves_version or 'nothing'} ({corpus.serves or 'no collection'})"
    lines = [f"{corpus.alias} ({corpus.lang}): the newest, {main}; {back}"]
    for v in corpus.versions:
        earlier = f", then {', '.join(v.rollback_targets)}" if v.rollback_targets else ""
        lines.append(f"  {v.version:<10} {v.alias}  {v.collection}  {v.rows} rows, built {v.built_at}{earlier}")
    return "\n".join(lines)


@runs_flows
def _watch(args, settings: Settings, wait_for_api) -> int:
    from docsrag.flows.watch import watch_releases

    wait_for_api()
    summary = watch_releases(ingest=args.ingest).to_dict()
    print(json.dumps(summary) if args.json else
          f"new: {', '.join(summary['new']) or 'none'} ({summary['seen']} seen, {summary['events']} events)")
    return 0


@runs_flows
def _eval(args, settings: Settings, wait_for_api) -> int:
    from docsrag.flows.evaluate import evaluate_retrieval

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


def _rollback(args, settings: Settings) -> int:
    from docsrag.tasks.index import quarantine, store, writer_lock
    from docsrag.tasks.index.schema import Corpus

    corpus = Corpus(settings.collection, args.lang or "en")
    alias = corpus.alias
    with writer_lock.held(settings), store.damage_reported(settings.milvus_uri):
        client = store.connect(settings)
        # A damaged Milvus Lite collection is set aside, said on stderr (stdout may be --json); the rollback goes on.
        (current, previous), _ = quarantine.recovering(client, settings, partial(_rolled_back, client, corpus),
                                                       lambda line: print(printable(line), file=sys.stderr))
    if args.json:
        print(json.dumps({"alias": alias, "from": current, "to": previous}))
    else:
        print(f"{alias}: {current} -> {previous}")
    return 0


def _rolled_back(client, corpus, set_aside: list) -> tuple[str, str]:
    """The rollback, or where the main alias served a build set aside as damaged, the move off it."""
    from docsrag.tasks.index import publish

    served = next((s.collection for s in set_aside if corpus.alias in s.aliases), None)
    return publish.roll_past(client, corpus, served) if served else publish.rollback(client, corpus)
