"""A build: what a release becomes in Milvus, before it is served.

plan (what is served, what a killed run left behind, what changed, the guard rails)
-> the flow embeds and writes rows -> validate. Serving it is tasks/index/publish.py.

Each build writes a new physical collection ``<alias>__<version>__<utc time>``; readers only ever
query an alias. The resume protocol: the staging collection is its own checkpoint. It records a
build key (every input that decides its chunk ids) and its state (``building`` -> ``ready``); a
run with the same key finds it and embeds only the ids it lacks. A kept build with the same key
that no alias serves (an earlier publish, a rolled-back one) is served again without re-embedding.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pymilvus import MilvusClient

from docsrag.tasks.core.errors import DocsragError
from docsrag.tasks.core.settings import Settings
from docsrag.tasks.index import publish, store
from docsrag.tasks.index import schema as index
from docsrag.tasks.index.schema import BuildInfo, Corpus
from docsrag.tasks.ingest import chunking, markdown
from docsrag.tasks.ingest import release as release_module
from docsrag.tasks.ingest.chunking import Chunk
from docsrag.tasks.ingest.diff import ReleaseDiff
from docsrag.tasks.ingest.markdown import Budgets
from docsrag.tasks.ingest.release import Release

# Served vectors copied per task: task overhead (~33 ms) stays small, a gRPC message stays far
# under its 64 MB limit (1,000 rows of 384 floats and text is a few MB).
COPY_BATCH_ROWS = 1000
# The code that turns a release into chunk ids: a new docsrag that parses or chunks differently
# must not resume a build the old one started.
_CHUNKING_CODE = (release_module, markdown, chunking, index)


class GuardRailError(DocsragError, RuntimeError):
    """The new build would remove too much of what is served; --force overrides."""


def code_version() -> str:
    digest = hashlib.sha256()
    for name in _CHUNKING_CODE:  # modules
        digest.update(Path(name.__file__).read_bytes())
    return digest.hexdigest()[:12]


def build_key(sha256: str, version: str, inputs: dict) -> str:
    """Identifies what a staging collection is built from: the release, its version, and every
    setting and line of code that decides its chunk ids (``inputs``: embedder, chunking, parse
    budgets), so a killed run is resumed only by a run that would write the same rows."""
    raw = json.dumps([sha256, version, sorted(inputs.items()), index.SCHEMA_VERSION, code_version()], default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class BuildPlan:
    """What a release's build starts from; decided under the writer lock, before anything is
    embedded or written."""

    alias: str  # the main alias of the release's language
    version_alias: str
    version: str
    lang: str  # the docs' language (the release tree's top folder)
    key: str
    main: publish.MainPolicy  # whether the main alias moves to this build
    moves_main: bool  # what that policy decides against what is served now
    base: str | None  # the collection whose vectors are reused (the version's own alias first)
    target: str | None  # a kept collection of the same build key: resumed, or published again
    diff: ReleaseDiff
    base_version: str | None  # the version the base was built from
    main_served: dict[str, str]  # id -> doc path the main alias serves now, where it moves
    resumed: int = 0  # rows an interrupted build of this release left, kept: not embedded again

    @property
    def unchanged(self) -> bool:
        """Nothing to resume, and the base serves exactly these ids for this version: nothing to
        embed, nothing to write."""
        return self.target is None and self.base is not None and self.base_version == self.version \
            and set(self.diff.served_ids) == self.diff.new_ids

    @property
    def serves(self) -> str | None:
        """The collection the aliases will serve without a new build, if any."""
        return self.base if self.unchanged else None


def plan_build(client: MilvusClient, corpus: Corpus, rel: Release, chunks: list[Chunk], inputs: dict,
               main: publish.MainPolicy) -> BuildPlan:
    """Repairs the aliases first (a run killed between two alias moves), then plans from what the
    publish policy says is served."""
    alias, versioned = corpus.alias, corpus.version_alias(rel.version)
    served = publish.converge(client, corpus)
    base = served.get(versioned) or served.get(alias)
    base = base and store.loaded(client, base)
    key = build_key(rel.sha256, rel.version, inputs)
    target = kept_build(client, alias, key)
    if target == served.get(versioned):
        target = None  # its version alias serves it: unchanged, nothing to build
    target = target and store.loaded(client, target)
    built = frozenset(store.doc_of_ids(client, target)) if target else frozenset()
    finished = bool(target) and index.info_of(client, target).state == "ready"
    if finished and built != {c.id for c in chunks}:
        target, built = None, frozenset()  # a finished build is served again only as it is
    diff = ReleaseDiff(chunks, store.doc_of_ids(client, base) if base else {}, built)
    base_version = index.info_of(client, base).version if base else None
    moves_main = publish.moves_main(corpus, publish.builds(client, corpus), rel.version, main)
    main_now = served.get(alias)
    main_served = {} if not (moves_main and main_now) else diff.served_ids if main_now == base \
        else store.doc_of_ids(client, store.loaded(client, main_now))
    resumed = 0 if finished else len(built & diff.new_ids)
    return BuildPlan(alias, versioned, rel.version, corpus.lang, key, main, moves_main, base, target, diff, base_version,
                     main_served, resumed)


def kept_build(client: MilvusClient, alias: str, key: str) -> str | None:
    """The newest collection with this build key: an unfinished staging collection (resumed) or a
    finished one (published again: a release has one build, whichever aliases serve it now)."""
    for name in reversed(index.builds_of(client, alias)):
        info = index.info_of(client, name)
        if info and info.build_key == key:
            return name
    return None


def check_guard_rails(plan: BuildPlan, force: bool) -> None:
    """Refuse a build that would publish nothing, or drop more than half of what an alias that
    moves serves now. Only the aliases that move are judged: an older version published beside a
    newer one leaves the main alias alone."""
    if force:
        return
    if not plan.diff.chunks:
        raise GuardRailError(f"refusing to publish {plan.version_alias}: the new build has no chunks "
                             "(use --force to publish anyway)")
    moving = {plan.version_alias: plan.diff.served_ids if plan.base_version == plan.version else {}}
    if plan.moves_main:
        moving[plan.alias] = plan.main_served
    documents = {c.doc_path for c in plan.diff.chunks}
    for alias, served_ids in moving.items():
        served = set(served_ids.values())
        kept = len(served & documents)
        if served and kept * 2 < len(served):
            raise GuardRailError(
                f"refusing to move {alias}: the new build keeps {kept} of the {len(served)} documents served now "
                f"({len(served) - kept} lost, more than half); check the release or re-run with --force")


def staging_collection(client: MilvusClient, plan: BuildPlan, rel: Release, embedder_id: str, dim: int,
                       multilingual_dim: int | None) -> str:
    """The collection the build writes into: the kept one (its rows the plan no longer has are
    deleted first), or a new one marked ``building``."""
    if plan.target:
        stale = sorted(plan.diff.already_built - plan.diff.new_ids)
        for part in batched(stale, COPY_BATCH_ROWS):
            store.delete_ids(client, plan.target, part)
        return plan.target
    stamp = datetime.now(timezone.utc).strftime(index.BUILD_TIME)
    name = index.build_name(plan.alias, rel.version, stamp)
    index.create_collection(client, name, dim, bm25=store.capabilities(client).bm25, multilingual_dim=multilingual_dim,
                            info=BuildInfo(build_key=plan.key, version=rel.version, lang=plan.lang,
                                           release_sha256=rel.sha256, embedder=embedder_id))
    return name


def validate(client: MilvusClient, collection: str, expected: set[str]) -> None:
    """The build holds exactly the plan's chunk ids and answers a search."""
    # Seal what was written: indexed segments, not a brute-force scan of the write buffer,
    # are what readers get once the alias moves (Milvus Lite: 400 ms -> 70 ms per search).
    client.flush(collection)
    found = set(store.doc_of_ids(client, collection))
    if found != expected:
        raise store.StoreError(f"validation failed for {collection}: {len(found)} rows, expected {len(expected)} "
                               f"({len(expected - found)} missing, {len(found - expected)} not in the release)")
    if expected and not store.smoke_search(client, collection):
        raise store.StoreError(f"validation failed for {collection}: a smoke search returned nothing")


def batched(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def build_inputs(settings: Settings, embedder_id: str) -> dict:
    """Every setting that decides a release's chunk ids: part of the build key, so a killed build
    is resumed only by a run that would write the same rows."""
    return {"embedder": embedder_id, "chunking": settings.chunking_config, "budgets": Budgets.of(settings),
            "max_document_chunks": settings.max_document_chunks}
