"""A build: what a release becomes in Milvus, and when it is served.

plan (what is served, what a killed run left behind, what changed, the guard rails)
-> the flow embeds and writes rows -> validate -> publish (the aliases move, blue/green).

Each build writes a new physical collection ``<alias>__<version>__<utc time>``; readers only ever
query an alias, which moves once the new collection is validated. The resume protocol: the
staging collection is its own checkpoint. It records a build key (release, version, embedder,
chunking, schema) and its state (``building`` -> ``ready``); a run of the same release finds an
unfinished one and embeds only the ids it lacks. tasks/store.py holds the Milvus verbs used here.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pymilvus import DataType, Function, FunctionType, MilvusClient

from tasks import store
from tasks.chunking import FIELD_MAX, Chunk
from tasks.diff import ReleaseDiff
from tasks.language import DEFAULT as DEFAULT_LANGUAGE
from tasks.release import Release, version_order, version_slug

SCHEMA_VERSION = 2  # 2: BM25 over search_text (doc path words, headings, text)
TEXT_MAX = 65_535  # bytes; chunks are far below, but a VARCHAR needs a bound
# The row schema: every field a row holds, with its VARCHAR bound, then the dense vector.
VARCHAR_FIELDS = {"id": 64, **FIELD_MAX, "version": 64, "text": TEXT_MAX, "search_text": TEXT_MAX}
ROW_FIELDS = [*VARCHAR_FIELDS, "dense"]
MULTILINGUAL = "dense_multilingual"  # the second dense field, where it is configured
BM25_INPUT = "search_text"
_BUILD_TIME = "%Y%m%dT%H%M%S%f"
# Served vectors copied per task: task overhead (~33 ms) stays small, a gRPC message stays far
# under its 64 MB limit (1,000 rows of 384 floats and text is a few MB).
COPY_BATCH_ROWS = 1000

MainAlias = Literal["always", "never", "if-newer"]


class GuardRailError(RuntimeError):
    """The new build would remove too much of what is served; --force overrides."""


def row(chunk: Chunk, vectors: dict[str, list[float]], version: str) -> dict:
    """``vectors``: ``dense`` (and ``dense_multilingual`` where configured)."""
    return {"id": chunk.id, "doc_path": chunk.doc_path, "title": chunk.title, "heading": chunk.heading,
            "version": version, "text": chunk.text, "search_text": chunk.search_text, **vectors}


def create_collection(client: MilvusClient, name: str, dim: int, *, bm25: bool, info: dict,
                      multilingual_dim: int | None = None) -> None:
    """The row schema as a Milvus collection: dense vector (cosine), a multilingual one where
    configured, plus a BM25 sparse field computed by Milvus from ``search_text`` where the server
    has BM25."""
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    for field, limit in VARCHAR_FIELDS.items():
        schema.add_field(field, DataType.VARCHAR, max_length=limit, is_primary=field == "id",
                         **({"enable_analyzer": True} if bm25 and field == BM25_INPUT else {}))
    schema.add_field("dense", DataType.FLOAT_VECTOR, dim=dim)
    index = MilvusClient.prepare_index_params()
    index.add_index("dense", index_type="AUTOINDEX", metric_type="COSINE")
    if multilingual_dim:
        schema.add_field(MULTILINGUAL, DataType.FLOAT_VECTOR, dim=multilingual_dim)
        index.add_index(MULTILINGUAL, index_type="AUTOINDEX", metric_type="COSINE")
    if bm25:
        schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        schema.add_function(Function(name="text_bm25", function_type=FunctionType.BM25,
                                     input_field_names=[BM25_INPUT], output_field_names=["sparse"]))
        index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
    store.create_collection(client, name, schema, index, info)


def aliases_for(collection: str, version: str | None, lang: str = DEFAULT_LANGUAGE) -> str:
    """The alias serving a version of the docs in a language: each version is served on its own
    (milvus_docs + 2.5.x -> milvus_docs_2_5_x) and ``collection`` follows the newest; a localized
    tree gets its own (milvus_docs_ko, milvus_docs_2_4_x_ko). No version: the newest."""
    suffix = "" if lang == DEFAULT_LANGUAGE else f"_{lang}"
    return f"{collection}_{version_slug(version)}{suffix}" if version else f"{collection}{suffix}"


def build_key(sha256: str, version: str, embedder_id: str, chunking: dict) -> str:
    """Identifies what a staging collection is being built from, so a killed run can resume it
    (never one made with another schema)."""
    raw = json.dumps([sha256, version, embedder_id, sorted(chunking.items()), SCHEMA_VERSION])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def builds_of(client: MilvusClient, alias: str) -> list[str]:
    """Physical collections built for an alias, oldest first (names sort by build time)."""
    return sorted((c for c in client.list_collections() if c.startswith(f"{alias}__")),
                  key=lambda c: c.rsplit("__", 1)[-1])


def resumable_build(client: MilvusClient, alias: str, key: str) -> str | None:
    """An unfinished staging collection of the same release and configuration, if any."""
    for name in reversed(builds_of(client, alias)):
        info = store.collection_info(client, name)
        if info.get("state") == "building" and info.get("build_key") == key:
            return name
    return None


@dataclass(frozen=True)
class BuildPlan:
    """What a release's build starts from; decided before anything is embedded or written."""

    alias: str  # the main alias of the release's language
    version_alias: str
    version: str
    lang: str  # the docs' language (the release tree's top folder)
    key: str
    main: MainAlias  # whether the main alias moves to this build
    base: str | None  # the collection served now (the version's own alias first)
    target: str | None  # an unfinished staging collection of the same build, resumed
    diff: ReleaseDiff

    base_version: str | None  # the version the base was built from

    @property
    def unchanged(self) -> bool:
        """Nothing to resume, and the base serves exactly these ids for this version: nothing to
        embed, nothing to write."""
        return self.target is None and self.base is not None and self.base_version == self.version \
            and set(self.diff.served_ids) == self.diff.new_ids


