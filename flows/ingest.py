"""The main job: a docs release in, a validated Milvus collection served under an alias out.

fetch -> extract -> parse -> chunk -> plan the build (diff against what is served) -> embed what
is new and write it (parallel batches, one writer) -> validate -> publish (move the aliases) -> report.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from urllib.parse import urlparse

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.assets import Asset, AssetProperties
from prefect.cache_policies import NONE
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote
from pymilvus import MilvusClient

from docsrag.tasks.core import language
from docsrag.tasks.core.objectstore import ObjectStore, open_store
from docsrag.tasks.core.settings import MAX_EMBEDDING_CONCURRENCY, Settings, settings_for_run
from docsrag.tasks.core.summaries import IngestSummary
from docsrag.tasks.core.terminal import current
from docsrag.tasks.embed import embedding
from docsrag.tasks.index import build, lineage, quarantine, store, writer_lock
from docsrag.tasks.index import publish as publishing
from docsrag.tasks.index import schema as index
from docsrag.tasks.index.build import BuildPlan, batched
from docsrag.tasks.index.schema import Corpus
from docsrag.tasks.ingest import chunking, markdown
from docsrag.tasks.ingest.release import (
    Release,
    ReleaseError,
    ReleaseUnreachable,
    TransientFetchError,
    extract_release,
    fetch_release,
)
from docsrag.tasks.ingest.report import StageClock, log_problems, name_run, progress_bar, publish_artifacts
from docsrag.tasks.ingest.source_policy import check_run_source

# Task results stay in memory, never in result storage: they are local paths, clients or vectors
# (never persisted), and a retried run resumes from its staging collection instead (README).
IN_MEMORY = {"cache_policy": NONE, "persist_result": False}
WRITE_RETRIES = {"retries": 3, "retry_delay_seconds": [1, 5, 15], **IN_MEMORY}  # per run: _with_write_retries


def _with_write_retries(write_task, settings: Settings):
    """A write or copy task retried as DOCSRAG_MILVUS_WRITE_RETRY_DELAYS_S says (one retry per wait)."""
    delays = settings.milvus_write_retry_delays
    return write_task.with_options(retries=len(delays), retry_delay_seconds=delays or 0)


@flow(name="ingest-docs", flow_run_name=lambda: _run_name(flow_run.parameters),
      # Threads are made as batches are submitted; the flow keeps DOCSRAG_EMBEDDING_CONCURRENCY in flight.
      task_runner=ThreadPoolTaskRunner(max_workers=MAX_EMBEDDING_CONCURRENCY))
def ingest_release(release: str | None = None, version: str | None = None, force: bool = False,
                   publish_main: bool = False, collection: str | None = None) -> IngestSummary:
    """Ingest one docs release (https, s3, file URL or path; default DOCSRAG_RELEASE_URL) into the
    alias ``collection`` (default DOCSRAG_COLLECTION). A release without a version (none given,
    none in its name) is served on its own alias only, unless ``publish_main``."""
    settings = settings_for_run(release_url=release, collection=collection)
    clock = StageClock()
    writer_lock.check_coordinated(settings)  # refused before the model starts (the probe asks an embedding server)
    # A deployment's run of a release the operator does not allow (a hostile event) fails here, before
    # the model loads; fetch checks again, with each redirect of the download.
    check_run_source(settings, version)
    # The embedders resolved (the model, its variant on this CPU) and loaded while the writer slot is
    # taken and the release fetched; the choice is passed on from here to every load.
    resolving = embedding.preload(settings)
    objects = open_store(settings.object_store, settings.s3_endpoint_url)
    # One writer per corpus from the first stage: two runs never share a download, an extraction
    # or a publish (tasks/index/writer_lock.py).
    with writer_lock.held(settings):
        rel = clock.run("fetch", fetch, settings, objects, version)
        root = clock.run("extract", extract, settings, objects, rel)
        parsed = clock.run("parse", parse, root, markdown.Budgets.of(settings))
        choice = resolving.result()  # its id is in every chunk id
        chunks = clock.run("chunk", chunk, parsed, settings, choice.id)
        with store.milvus_errors(settings.milvus_uri):
            client, set_aside = clock.run("open-store", open_milvus, settings, force)
            main = "always" if publish_main else "if-newer" if rel.named else "never"
            planned = clock.run("plan", plan, client, settings, rel, chunks, main, force, choice.id)
            summary = _summary(settings, rel, planned, parsed)
            target = planned.serves or clock.run("embed+write", embed_and_write, client, settings, planned, rel, clock,
                                                    choice)
            if not planned.unchanged:
                clock.run("validate", validate, client, target, planned.diff.new_ids)
                summary.embedded, summary.reused = len(planned.diff.to_embed()), len(planned.diff.reusable())
                summary.resumed = planned.resumed
                summary.seconds_saved = _seconds_saved(clock, summary.embedded, summary.reused)
            summary.previous_collection = clock.run("publish", publish, client, settings, planned, rel, target,
                                                    objects.uri(rel.archive_key), set_aside)
            summary.set_aside = [s.to_dict() for s in set_aside]
            summary.collection = store.served_collection(client, planned.version_alias)
            summary.search = _search_mode(client, summary.collection)
    summary.stages, summary.seconds = clock.seconds, clock.total
    report(summary, planned, objects)
    return summary


def open_milvus(settings: Settings, force: bool) -> tuple[MilvusClient, list[quarantine.SetAside]]:
    """The index, and the damaged Milvus Lite collections ``--force`` set aside (tasks/index/quarantine.py).
    Without ``--force`` a damaged collection fails the plan, its error naming the commands that recover."""
    client = store.connect(settings)
    return client, quarantine.readable(client, settings, get_run_logger().warning) if force else []


def _run_name(parameters: dict) -> str:
    named = parameters.get("version") or (parameters.get("release") or "").rsplit("/", 1)[-1].split("?")[0]
    return f"ingest {named or 'the configured release'}"[:100]


def _transient(task, task_run, state) -> bool:
    """A server that may answer on the next try. One that cannot be reached at all is retried in a
    deployment's run (a network blip); a person at the terminal is told at once what to do."""
    failure = state.result(raise_on_failure=False)
    if isinstance(failure, ReleaseUnreachable):
        return current() is None
    return isinstance(failure, TransientFetchError)


