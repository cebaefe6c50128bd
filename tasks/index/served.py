"""What is served, as a person asks it (`docsrag versions`, ``GET /v1/versions``): per corpus (a
language of the docs), each version with its alias, the collection behind it, its rows and build
time, what the main alias serves, and what a rollback would go back to.

Read from the server's aliases and the builds' own records, with the policy of
tasks/index/publish.py (``desired``), so the rollback target shown is the one `docsrag rollback` takes.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from pymilvus import MilvusClient

from docsrag.tasks.index import publish, store
from docsrag.tasks.index import schema as index
from docsrag.tasks.index.schema import Corpus
from docsrag.tasks.ingest.release import version_order


@dataclass(frozen=True)
class ServedVersion:
    """One version of a corpus and the collection its alias serves."""

    version: str
    alias: str
    collection: str
    rows: int
    built_at: str | None  # ISO 8601, UTC: when the build started (from its name)
    rollback_targets: list[str]  # earlier ready builds of this version still kept, newest first


@dataclass(frozen=True)
class ServedCorpus:
    """One language of the docs: its main alias (the newest version, unless rolled back) and its versions."""

    lang: str
    alias: str
    serves: str | None  # the collection the main alias serves
    serves_version: str | None
    versions: list[ServedVersion]
    rollback_to: str | None  # what the main alias serves after `docsrag rollback` (None: refused)

    @property
    def names(self) -> list[str]:
        return [v.version for v in self.versions]


def corpora(client: MilvusClient, collection: str) -> list[ServedCorpus]:
    """Every language of ``collection`` that has builds, English first."""
    langs = {info.lang for name in client.list_collections() if name.startswith(collection)
             and (info := index.info_of(client, name)) and name.startswith(Corpus(collection, info.lang).alias
                                                                            + index.BUILD_SEPARATOR)}
    return [corpus_view(client, Corpus(collection, lang)) for lang in sorted(langs, key=lambda lang: (lang != "en", lang))]


def corpus_view(client: MilvusClient, corpus: Corpus) -> ServedCorpus:
    found = publish.builds(client, corpus)
    have = store.aliases(client)
    versions = [_version(client, corpus, found, version, have[corpus.version_alias(version)])
                for version in sorted({b.info.version for b in found}, key=version_order, reverse=True)
                if corpus.version_alias(version) in have]
    main = have.get(corpus.alias)
    main_version = next((b.info.version for b in found if b.name == main), None)
    return ServedCorpus(corpus.lang, corpus.alias, main, main_version, versions, _rollback_target(corpus, found))


def _version(client: MilvusClient, corpus: Corpus, found: list[publish.Build], version: str,
             collection: str) -> ServedVersion:
    earlier = sorted((b for b in found if b.info.version == version and b.info.candidate and b.name != collection),
                     key=lambda b: (b.info.published or 0, b.name), reverse=True)
    rows = store.count(client, store.loaded(client, collection))
    return ServedVersion(version, corpus.version_alias(version), collection, rows, index.built_at(collection),
                         [b.name for b in earlier])


def _rollback_target(corpus: Corpus, found: list[publish.Build]) -> str | None:
    """The policy's answer once the build the main alias serves is rolled back (publish.rollback's move)."""
    current = publish.desired(corpus, found)[corpus.alias]
    if current is None:
        return None
    after = [publish.Build(b.name, b.info.but(rolled_back=True)) if b.name == current else b for b in found]
    return publish.desired(corpus, after)[corpus.alias]


def not_served(client: MilvusClient, corpus: Corpus, version: str | None) -> str:
    """Why nothing answers for ``version`` of ``corpus``, naming the versions that are served, in
    one line: what the CLI prints and the API's 404 says."""
    view = corpus_view(client, corpus)
    docs = "docs" if corpus.lang == "en" else f"{corpus.lang} docs"
    if not view.versions:
        return f"no {docs} are served yet: run `docsrag ingest` first"
    listed = ", ".join(f"{v}{' (newest)' if v == view.serves_version else ''}" for v in view.names)
    if version is None:
        return f"no {docs} are served as the newest ({corpus.alias}); served: {listed}: pass --version"
    guess = difflib.get_close_matches(version, view.names, n=1, cutoff=0.5)
    hint = f"; did you mean {guess[0]}?" if guess else ""
    return f"no {docs} version {version!r} is served; served: {listed}{hint} (`docsrag versions` lists them)"