def plan_build(client: MilvusClient, collection: str, rel: Release, chunks: list[Chunk], embedder_id: str,
               chunking: dict, main: MainAlias, lang: str = DEFAULT_LANGUAGE) -> BuildPlan:
    alias, versioned = aliases_for(collection, None, lang), aliases_for(collection, rel.version, lang)
    base = store.served_collection(client, versioned) or store.served_collection(client, alias)
    base = base and store.loaded(client, base)
    key = build_key(rel.sha256, rel.version, embedder_id, chunking)
    target = resumable_build(client, alias, key)
    target = target and store.loaded(client, target)
    diff = ReleaseDiff(chunks, store.doc_of_ids(client, base) if base else {},
                       frozenset(store.doc_of_ids(client, target)) if target else frozenset())
    base_version = store.collection_info(client, base).get("version") if base else None
    return BuildPlan(alias, versioned, rel.version, lang, key, main, base, target, diff, base_version)


def check_guard_rails(plan: BuildPlan, force: bool) -> None:
    """Refuse a build that would publish nothing, or drop more than half of what is served."""
    kept, served = plan.diff.kept_documents()
    if force:
        return
    if not plan.diff.chunks:
        raise GuardRailError(f"refusing to publish {plan.alias}: the new build has no chunks "
                             "(use --force to publish anyway)")
    if served and kept * 2 < served:
        raise GuardRailError(
            f"refusing to move {plan.alias}: the new build keeps {kept} of the {served} documents served now "
            f"({served - kept} lost, more than half); check the release or re-run with --force")


def staging_collection(client: MilvusClient, plan: BuildPlan, rel: Release, embedder_id: str, dim: int,
                       multilingual_dim: int | None) -> str:
    """The collection the build writes into: the resumed one, or a new one marked ``building``."""
    if plan.target:
        return plan.target
    stamp = datetime.now(timezone.utc).strftime(_BUILD_TIME)
    name = f"{plan.alias}__{version_slug(rel.version)}__{stamp}"
    create_collection(client, name, dim, bm25=store.capabilities(client).bm25, multilingual_dim=multilingual_dim, info={
        "build_key": plan.key, "state": "building", "version": rel.version, "lang": plan.lang,
        "release_sha256": rel.sha256, "embedder": embedder_id})
    return name