@task(retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=_transient, **IN_MEMORY)
def fetch(settings: Settings, objects: ObjectStore, version: str | None) -> Release:
    redirects = check_run_source(settings, version)  # a deployment's run fetches only what the operator allows
    rel = fetch_release(settings.release_url, home=settings.home, store=objects, version=version,
                        timeout_s=settings.download_timeout_s, s3_endpoint_url=settings.s3_endpoint_url,
                        max_bytes=settings.max_archive_bytes, deadline_s=settings.download_deadline_s,
                        check_redirect=redirects)
    get_run_logger().info("Fetched %s: version %s, %s bytes, sha256 %s (%s)", rel.url, rel.version,
                          f"{rel.size:,}", rel.sha256, "archived" if rel.newly_archived else "already archived")
    name_run(f"ingest {rel.version}")
    return rel


@task(**IN_MEMORY)
def extract(settings: Settings, objects: ObjectStore, rel: Release):
    with _forgotten_if_refused(rel, objects):
        return extract_release(rel, settings.home / "releases", max_bytes=settings.max_archive_bytes,
                               max_files=settings.max_archive_files)


@task(**IN_MEMORY)
def parse(root, budgets) -> markdown.ParsedRelease:
    parsed = markdown.parse_release(root, budgets)
    log = get_run_logger()
    log.info("Parsed %d documents (%d skipped, %d with warnings)", len(parsed.documents), len(parsed.skipped),
             len({w["path"] for w in parsed.warnings}))
    return parsed


@task(**IN_MEMORY)
def chunk(parsed: markdown.ParsedRelease, settings: Settings, embedder_id: str) -> list[chunking.Chunk]:
    chunks = chunking.chunk_release(parsed, settings.chunking_config, embedder_id,
                                    max_document_chunks=settings.max_document_chunks,
                                    max_release_chunks=settings.max_release_chunks)
    log = get_run_logger()
    log.info("Chunked into %s chunks", f"{len(chunks):,}")
    log_problems(log, parsed.skipped, parsed.warnings)
    return chunks


@task(**IN_MEMORY)
def plan(client, settings: Settings, rel: Release, chunks: list[chunking.Chunk], main: publishing.MainPolicy,
         force: bool, embedder_id: str) -> BuildPlan:
    corpus = Corpus(settings.collection, language.of_tree(c.doc_path for c in chunks))
    planned = build.plan_build(client, corpus, rel, chunks, build.build_inputs(settings, embedder_id), main)
    build.check_guard_rails(planned, force)
    diff = planned.diff
    log = get_run_logger()
    carried = f", {planned.resumed:,} carried over from an interrupted build" if planned.resumed else ""
    log.info("Compared with %s: %s chunks new, %s served already, %s deleted%s", planned.base or "nothing served",
             f"{len(diff.to_embed()):,}", f"{len(diff.reusable()):,}", f"{diff.deleted:,}", carried)
    if planned.unchanged:
        log.info("Release %s unchanged: %s stays on %s", rel.version, planned.alias, planned.base)
    return planned


@task(**IN_MEMORY)
def validate(client, collection: str, expected: set[str]) -> None:
    build.validate(client, collection, expected)
    get_run_logger().info("Validated %s: exactly the release's %s chunk ids, a smoke search finds them", collection,
                          f"{len(expected):,}")


