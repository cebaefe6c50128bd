"""The main job: a docs release in, a validated Milvus collection served under an alias out.

fetch -> extract -> parse -> chunk -> diff against what is served -> embed what is new
(parallel batches) -> write -> validate -> move the aliases -> report.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

from prefect import flow, get_run_logger, task
from prefect.assets import Asset, AssetProperties
from prefect.runtime import flow_run
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NONE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote
from tqdm import tqdm

from tasks import chunking, embedding, markdown, store
from tasks.diff import ReleaseDiff
from tasks.objectstore import open_store
from tasks.release import Release, ReleaseError, TransientFetchError, extract_release, fetch_release
from tasks import lineage
from tasks.report import StageClock, log_problems, name_run, publish_artifacts
from tasks.settings import Settings, load_settings


class GuardRailError(RuntimeError):
    """The new build would remove too much of what is served; --force overrides."""


# Task results stay in memory, never in result storage: they are local paths, clients or vectors
# (never persisted), and a retried run resumes from its staging collection instead (README).
IN_MEMORY = {"cache_policy": NONE, "persist_result": False}
WRITE_RETRIES = {"retries": 3, "retry_delay_seconds": [1, 5, 15], **IN_MEMORY}


def _transient(task, task_run, state) -> bool:
    return isinstance(state.result(raise_on_failure=False), TransientFetchError)


fetch = task(fetch_release, name="fetch", retries=3, retry_delay_seconds=[2, 10, 30],
             retry_condition_fn=_transient, **IN_MEMORY)
extract = task(extract_release, name="extract", **IN_MEMORY)
parse = task(markdown.parse_release, name="parse", **IN_MEMORY)
chunk = task(chunking.chunk_release, name="chunk", **IN_MEMORY)


@task(name="embed-batch", retries=2, retry_delay_seconds=5, **IN_MEMORY)
def embed_batch(texts: list[str], settings: Settings) -> list[list[float]]:
    return embedding.embedder_for(settings).embed(texts)


_upsert = task(store.upsert, name="write-batch", **WRITE_RETRIES)


def write_batch(client, collection: str, rows: list[dict]) -> None:
    # quote(): Prefect would otherwise walk every float of every vector looking for futures
    # (7 s per 1000 rows, measured), in the flow thread, while the embedding runs.
    _upsert(client, collection, quote(rows))


def _run_name() -> str:
    parameters = flow_run.parameters
    named = parameters.get("version") or (parameters.get("release") or "").rsplit("/", 1)[-1].split("?")[0]
    return f"ingest {named or 'the configured release'}"[:100]


@flow(name="ingest-docs", task_runner=ThreadPoolTaskRunner(max_workers=4), flow_run_name=_run_name)
def ingest_release(release: str | None = None, version: str | None = None, force: bool = False,
                   progress: bool = False, publish_main: bool = False) -> dict:
    """Ingest one docs release (https, s3, file URL or path; default DOCSRAG_RELEASE_URL). A release
    without a version (none given, none in its name) is served on its own alias only, unless
    ``publish_main``."""
    settings = load_settings(release_url=release)
    log = get_run_logger()
    clock = StageClock()
    embedding.preload(settings)
    objects = open_store(settings.object_store, settings.s3_endpoint_url)
    with clock("fetch"):
        rel = fetch(settings.release_url, home=settings.home, store=objects, version=version,
                    timeout_s=settings.download_timeout_s, s3_endpoint_url=settings.s3_endpoint_url,
                    max_bytes=settings.max_archive_bytes, deadline_s=settings.download_deadline_s)
    log.info("Fetched %s: version %s, %s bytes, sha256 %s (%s)", rel.url, rel.version, f"{rel.size:,}", rel.sha256,
             "archived" if rel.newly_archived else "already archived")
    name_run(f"ingest {rel.version}")
    with clock("extract"), _forgotten_if_refused(rel, objects):
        root = extract(rel, settings.home / "releases", max_bytes=settings.max_archive_bytes,
                       max_files=settings.max_archive_files)
    with clock("parse"):
        parsed = parse(root, settings.parse_budgets)
    log.info("Parsed %d documents (%d skipped, %d with warnings)", len(parsed.documents), len(parsed.skipped),
             len({w["path"] for w in parsed.warnings}))
    with clock("chunk"):
        chunks = chunk(parsed, settings.chunking_config, settings.embedder_id,
                       max_document_chunks=settings.max_document_chunks,
                       max_release_chunks=settings.max_release_chunks)
    log.info("Chunked into %s chunks", f"{len(chunks):,}")
    log_problems(log, parsed.skipped, parsed.warnings)
    with store.build_lock(settings.home, settings.collection), store.milvus_errors(settings.milvus_uri):
        client = store.connect(settings)
        main = "always" if publish_main else "if-newer" if rel.named else "never"
        summary, diff = _build_and_publish(client, settings, rel, chunks, clock, force, progress, main,
                                           archive=objects.uri(rel.archive_key))
    summary.update(skipped=parsed.skipped, warnings=parsed.warnings, stages=clock.seconds, seconds=clock.total)
    _report(summary, diff, objects)
    name_run(f"ingest {rel.version} " + ("(unchanged)" if summary["unchanged"] else f"({summary['embedded']:,} new)"))
    return summary


def task_runner(spec: str, settings: Settings):
    """``dask``: a local Dask cluster, one single-threaded worker process per embedding batch in
    flight; ``dask=tcp://scheduler:8786``: an existing cluster. Only the embedding batches run
    there: they are the work that scales; writes stay with the one writer in the flow."""
    name, _, address = spec.partition("=")
    if name != "dask":
        raise ValueError(f"unknown task runner {spec!r}: use dask or dask=ADDRESS")
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": settings.embedding_concurrency, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None})


@contextmanager
def _forgotten_if_refused(rel: Release, objects) -> Iterator[None]:
    """An archive refused at extraction (a bomb, a corrupt zip) is not kept: not in the object
    store if this run put it there, not in the downloads folder."""
    try:
        yield
    except ReleaseError:
        if rel.newly_archived:
            objects.delete(rel.archive_key)
        if rel.path.parent.name == "downloads":
            rel.path.unlink(missing_ok=True)
        raise


def _build_and_publish(client, settings: Settings, rel: Release, chunks: list[chunking.Chunk],
                       clock: StageClock, force: bool, progress: bool, main: store.MainAlias, archive: str) -> dict:
    log = get_run_logger()
    alias, version_alias = settings.collection, store.version_alias(settings.collection, rel.version)
    base = store.served_collection(client, version_alias) or store.served_collection(client, alias)
    base = base and store.loaded(client, base)
    build_key = store.build_key(rel.sha256, rel.version, settings.embedder_id, settings.chunking_config)
    with clock("diff"):
        target = store.resumable_build(client, alias, build_key)
        target = target and store.loaded(client, target)
        diff = ReleaseDiff(chunks, store.doc_of_ids(client, base) if base else {},
                           frozenset(store.doc_of_ids(client, target)) if target else frozenset())
        _check_guard_rails(diff, alias, force)
    log.info("Compared with %s: %s chunks new, %s served already, %s deleted", base or "nothing served",
             f"{len(diff.to_embed()):,}", f"{len(diff.reusable()):,}", f"{diff.deleted:,}")
    summary = _summary(settings, rel, diff, base, version_alias)
    if base and _serves_exactly(client, base, diff, rel.version) and target is None:
        log.info("Release %s unchanged: %s stays on %s", rel.version, alias, base)
        store.point_alias(client, version_alias, base)
        if main == "always":
            store.point_alias(client, alias, base)
        return {**summary, "unchanged": True, "collection": base, "search": _search_mode(client, base)}, diff
    embedder = embedding.embedder_for(settings)
    if target is None:
        target = store.new_collection_name(alias, rel.version)
        store.create_collection(client, target, embedder.dim, bm25=store.supports_bm25(client),
                                info={"build_key": build_key, "state": "building", "version": rel.version,
                                      "release_sha256": rel.sha256, "embedder": settings.embedder_id})
    with clock("embed+write"):
        embedded, reused = _write_all(client, settings, base, target, diff, rel.version, progress, clock)
    seconds = clock.seconds["embed+write"]
    log.info("Embedded %s chunks and copied %s in %.1f s (%.0f chunks/s) into %s", f"{embedded:,}", f"{reused:,}",
             seconds, embedded / seconds if seconds else 0.0, target)
    with clock("validate"):
        _validate(client, target, len(chunks))
    log.info("Validated %s: %s rows, a smoke search finds them", target, f"{len(chunks):,}")
    with clock("publish"):
        previous = _publish(client, settings, rel, target, version_alias, main, archive)
    return {**summary, "collection": target, "previous_collection": previous, "embedded": embedded,
            "reused": reused, "search": _search_mode(client, target),
            "seconds_saved": _seconds_saved(clock, embedded, reused)}, diff


def _publish(client, settings: Settings, rel: Release, target: str, version_alias: str, main: store.MainAlias,
             archive: str) -> str | None:
    """Point the aliases, as materializing steps: the event feed shows the release archive that
    produced the collection, and which alias serves it."""
    alias, uri = settings.collection, settings.milvus_uri
    collection = lineage.milvus_asset(uri, target, f"docs {rel.version}, release sha256 {rel.sha256}")
    release = Asset(key=lineage.asset_key(archive), properties=AssetProperties(name=f"release {rel.version}"))
    publish = lineage.materializing(store.publish, "publish", [collection, lineage.milvus_asset(
        uri, version_alias, f"serves docs {rel.version}")], [release])
    previous = publish(client, alias, version_alias, target, rel.version, settings.keep_collections, main=main)
    now = store.served_collection(client, alias)
    if now == target and previous != target:
        lineage.materializing(lambda: None, "serve-main-alias", [lineage.milvus_asset(
            uri, alias, "the newest docs")], [collection])()
    get_run_logger().info("%s serves %s (was %s); %s serves it too", alias, now, previous, version_alias)
    return previous


def _search_mode(client, collection: str) -> str:
    return "hybrid (dense + BM25, RRF)" if store.has_bm25(client, collection) else "dense only (server has no BM25)"


def _summary(settings: Settings, rel: Release, diff: ReleaseDiff, base: str | None,
             version_alias: str) -> dict:
    return {
        "release": rel.url, "version": rel.version, "sha256": rel.sha256, "size": rel.size,
        "archived": rel.archive_key, "alias": settings.collection, "version_alias": version_alias,
        "named_version": rel.named,
        "collection": None, "previous_collection": base, "unchanged": False,
        "documents": len({c.doc_path for c in diff.chunks}), "chunks": len(diff.chunks),
        "embedded": 0, "reused": 0, "deleted": diff.deleted, "document_changes": diff.document_counts(),
        "search": None, "seconds_saved": 0.0,
    }


def _serves_exactly(client, collection: str, diff: ReleaseDiff, version: str) -> bool:
    """Same ids and same version: nothing to embed, nothing to write."""
    info = store.collection_info(client, collection)
    return set(diff.served_ids) == diff.new_ids and info.get("version") == version


def _check_guard_rails(diff: ReleaseDiff, alias: str, force: bool) -> None:
    kept, served = diff.kept_documents()
    if force:
        return
    if not diff.chunks:
        raise GuardRailError(f"refusing to publish {alias}: the new build has no chunks "
                             "(use --force to publish anyway)")
    if served and kept * 2 < served:
        raise GuardRailError(
            f"refusing to move {alias}: the new build keeps {kept} of the {served} documents served now "
            f"({served - kept} lost, more than half); check the release or re-run with --force")


@task(name="copy-batch", **WRITE_RETRIES)
def copy_batch(client, base: str, target: str, chunks: list[chunking.Chunk], version: str) -> int:
    """Served vectors of unchanged chunks, copied into the new build instead of re-embedded."""
    vectors = store.vectors_of(client, base, [c.id for c in chunks])
    store.upsert(client, target, [_row(c, vectors[c.id], version) for c in chunks])
    return len(chunks)


def _copy_reused(client, base: str | None, target: str, chunks: list[chunking.Chunk], version: str) -> int:
    return sum(copy_batch(client, base, target, quote(batch), version) for batch in batched(chunks, 1000))


def _write_all(client, settings: Settings, base: str | None, target: str, diff: ReleaseDiff, version: str,
               progress: bool, clock: StageClock) -> tuple[int, int]:
    """Embed new chunks in parallel batches and write each batch as it lands (one writer), so a
    killed run keeps every finished batch in the staging collection. Served vectors are copied
    while the first batches embed. The "write" stage is the writer's share of "embed+write".
    -> (embedded, reused)"""
    chunks = diff.to_embed()
    # Similar lengths per batch: less padding. Longest first: the last batches are the cheap ones,
    # so no core idles long while the final batch runs alone.
    waiting = batched(sorted(chunks, key=lambda c: len(c.embed_text), reverse=True), settings.embedding_batch_size)
    in_flight: dict = {}

    batches = -(-len(chunks) // settings.embedding_batch_size)
    submitted = 0

    def submit_next() -> None:
        nonlocal submitted
        if (batch := next(waiting, None)) is not None:
            submitted += 1
            named = embed_batch.with_options(task_run_name=f"embed-batch {submitted}/{batches}")
            in_flight[named.submit([c.embed_text for c in batch], settings)] = batch

    artifact = create_progress_artifact(0.0, description=f"Embedding {len(chunks)} chunks")
    done = 0
    with embedding.cores_shared_by(settings.embedding_concurrency), \
            tqdm(total=len(chunks), unit="chunk", desc="embedding", disable=not progress or not chunks) as bar:
        for _ in range(settings.embedding_concurrency):  # bounds what a killed run can lose
            submit_next()
        with clock("write"):
            reused = _copy_reused(client, base, target, diff.reusable(), version)
        while in_flight:
            future = next(as_completed(list(in_flight)))
            batch = in_flight.pop(future)
            vectors = future.result()
            submit_next()
            with clock("write"):
                write_batch(client, target, [_row(c, v, version) for c, v in zip(batch, vectors)])
            done += len(batch)
            bar.update(len(batch))
            update_progress_artifact(artifact, 100.0 * done / len(chunks))
    return done, reused


def batched(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _row(c: chunking.Chunk, vector: list[float], version: str) -> dict:
    return {"id": c.id, "doc_path": c.doc_path, "title": c.title[:1000], "heading": c.heading[:4000],
            "version": version, "text": c.text, "search_text": c.search_text, "dense": vector}


def _validate(client, collection: str, expected: int) -> None:
    # Seal what was written: indexed segments, not a brute-force scan of the write buffer,
    # are what readers get once the alias moves (Milvus Lite: 400 ms -> 70 ms per search).
    client.flush(collection)
    rows = store.count(client, collection)
    if rows != expected:
        raise store.StoreError(f"validation failed for {collection}: {rows} rows, expected {expected}")
    if expected and not store.smoke_search(client, collection):
        raise store.StoreError(f"validation failed for {collection}: a smoke search returned nothing")


def _seconds_saved(clock: StageClock, embedded: int, reused: int) -> float:
    per_chunk = clock.seconds.get("embed+write", 0.0) / embedded if embedded else 0.0
    return round(per_chunk * reused, 1)


def _report(summary: dict, diff: ReleaseDiff, objects) -> None:
    """Artifacts for the UI; the JSON summary archived in the object store under reports/."""
    publish_artifacts(summary, diff.documents(), Counter(c.doc_path for c in diff.chunks))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    objects.put_bytes(f"reports/{summary['version']}/{stamp}.json", json.dumps(summary, indent=2).encode())
