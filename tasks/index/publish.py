"""Which collection each alias serves: the publish protocol, rollback and garbage collection.

The policy, written as a function of what the builds record about themselves (``BuildInfo``),
never of where the aliases happen to point:

- a version alias (``milvus_docs_2_5_x``) serves its version's ready build with the highest
  ``published`` number: its last publish;
- the main alias (``milvus_docs``) serves the ready build with the highest ``main`` number: the
  newest version published (``if-newer``), or one published with ``--publish-main``;
- a build rolled back is ready but no longer a candidate for either.

States of a build: ``building`` (written, resumable) -> ``ready`` (validated, numbered); ``ready``
-> rolled back (a flag). Every change of state is one collection-property write, the commit point;
the aliases follow by ``converge``. The order of moves of a publish:

1. validate the build (ids exact, a search answers), still ``building``;
2. commit: one write of ``state=ready`` with its ``published`` (and ``main``) number;
3. converge: each version alias, then the main alias, is pointed where the policy says
   (each move atomic for readers); aliases whose version has no candidate left are dropped;
4. garbage collection: drops only what no alias, rollback chain or resumable build needs.

A crash before 2 leaves the build ``building`` (the next run resumes it); a crash after 2 leaves
some aliases behind, on ready collections, until any next run of the corpus converges them first.
Aliases only ever point at ready collections, and collections are dropped only when no alias
(as the server reports it for that collection) names them. One writer per corpus at a time
(tasks/index/writer_lock.py) makes the read-decide-write of 2 safe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pymilvus import MilvusClient

from docsrag.tasks.index import schema as index
from docsrag.tasks.index import store
from docsrag.tasks.index.schema import BuildInfo, Corpus
from docsrag.tasks.ingest.release import version_order

MainPolicy = Literal["always", "never", "if-newer"]


@dataclass(frozen=True)
class Build:
    name: str
    info: BuildInfo


@dataclass(frozen=True)
class Published:
    """What a publish changed: the main alias before and after, what garbage collection dropped."""

    main_before: str | None
    main_after: str | None
    dropped: list[str]


def builds(client: MilvusClient, corpus: Corpus) -> list[Build]:
    """The corpus's physical collections that are builds, oldest first."""
    found = ((name, index.info_of(client, name)) for name in index.builds_of(client, corpus.alias))
    return [Build(name, info) for name, info in found if info]


def desired(corpus: Corpus, found: list[Build]) -> dict[str, str | None]:
    """Alias -> the collection the policy says it serves (None: the alias should not exist)."""
    want: dict[str, str | None] = {}
    for version in sorted({b.info.version for b in found}, key=version_order):
        want[corpus.version_alias(version)] = _newest([b for b in found if b.info.version == version], "published")
    want[corpus.alias] = _newest([b for b in found if b.info.main is not None], "main")
    return want


def _newest(found: list[Build], number: str) -> str | None:
    candidates = [b for b in found if b.info.candidate]
    return max(candidates, key=lambda b: (getattr(b.info, number) or 0, b.name)).name if candidates else None


def converge(client: MilvusClient, corpus: Corpus) -> dict[str, str]:
    """Point every alias of the corpus where the policy says, whatever step an earlier run died
    in. -> alias -> collection served."""
    found = _adopt_unnumbered(client, corpus, builds(client, corpus))
    want, have, ours = desired(corpus, found), store.aliases(client), {b.name for b in found}
    # Version aliases first, the main alias last: a crash in between leaves main where it was.
    for alias in sorted(want, key=lambda a: a == corpus.alias):
        if want[alias] and have.get(alias) != want[alias]:
            store.point_alias(client, alias, want[alias])
    stale = {alias for alias, target in want.items() if target is None and have.get(alias) in ours}
    gone = {alias for alias in _naming_gone_builds(client, corpus, have, ours) if not want.get(alias)}
    for alias in sorted(stale | gone):
        client.drop_alias(alias)
    return {alias: target for alias, target in want.items() if target}


def _naming_gone_builds(client: MilvusClient, corpus: Corpus, have: dict[str, str], ours: set[str]) -> set[str]:
    """Aliases that still name a build of the corpus that no longer exists: one set aside as damaged
    whose aliases a killed run left (tasks/index/quarantine.py). Milvus Lite keeps such an alias and
    describes it; it serves nothing. Asked of the server only when an alias names a build not read."""
    prefix = f"{corpus.alias}{index.BUILD_SEPARATOR}"
    unread = {alias: target for alias, target in have.items() if target.startswith(prefix) and target not in ours}
    existing = set(index.builds_of(client, corpus.alias)) if unread else set()
    return {alias for alias, target in unread.items() if target not in existing}