@task(name="embed-batch", retries=2, retry_delay_seconds=5, **IN_MEMORY)
def embed_batch(texts: list[str], settings: Settings, choice: embedding.EmbedderChoice,
                multilingual: bool) -> list[dict[str, list[float]]]:
    """Each text's vectors by field: ``dense`` (and ``dense_multilingual`` where the build has it),
    by the embedders the flow resolved, also on a Dask worker (whose CPU might choose otherwise)."""
    fields = {"dense": embedding.embedder_for(settings, choice).embed(texts)}
    if multilingual:
        fields[index.MULTILINGUAL] = embedding.multilingual_for(settings, choice).embed(texts)
    return [dict(zip(fields, vectors)) for vectors in zip(*fields.values())]


@task(name="write-batch", **WRITE_RETRIES)
def write_batch(client, collection: str, rows: list[dict]) -> None:
    store.upsert(client, collection, rows)


@task(name="copy-batch", **WRITE_RETRIES)
def copy_batch(client, base: str, target: str, chunks: list[chunking.Chunk], version: str) -> int:
    """Served vectors of unchanged chunks, copied into the new build instead of re-embedded."""
    vectors = store.vectors_of(client, base, [c.id for c in chunks], store.vector_fields(client, base))
    store.upsert(client, target, [index.row(c, vectors[c.id], version) for c in chunks])
    return len(chunks)