def validate(client: MilvusClient, collection: str, expected: int) -> None:
    # Seal what was written: indexed segments, not a brute-force scan of the write buffer,
    # are what readers get once the alias moves (Milvus Lite: 400 ms -> 70 ms per search).
    client.flush(collection)
    rows = store.count(client, collection)
    if rows != expected:
        raise store.StoreError(f"validation failed for {collection}: {rows} rows, expected {expected}")
    if expected and not store.smoke_search(client, collection):
        raise store.StoreError(f"validation failed for {collection}: a smoke search returned nothing")


def keep_serving(client: MilvusClient, plan: BuildPlan) -> None:
    """An unchanged release: its version alias (and the main alias if asked) serve the base."""
    store.point_alias(client, plan.version_alias, plan.base)
    if plan.main == "always":
        store.point_alias(client, plan.alias, plan.base)


def publish(client: MilvusClient, plan: BuildPlan, collection: str, keep: int) -> str | None:
    """Serve a validated build: its version alias always; the main alias ``always``, ``never``, or
    ``if-newer`` than the version it serves. What each alias served before is recorded on the
    build, so a rollback can undo exactly this publish. Returns what the main alias served before."""
    previous = store.served_collection(client, plan.alias)
    served_version = store.collection_info(client, previous).get("version") if previous else None
    newer = served_version is None or version_order(plan.version) >= version_order(served_version)
    moves_main = plan.main == "always" or (plan.main == "if-newer" and newer)
    store.set_collection_info(client, collection, {
        **store.collection_info(client, collection), "state": "ready",
        "previous": previous if moves_main else None,
        "previous_version_collection": store.served_collection(client, plan.version_alias)})
    store.point_alias(client, plan.version_alias, collection)
    if moves_main:
        store.point_alias(client, plan.alias, collection)
    drop_old_builds(client, plan.alias, keep)
    return previous


def drop_old_builds(client: MilvusClient, alias: str, keep: int) -> list[str]:
    """Drop builds beyond the newest ``keep``, never one an alias points at."""
    served = set(store.aliases(client).values())
    dropped = [c for c in builds_of(client, alias)[:-keep] if c not in served]
    for name in dropped:
        client.drop_collection(name)
    return dropped


def rollback(client: MilvusClient, collection: str, lang: str = DEFAULT_LANGUAGE) -> tuple[str, str]:
    """Undo the last publish of ``alias``: the main alias goes back to the collection it served
    before, and the rolled-back build's version alias goes back to what it served before that
    publish (or is removed, when that publish created it), so no alias keeps serving the build
    rolled back from. Returns (from, to)."""
    alias = aliases_for(collection, None, lang)
    current = store.served_collection(client, alias)
    info = store.collection_info(client, current) if current else {}
    previous = info.get("previous")
    if not previous or not client.has_collection(previous):
        raise store.StoreError(f"nothing to roll back to: {alias} serves {current or 'nothing'} "
                               "and no earlier collection is kept")
    store.point_alias(client, alias, previous)
    if info.get("version"):
        versioned = aliases_for(collection, info["version"], lang)
        before = info.get("previous_version_collection")
        if store.served_collection(client, versioned) == current:
            if before and client.has_collection(before):
                store.point_alias(client, versioned, before)
            else:
                client.drop_alias(versioned)
    return current, previous


@contextmanager
def build_lock(home: Path, alias: str) -> Iterator[None]:
    """One build per alias at a time on this host; a second one exits with who holds it."""
    path = home / "locks" / f"{alias}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise store.StoreError(f"another ingest of {alias!r} is running ({handle.read().strip() or 'unknown'}); "
                                   "wait for it to finish") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def batched(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