def _adopt_unnumbered(client: MilvusClient, corpus: Corpus, found: list[Build]) -> list[Build]:
    """Builds made before publishes were numbered: a ready one counts as published (0), and as
    the main alias's if it serves it now, so upgrading docsrag moves no alias."""
    main = store.served_collection(client, corpus.alias)
    adopted = []
    for build in found:
        if build.info.state == "ready" and build.info.published is None:
            info = build.info.but(published=0, main=0 if build.name == main else None)
            index.record(client, build.name, info)
            build = Build(build.name, info)
        adopted.append(build)
    return adopted


def moves_main(corpus: Corpus, found: list[Build], version: str, policy: MainPolicy) -> bool:
    """``if-newer``: the main alias moves unless it serves a newer version than ``version``."""
    if policy != "if-newer":
        return policy == "always"
    main = desired(corpus, found)[corpus.alias]
    served = next((b.info.version for b in found if b.name == main), None)
    return served is None or version_order(version) >= version_order(served)


def publish(client: MilvusClient, corpus: Corpus, collection: str, policy: MainPolicy, keep: int) -> Published:
    """Serve a validated build: commit its numbers, converge the aliases, collect garbage.
    Publishing what the policy already serves writes nothing."""
    found = builds(client, corpus)
    want = desired(corpus, found)
    info = next(b.info for b in found if b.name == collection)
    move = moves_main(corpus, found, info.version, policy)
    if want.get(corpus.version_alias(info.version)) != collection or (move and want[corpus.alias] != collection):
        number = 1 + max((n for b in found for n in (b.info.published, b.info.main) if n is not None), default=0)
        kept_main = None if info.rolled_back else info.main
        index.record(client, collection, info.but(state="ready", rolled_back=False, published=number,
                                                  main=number if move else kept_main))
    served = converge(client, corpus)
    return Published(want[corpus.alias], served.get(corpus.alias), collect_garbage(client, corpus, keep))


def rollback(client: MilvusClient, corpus: Corpus) -> tuple[str, str]:
    """Undo the last publish that moved the main alias: that build is rolled back, so the main
    alias serves the build it served before, and the build's version alias its version's build
    before it (or is dropped). Refused, changing nothing, when there is nothing to go back to.
    -> (from, to)."""
    found = builds(client, corpus)
    current = desired(corpus, found)[corpus.alias]
    if current is None:
        raise store.StoreError(f"nothing to roll back: {corpus.alias} serves nothing")
    after = [Build(b.name, b.info.but(rolled_back=True)) if b.name == current else b for b in found]
    to = desired(corpus, after)[corpus.alias]
    if to is None:
        raise store.StoreError(f"nothing to roll back to: {corpus.alias} serves {current} "
                               "and no earlier collection is kept")
    index.record(client, current, next(b.info for b in after if b.name == current))
    converge(client, corpus)
    return current, to


def roll_past(client: MilvusClient, corpus: Corpus, damaged: str) -> tuple[str, str]:
    """The rollback of a build the main alias served that was set aside as damaged: gone from the
    builds, so the policy already serves the build before it; the aliases converge there. -> (from, to)."""
    to = converge(client, corpus).get(corpus.alias)
    if to is None:
        raise store.StoreError(f"nothing to roll back to: {corpus.alias} served {damaged}, set aside as damaged, and "
                               "no earlier collection is kept: ingest a release to serve one")
    return damaged, to


def collect_garbage(client: MilvusClient, corpus: Corpus, keep: int) -> list[str]:
    """Drop the builds nobody can still need. Kept: whatever an alias serves; per alias, the
    ``keep`` newest candidates of its chain (what it serves and its rollback targets); the newest
    ``keep`` unfinished builds whose release has no finished build (a killed run resumes them).
    A collection some alias names (as the server reports it) is never dropped: Milvus before
    2.5.5 would drop it and leave the alias dangling (milvus#40236)."""
    found = builds(client, corpus)
    needed = set(store.aliases(client).values())
    for chain in _chains(corpus, found):
        needed.update(b.name for b in chain[:keep])
    finished = {b.info.build_key for b in found if b.info.state == "ready"}
    unfinished = [b for b in found if b.info.state == "building" and b.info.build_key not in finished]
    needed.update(b.name for b in unfinished[-keep:])
    dropped = []
    for build in found:
        if build.name not in needed and not client.list_aliases(collection_name=build.name).get("aliases"):
            client.drop_collection(build.name)
            dropped.append(build.name)
    return dropped


def _chains(corpus: Corpus, found: list[Build]) -> list[list[Build]]:
    """Per alias, its candidates newest first: the head is served, the rest are rollback targets."""
    candidates = [b for b in found if b.info.candidate]
    chains = [sorted((b for b in candidates if b.info.main is not None), key=lambda b: (b.info.main, b.name),
                     reverse=True)]
    for version in {b.info.version for b in candidates}:
        chains.append(sorted((b for b in candidates if b.info.version == version),
                             key=lambda b: (b.info.published or 0, b.name), reverse=True))
    return chains