def embed_and_write(client, settings: Settings, plan: BuildPlan, rel: Release, clock: StageClock,
                    choice: embedding.EmbedderChoice) -> str:
    """Embed new chunks in parallel batches and write each batch as it lands (one writer), so a
    killed run keeps every finished batch in the staging collection. Served vectors are copied
    while the first batches embed. The "write" stage is the writer's share of "embed+write".
    -> the staging collection."""
    embedder = clock.run("model-wait", embedding.embedder_for, settings, choice)
    # A second vector field needs Milvus 2.4: older servers search with the English model alone.
    multilingual = embedding.multilingual_for(settings, choice) if store.capabilities(client).multiple_vectors else None
    target = build.staging_collection(client, plan, rel, choice.id, embedder.dim,
                                      multilingual and multilingual.dim)
    chunks = plan.diff.to_embed()
    # A small release is split so every batch slot (and so every core) has work: 49 chunks embed
    # as two batches, not one on one core.
    size = max(1, min(settings.embedding_batch_size, -(-len(chunks) // settings.embedding_concurrency)))
    # Similar lengths per batch: less padding. Longest first: the last batches are the cheap ones,
    # so no core idles long while the final batch runs alone.
    waiting = batched(sorted(chunks, key=lambda c: len(c.embed_text), reverse=True), size)
    batches, numbers, in_flight = -(-len(chunks) // size), itertools.count(1), {}

    def submit_next() -> None:
        if (batch := next(waiting, None)) is not None:
            named = embed_batch.with_options(task_run_name=f"embed-batch {next(numbers)}/{batches}")
            in_flight[named.submit([c.embed_text for c in batch], settings, choice, multilingual is not None)] = batch

    copy, write = _with_write_retries(copy_batch, settings), _with_write_retries(write_batch, settings)
    artifact = create_progress_artifact(0.0, description=f"Embedding {len(chunks)} chunks")
    done = 0
    with embedding.cores_shared_by(settings.embedding_concurrency), progress_bar(len(chunks), "embedding") as bar:
        for _ in range(settings.embedding_concurrency):  # bounds what a killed run can lose
            submit_next()
        with clock("write"):
            for part in batched(plan.diff.reusable(), build.COPY_BATCH_ROWS):
                copy(client, plan.base, target, quote(part), rel.version)
        while in_flight:
            future = next(as_completed(list(in_flight)))
            batch = in_flight.pop(future)
            vectors = future.result()
            submit_next()
            with clock("write"):
                # quote(): Prefect would otherwise walk every float of every vector looking for
                # futures (7 s per 1000 rows, measured), in the flow thread, while the embedding runs.
                write(client, target, quote([index.row(c, v, rel.version) for c, v in zip(batch, vectors)]))
            done += len(batch)
            bar.update(len(batch))
            update_progress_artifact(artifact, 100.0 * done / len(chunks))
    seconds = clock.elapsed("embed+write")
    get_run_logger().info("Embedded %s chunks and copied %s in %.1f s (%.0f chunks/s) into %s", f"{done:,}",
                          f"{len(plan.diff.reusable()):,}", seconds, done / seconds if seconds else 0.0, target)
    return target


def publish(client, settings: Settings, plan: BuildPlan, rel: Release, target: str, archive: str,
            set_aside: list[quarantine.SetAside]) -> str | None:
    """Point the aliases (tasks/index/publish.py), as materializing steps: the event feed shows the
    release archive that produced the collection, and which alias serves it. -> what the main alias
    served before."""
    uri, alias = settings.milvus_uri, plan.alias
    collection = lineage.milvus_asset(uri, target, f"docs {rel.version}, release sha256 {rel.sha256}")
    release = Asset(key=lineage.asset_key(archive), properties=AssetProperties(name=f"release {rel.version}"))
    step = publishing.publish if plan.unchanged else lineage.materializing(
        publishing.publish, "publish", [collection, lineage.milvus_asset(uri, plan.version_alias,
                                                                          f"serves docs {rel.version}")], [release])
    done = step(client, Corpus(settings.collection, plan.lang), target, plan.main, settings.keep_collections)
    # A main alias that served a build set aside served it until this run, whatever the builds left say.
    before = next((s.collection for s in set_aside if alias in s.aliases), done.main_before)
    if done.main_after == target and before != target:
        lineage.materializing(lambda: None, "serve-main-alias", [lineage.milvus_asset(
            uri, alias, "the newest docs")], [collection])()
    log = get_run_logger()
    log.info("%s; %s serves %s", _main_alias_line(alias, before, done.main_after), plan.version_alias, target)
    if done.dropped:
        log.info("Dropped %d builds no alias or rollback needs: %s", len(done.dropped), ", ".join(done.dropped))
    return before


def _main_alias_line(alias: str, before: str | None, after: str | None) -> str:
    if after == before:
        return f"{alias} still serves {after}" if after else f"{alias} serves nothing yet"
    return f"{alias} serves {after} (was {before})" if before else f"{alias} serves {after} (its first build)"


def report(summary: IngestSummary, plan: BuildPlan, objects: ObjectStore) -> None:
    """Artifacts for the UI; the JSON summary archived in the object store under reports/."""
    publish_artifacts(summary, plan.diff.documents(), Counter(c.doc_path for c in plan.diff.chunks))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    objects.put_bytes(f"reports/{summary.version}/{stamp}.json", json.dumps(summary.to_dict(), indent=2).encode())
    name_run(f"ingest {summary.version} " + ("(unchanged)" if summary.unchanged else f"({summary.embedded:,} new)"))


def task_runner(spec: str, settings: Settings):
    """``dask``: a local Dask cluster, one single-threaded worker process per embedding batch in
    flight; ``dask=tcp://scheduler:8786``: an existing cluster. Only the embedding batches run
    there: they are the work that scales; writes stay with the one writer in the flow."""
    name, _, address = spec.partition("=")
    if name != "dask":
        raise ValueError(f"unknown task runner {spec!r}: use dask or dask=ADDRESS")
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=_private_channel(address))
    return DaskTaskRunner(cluster_kwargs={"n_workers": settings.embedding_concurrency, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None})


def _private_channel(address: str) -> str:
    """Embedding batches carry the run's settings, secrets included, to the scheduler's workers:
    over TLS, or to this machine's own loopback, never in clear text across a network."""
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if parsed.scheme != "tls" and parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"refusing Dask scheduler {address!r}: batches carry the run's secrets; use a tls:// "
                         "address (Dask's TLS security settings) or a scheduler on this machine's loopback")
    return address


@contextmanager
def _forgotten_if_refused(rel: Release, objects: ObjectStore) -> Iterator[None]:
    """An archive refused at extraction (a bomb, a corrupt zip) is not kept: not in the object
    store if this run put it there, not in the downloads folder."""
    try:
        yield
    except ReleaseError:
        if rel.newly_archived:
            objects.delete(rel.archive_key)
        if rel.downloaded:
            shutil.rmtree(rel.path.parent, ignore_errors=True)  # downloads/<sha256>/
        raise


def _summary(settings: Settings, rel: Release, plan: BuildPlan, parsed: markdown.ParsedRelease) -> IngestSummary:
    diff = plan.diff
    return IngestSummary(
        release=rel.url, version=rel.version, sha256=rel.sha256, size=rel.size, archived=rel.archive_key,
        alias=plan.alias, version_alias=plan.version_alias, lang=plan.lang, named_version=rel.named,
        documents=len({c.doc_path for c in diff.chunks}), chunks=len(diff.chunks),
        document_changes=diff.document_counts(), deleted=diff.deleted, previous_collection=plan.base,
        unchanged=plan.unchanged, skipped=parsed.skipped, warnings=parsed.warnings)


def _search_mode(client, collection: str) -> str:
    return "hybrid (dense + BM25, RRF)" if store.has_bm25(client, collection) else "dense only (server has no BM25)"


def _seconds_saved(clock: StageClock, embedded: int, reused: int) -> float:
    per_chunk = clock.seconds.get("embed+write", 0.0) / embedded if embedded else 0.0
    return round(per_chunk * reused, 1)
