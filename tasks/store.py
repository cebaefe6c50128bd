"""The Milvus side, in pymilvus ``MilvusClient`` idiom: a few verbs on plain dicts.

Each build writes a new physical collection ``<alias>__<version>__<utc time>``; readers
only ever query the alias, which moves once the new collection is validated.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pymilvus import DataType, Function, FunctionType, MilvusClient
from pymilvus.exceptions import MilvusException

from tasks.chunking import FIELD_MAX
from tasks.release import version_order, version_slug
from tasks.settings import Settings

TEXT_MAX = 65_535  # bytes; chunks are far below, but a VARCHAR needs a bound
OUTPUT_FIELDS = ["doc_path", "title", "heading", "version", "text"]
_BUILD_TIME = "%Y%m%dT%H%M%S%f"
INFO_PROPERTY = "docsrag.info"
AGREEMENT_DEPTH = 5
MainAlias = Literal["always", "never", "if-newer"]
SCHEMA_VERSION = 2  # 2: BM25 over search_text (doc path words, headings, text)


class StoreError(RuntimeError):
    """The index cannot be used as asked; the message says why."""


def connect(settings: Settings) -> MilvusClient:
    uri = settings.milvus_uri
    lite = not re.match(r"^[a-z]+://", uri)
    if lite:  # make sure the Milvus Lite file's folder exists
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    token = settings.milvus_token.get_secret_value() if settings.milvus_token else ""
    # query_iterator warns on every page against Milvus Lite, and Milvus Lite's in-process
    # gRPC server logs a traceback for a timestamp call it does not implement (the iterator
    # falls back by itself). Real errors still surface as exceptions.
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
    try:
        return MilvusClient(uri=uri, token=token, timeout=30)
    except MilvusException as exc:
        if lite:
            raise StoreError(f"cannot open the Milvus Lite file {uri}: {exc.message}. Milvus Lite serves one "
                             "process at a time: is another docsrag command using it? Use a Milvus server "
                             "(DOCSRAG_MILVUS_URI=http://host:19530) for concurrent readers and writers") from None
        raise StoreError(f"cannot reach Milvus at {uri}: {exc.message}") from None


@contextmanager
def milvus_errors(uri: str):
    """A server lost mid-build: say what happened to the index and what to do, in one line."""
    try:
        yield
    except MilvusException as exc:
        if not _unreachable(exc):  # Milvus answered, and refused: say what it refused
            raise StoreError(f"Milvus at {uri} refused a write of the build: {exc.message}. The aliases still "
                             "serve the previous collections") from None
        raise StoreError(f"Milvus at {uri} failed during the build: {exc.message}. The aliases still serve "
                         "the previous collections; run the ingest again once Milvus is reachable (finished "
                         "batches are kept and the build resumes)") from None


def _unreachable(exc: MilvusException) -> bool:
    text = f"{exc.code} {exc.message}".lower()
    return any(sign in text for sign in ("connect", "unavailable", "deadline", "timeout", "closed", "not ready"))


def loaded(client: MilvusClient, name: str) -> str:
    """Collections come back released after a restart (Lite: every new process); load first."""
    client.load_collection(name)
    return name


def supports_bm25(client: MilvusClient) -> bool:
    """BM25 functions arrived in Milvus 2.5; Milvus Lite 3 has them."""
    version = client.get_server_version()
    if version.startswith("milvus_lite"):
        return True
    found = re.search(r"(\d+)\.(\d+)", version)
    return bool(found) and (int(found.group(1)), int(found.group(2))) >= (2, 5)


def new_collection_name(alias: str, version: str) -> str:
    stamp = datetime.now(timezone.utc).strftime(_BUILD_TIME)
    return f"{alias}__{version_slug(version)}__{stamp}"


def create_collection(client: MilvusClient, name: str, dim: int, *, bm25: bool, info: dict) -> None:
    """Schema: id, doc path, title, heading path, version, text, the text BM25 indexes (doc path
    words, headings, text), dense vector (+ BM25 sparse where the server has BM25)."""
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
    for field, limit in FIELD_MAX.items():
        schema.add_field(field, DataType.VARCHAR, max_length=limit)
    schema.add_field("version", DataType.VARCHAR, max_length=64)
    schema.add_field("text", DataType.VARCHAR, max_length=TEXT_MAX)
    schema.add_field("search_text", DataType.VARCHAR, max_length=TEXT_MAX, enable_analyzer=bm25)
    schema.add_field("dense", DataType.FLOAT_VECTOR, dim=dim)
    index = client.prepare_index_params()
    index.add_index("dense", index_type="AUTOINDEX", metric_type="COSINE")
    if bm25:
        schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        schema.add_function(Function(name="text_bm25", function_type=FunctionType.BM25,
                                     input_field_names=["search_text"], output_field_names=["sparse"]))
        index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
    client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")
    set_collection_info(client, name, info)


def set_collection_info(client: MilvusClient, name: str, info: dict) -> None:
    """Record what a build is (release, version, embedder, state) on the collection itself."""
    client.alter_collection_properties(name, {INFO_PROPERTY: json.dumps(info, sort_keys=True)})


def collection_info(client: MilvusClient, name: str) -> dict:
    properties = client.describe_collection(name).get("properties") or {}
    try:
        return json.loads(properties.get(INFO_PROPERTY, "{}"))
    except ValueError:
        return {}


def has_bm25(client: MilvusClient, name: str) -> bool:
    fields = client.describe_collection(name).get("fields", [])
    return any(f.get("name") == "sparse" for f in fields)


def upsert(client: MilvusClient, name: str, rows: list[dict]) -> None:
    if rows:
        client.upsert(name, rows)


def count(client: MilvusClient, name: str) -> int:
    return int(client.query(name, filter="", output_fields=["count(*)"])[0]["count(*)"])


def served_collection(client: MilvusClient, alias: str) -> str | None:
    if alias not in client.list_aliases().get("aliases", []):
        return None
    return client.describe_alias(alias)["collection_name"]


def builds_of(client: MilvusClient, alias: str) -> list[str]:
    """Physical collections built for an alias, oldest first (names sort by build time)."""
    return sorted((c for c in client.list_collections() if c.startswith(f"{alias}__")),
                  key=lambda c: c.rsplit("__", 1)[-1])


def point_alias(client: MilvusClient, alias: str, collection: str) -> None:
    """Atomic for readers: the alias names the old collection until this call returns."""
    if served_collection(client, alias) is None:
        client.create_alias(collection, alias)
    else:
        client.alter_alias(collection, alias)


def drop_old_builds(client: MilvusClient, alias: str, keep: int) -> list[str]:
    """Drop builds beyond the newest ``keep``, never one an alias points at."""
    served = {client.describe_alias(a)["collection_name"] for a in client.list_aliases().get("aliases", [])}
    builds = builds_of(client, alias)
    dropped = [c for c in builds[:-keep] if c not in served]
    for name in dropped:
        client.drop_collection(name)
    return dropped


def search(client: MilvusClient, collection: str, vectors: list[list[float]], texts: list[str],
           k: int, *, hybrid: bool, rrf_k: int) -> list[list[dict]]:
    """Top-k rows per query: dense + BM25 fused by RRF where the collection has BM25."""
    fields = [*OUTPUT_FIELDS, "dense"]
    depth = k * 3 if hybrid else k
    dense = client.search(collection, data=vectors, anns_field="dense", limit=depth,
                          search_params={"metric_type": "COSINE"}, output_fields=fields)
    if not hybrid:
        return [[_hit(hit, vector, hit["distance"]) for hit in row] for row, vector in zip(dense, vectors)]
    sparse = client.search(collection, data=texts, anns_field="sparse", limit=depth,
                           search_params={"metric_type": "BM25"}, output_fields=fields)
    return [_fused([d, s], vector, k, rrf_k) for d, s, vector in zip(dense, sparse, vectors)]


def _fused(rankings: list[list[dict]], query: list[float], k: int, rrf_k: int) -> list[dict]:
    """Reciprocal rank fusion, here rather than in Milvus's ranker so that ties (a chunk first
    in one list only vs. another first in the other only) go to the dense, semantic match:
    +0.02 MRR@10 on the dev set (bench/retrieval.py). Each hit also says whether the rankings
    agree on any document in their top 5, a sign the docs cover the question at all."""
    scores: dict[str, float] = {}
    rows: dict[str, dict] = {}
    for ranking in rankings:  # dense first: sorted() is stable
        for rank, hit in enumerate(ranking, 1):
            scores[hit["id"]] = scores.get(hit["id"], 0.0) + 1.0 / (rrf_k + rank)
            rows.setdefault(hit["id"], hit)
    best = sorted(scores, key=scores.get, reverse=True)[:k]
    top_docs = [{hit["entity"]["doc_path"] for hit in ranking[:AGREEMENT_DEPTH]} for ranking in rankings]
    agreement = bool(set.intersection(*top_docs))
    return [{**_hit(rows[key], query, scores[key]), "agreement": agreement} for key in best]


def _hit(hit: dict, query: list[float], score: float) -> dict:
    """A result row; ``relevance`` is the cosine to the query (vectors are normalized), comparable
    across queries, unlike RRF scores."""
    entity = dict(hit["entity"])
    dense = entity.pop("dense")
    relevance = sum(a * float(b) for a, b in zip(query, dense))
    return {**entity, "id": hit["id"], "score": float(score), "relevance": round(relevance, 4)}


def doc_of_ids(client: MilvusClient, name: str) -> dict[str, str]:
    """Every primary key of a collection with its doc path, paged so a large index never loads at once."""
    iterator = client.query_iterator(name, batch_size=4096, filter="", output_fields=["id", "doc_path"])
    found: dict[str, str] = {}
    while page := iterator.next():
        found.update((row["id"], row["doc_path"]) for row in page)
    iterator.close()
    return found


def vectors_of(client: MilvusClient, name: str, ids: list[str]) -> dict[str, list[float]]:
    rows = client.get(name, ids=ids, output_fields=["dense"])
    return {row["id"]: [float(v) for v in row["dense"]] for row in rows}


def version_alias(alias: str, version: str) -> str:
    """Each version is also served on its own: milvus_docs + 2.5.x -> milvus_docs_2_5_x."""
    return f"{alias}_{version_slug(version)}"


def build_key(sha256: str, version: str, embedder_id: str, chunking: dict) -> str:
    """Identifies what a staging collection is being built from, so a killed run can resume it
    (never one made with another schema)."""
    raw = json.dumps([sha256, version, embedder_id, sorted(chunking.items()), SCHEMA_VERSION])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def resumable_build(client: MilvusClient, alias: str, key: str) -> str | None:
    """An unfinished staging collection of the same release and configuration, if any."""
    for name in reversed(builds_of(client, alias)):
        info = collection_info(client, name)
        if info.get("state") == "building" and info.get("build_key") == key:
            return name
    return None


def smoke_search(client: MilvusClient, name: str) -> bool:
    row = client.query(name, filter="", output_fields=["dense"], limit=1)
    return bool(row) and bool(client.search(name, data=[row[0]["dense"]], anns_field="dense", limit=1)[0])


def publish(client: MilvusClient, alias: str, version_alias_name: str, collection: str, version: str,
            keep: int, main: MainAlias = "if-newer") -> str | None:
    """Serve a validated build: its version alias always; the main alias ``always``, ``never``, or
    ``if-newer`` than the version it serves. Returns the collection the main alias served before."""
    previous = served_collection(client, alias)
    info = collection_info(client, collection)
    set_collection_info(client, collection, {**info, "state": "ready", "previous": previous})
    point_alias(client, version_alias_name, collection)
    served_version = collection_info(client, previous).get("version") if previous else None
    newer = served_version is None or version_order(version) >= version_order(served_version)
    if main == "always" or (main == "if-newer" and newer):
        point_alias(client, alias, collection)
    drop_old_builds(client, alias, keep)
    return previous


def rollback(client: MilvusClient, alias: str) -> tuple[str, str]:
    """Point the alias back at the collection it served before the last publish."""
    current = served_collection(client, alias)
    previous = collection_info(client, current).get("previous") if current else None
    if not previous or not client.has_collection(previous):
        raise StoreError(f"nothing to roll back to: {alias} serves {current or 'nothing'} "
                         "and no earlier collection is kept")
    point_alias(client, alias, previous)
    return current, previous


@contextmanager
def build_lock(home: Path, alias: str):
    """One build per alias at a time on this host; a second one exits with who holds it."""
    path = home / "locks" / f"{alias}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise StoreError(f"another ingest of {alias!r} is running ({handle.read().strip() or 'unknown'}); "
                             "wait for it to finish") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
