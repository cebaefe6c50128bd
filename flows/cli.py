"""``docsrag``: the command line over the flows. Settings are built here, once."""

from __future__ import annotations

import argparse
import json
import sys

from tasks.settings import SettingsError, load_settings


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
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
    ingest.add_argument("--json", action="store_true", help="print the run summary as JSON")
    ingest.set_defaults(run=_ingest)

    search = commands.add_parser("search", help="search the served collection")
    search.add_argument("query", nargs="?", help="text to search for")
    search.add_argument("--file", help="JSON lines with id and question; prints one result line each")
    search.add_argument("-k", type=int, default=5, help="results per query")
    search.add_argument("--version", help="search this docs version instead of the newest")
    search.add_argument("--json", action="store_true")
    search.set_defaults(run=_search)

    rollback = commands.add_parser("rollback", help="serve the previous collection again")
    rollback.add_argument("--json", action="store_true")
    rollback.set_defaults(run=_rollback)
    return parser


def _ingest(args) -> int:
    load_settings(release_url=args.release)  # fail before starting Prefect when the config is wrong
    from flows.ingest import ingest_release

    summary = ingest_release(release=args.release, version=args.version, force=args.force, progress=True)
    if args.json:
        print(json.dumps(summary))
    else:
        state = "unchanged" if summary["unchanged"] else f"published {summary['collection']}"
        print(f"{summary['version']}: {state} as {summary['alias']} — {summary['documents']} documents, "
              f"{summary['chunks']} chunks ({summary['embedded']} embedded, {summary['reused']} reused, "
              f"{summary['deleted']} deleted), {len(summary['skipped'])} skipped, {summary['seconds']} s")
    return 0


def _search(args) -> int:
    from tasks.retrieve import Retriever

    if bool(args.query) == bool(args.file):
        print("docsrag search: give a query or --file, not both", file=sys.stderr)
        return 2
    retriever = Retriever(load_settings())
    if args.file:
        with open(args.file, encoding="utf-8") as lines:
            for line in filter(str.strip, lines):
                item = json.loads(line)
                hits = retriever.search([item["question"]], args.k, args.version)[0]
                print(json.dumps({"id": item.get("id"), "query": item["question"], "results": _results(hits)}))
        return 0
    hits = _results(retriever.search([args.query], args.k, args.version)[0])
    if args.json:
        print(json.dumps({"query": args.query, "results": hits}))
    else:
        for n, hit in enumerate(hits, 1):
            print(f"{n}. {hit['doc_path']} — {hit['heading']} ({hit['score']:.4f})")
            print("   " + " ".join(hit["text"].split())[:300])
    return 0


def _results(hits: list[dict]) -> list[dict]:
    return [{k: hit[k] for k in ("doc_path", "heading", "score", "text", "version")} for hit in hits]


def _rollback(args) -> int:
    from tasks import store

    settings = load_settings()
    with store.build_lock(settings.home, settings.collection):
        current, previous = store.rollback(store.connect(settings), settings.collection)
    if args.json:
        print(json.dumps({"alias": settings.collection, "from": current, "to": previous}))
    else:
        print(f"{settings.collection}: {current} -> {previous}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
