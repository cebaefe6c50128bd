"""The Milvus side, in pymilvus ``MilvusClient`` idiom: a few verbs on plain dicts and lists.

Connect, create, upsert, count, read ids and vectors, search, aliases, collection properties and
the server's capabilities. What a build is lives in tasks/index/build.py, what is served in tasks/index/publish.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pymilvus import DataType, MilvusClient
from pymilvus.client.types import LoadState
from pymilvus.exceptions import MilvusException

from docsrag.tasks.core.errors import DocsragError
from docsrag.tasks.core.redaction import redact_text, redact_url
from docsrag.tasks.core.settings import Settings

INFO_PROPERTY = "docsrag.info"
# A connection pymilvus shares within the process can be cut by the server just as it is reused
# (Milvus Lite's gRPC server sends GOAWAY to clients idle for ~30 s); a second try reconnects.
CONNECT_RETRY_DELAYS_S = (0.5, 1.0)


class StoreError(DocsragError, RuntimeError):
    """The index cannot be used as asked; the message says why."""


def is_server(uri: str) -> bool:
    """A Milvus server's URL (http://host:19530), not a Milvus Lite file."""
    return re.match(r"^[a-z]+://", uri) is not None


def connect(settings: Settings) -> MilvusClient:
    uri = settings.milvus_uri
    lite = not is_server(uri)
    if lite:  # make sure the Milvus Lite file's folder exists
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        _check_lite_folder(Path(uri))
    token = settings.milvus_token.get_secret_value() if settings.milvus_token else ""
    # query_iterator warns on every page against Milvus Lite, and Milvus Lite's in-process
    # gRPC server logs a traceback for a timestamp call it does not implement (the iterator
    # falls back by itself). Real errors still surface as exceptions.
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
    # Milvus Lite logs its own traceback when another process holds the folder: said below, in one line.
    logging.getLogger("milvus_lite").setLevel(logging.CRITICAL)
    try:
        return _client(uri, token)
    except MilvusException as exc:
        if lite and (holder := lite_holder(Path(uri))):
            raise StoreError(f"the Milvus Lite folder {uri} is held by {holder}: Milvus Lite serves one process at a "
                             "time; stop it and run this again, or use a Milvus server "
                             "(DOCSRAG_MILVUS_URI=http://host:19530) for concurrent readers and writers") from None
        if lite:
            raise StoreError(f"cannot open the Milvus Lite file {uri}: {redact_text(exc.message)}. Milvus Lite serves one "
                             "process at a time: is another docsrag command using it? Use a Milvus server "
                             "(DOCSRAG_MILVUS_URI=http://host:19530) for concurrent readers and writers") from None
        raise StoreError(f"cannot reach Milvus at {redact_url(uri)}: {redact_text(exc.message)}") from None


@dataclass(frozen=True)
class LiteHolder:
    """The process that holds a Milvus Lite folder, said as ``pid 123 (docsrag api --port 8000)``."""

    pid: int
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"pid {self.pid} ({' '.join(self.argv)[:160] or 'its command line unreadable'})"


def lite_holder(folder: Path) -> LiteHolder | None:
    """The process holding a Milvus Lite folder (the flock on its LOCK file, read from /proc/locks);
    None when none does or Linux cannot say."""
    try:
        lock = (folder / "LOCK").stat()
        rows = Path("/proc/locks").read_text().split("\n")
    except OSError:
        return None
    wanted = (os.major(lock.st_dev), os.minor(lock.st_dev), lock.st_ino)
    for row in rows:  # "6: FLOCK  ADVISORY  WRITE 5609 fe:00:2155553 0 EOF"
        fields = row.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and _device_inode(fields[5]) == wanted:
            return LiteHolder(int(fields[4]), _command_line(fields[4]))
    return None


def _device_inode(text: str) -> tuple[int, int, int] | None:
    try:
        major, minor, inode = text.split(":")
        return int(major, 16), int(minor, 16), int(inode)
    except ValueError:
        return None


def _command_line(pid: str) -> tuple[str, ...]:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return ()
    return tuple(w.decode(errors="replace") for w in words if w)


SQLITE_HEADER = b"SQLite format 3\x00"


def _check_lite_folder(path: Path) -> None:
    """Milvus Lite 3 keeps its data in a folder; a file at that path is not one Milvus Lite can open
    (it fails as if another process held it): say what was found."""
    if not path.is_file():
        return
    with path.open("rb") as handle:
        older = handle.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    found = ("an older Milvus Lite's file (Milvus Lite 2 kept its data in one SQLite file)" if older
             else "not a Milvus Lite folder")
    raise StoreError(f"{path} is a file, {found}: Milvus Lite 3 keeps its data in a folder at that path. Move the "
                     "file away (or point DOCSRAG_MILVUS_URI at another path) and ingest again")


def _client(uri: str, token: str) -> MilvusClient:
    for delay in CONNECT_RETRY_DELAYS_S:
        try:
            return MilvusClient(uri=uri, token=token, timeout=30)
        except MilvusException as exc:
            if not _unreachable(exc):
                raise
            time.sleep(delay)
    return MilvusClient(uri=uri, token=token, timeout=30)


@contextmanager
def milvus_errors(uri: str):
    """A server lost mid-build: say what happened to the index and what to do, in one line (the
    server's URL and its message redacted: they can carry ``user:password@``)."""
    uri = redact_url(uri)
    try:
        yield
    except MilvusException as exc:
        if damage := damaged(exc, uri):
            raise damage from None
        if not _unreachable(exc):  # Milvus answered, and refused: say what it refused
            raise StoreError(f"Milvus at {uri} refused a write of the build: {redact_text(exc.message)}. The aliases still "
                             "serve the previous collections") from None
        raise StoreError(f"Milvus at {uri} failed during the build: {redact_text(exc.message)}. The aliases still serve "
                         "the previous collections; run the ingest again once Milvus is reachable (finished "
                         "batches are kept and the build resumes)") from None


# Milvus Lite names the data file it could not read, inside the collection's folder.
_DAMAGED_FILE = re.compile(r"'(?P<file>[^']*/collections/(?P<collection>[^/']+)/[^']+)':\s*"
                           r"(?P<reason>[^']*(?:corrupt|magic bytes)[^']*)", re.IGNORECASE)


@contextmanager
def damage_reported(uri: str):
    """A collection whose data cannot be read is said to be damaged, whatever the command was doing."""
    try:
        yield
    except MilvusException as exc:
        if damage := damaged(exc, redact_url(uri)):
            raise damage from None
        raise


class DamagedCollection(StoreError):
    """A Milvus Lite collection with a data file that cannot be read: what it is, which file, why."""

    def __init__(self, message: str, collection: str, file: str):
        super().__init__(message)
        self.collection, self.file = collection, file

    def __reduce__(self):  # a task's error may be pickled by Prefect: rebuilt with its fields
        return type(self), (str(self), self.collection, self.file)


def damaged(exc: MilvusException, uri: str) -> DamagedCollection | None:
    """The error of a Milvus Lite collection with a damaged data file (a truncated segment), or None.
    Milvus Lite opens every collection to list them, so the damage fails reads and writes alike,
    until the two commands that can recover set the collection aside (tasks/index/quarantine.py)."""
    found = _DAMAGED_FILE.search(exc.message or "")
    if found is None:
        return None
    return DamagedCollection(
        f"the collection {found['collection']!r} in {uri} is damaged: its data file {found['file']} cannot be read "
        f"({found['reason'].strip()}). Milvus Lite cannot list the collections while it is there: `docsrag ingest "
        f"--force` (with the release to serve) sets it aside, kept in {uri}.damaged/, and builds anew; `docsrag "
        "rollback` sets it aside and serves the build before it", found["collection"], found["file"])


def _unreachable(exc: MilvusException) -> bool:
    text = f"{exc.code} {exc.message}".lower()
    return any(sign in text for sign in ("connect", "unavailable", "deadline", "timeout", "closed", "not ready"))


def loaded(client: MilvusClient, name: str) -> str:
    """Collections come back released after a restart (Lite: every new process); load first. A
    collection already loaded is only asked its state: a load request of one costs a Milvus 2.3
    server a quarter of a second, and an ingest's plan asks for each build it compares."""
    if client.get_load_state(name).get("state") != LoadState.Loaded:
        client.load_collection(name)
    return name


@dataclass(frozen=True)
class Capabilities:
    """What the server can do, detected here and nowhere else: a new Milvus version's features
    are added as fields of this one object."""

    version: str
    bm25: bool  # BM25 functions and full-text search arrived in Milvus 2.5; Milvus Lite 3 has them
    multiple_vectors: bool  # more than one vector field per collection: Milvus 2.4


def capabilities(client: MilvusClient) -> Capabilities:
    version = client.get_server_version()
    if version.startswith("milvus_lite"):
        return Capabilities(version, bm25=True, multiple_vectors=True)
    found = re.search(r"(\d+)\.(\d+)", version)
    release = (int(found.group(1)), int(found.group(2))) if found else (0, 0)
    return Capabilities(version, bm25=release >= (2, 5), multiple_vectors=release >= (2, 4))


def create_collection(client: MilvusClient, name: str, schema, index_params, info: dict) -> None:
    """An empty collection, indexed and loaded. pymilvus waits for each index it creates by sleeping
    0.5 s before it first asks (1.5 s for three, a quarter of a small release's ingest); on an empty
    collection there is nothing to build, so the indexes are not waited for, and loading follows."""
    client.create_collection(name, schema=schema, consistency_level="Strong")
    client.create_index(name, index_params, sync=False)
    client.load_collection(name)
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


def delete_ids(client: MilvusClient, name: str, ids: list[str]) -> None:
    if ids:
        client.delete(name, ids=ids)


def count(client: MilvusClient, name: str, timeout: float | None = None) -> int:
    return int(client.query(name, filter="", output_fields=["count(*)"], timeout=timeout)[0]["count(*)"])


def served_collection(client: MilvusClient, alias: str) -> str | None:
    if alias not in client.list_aliases().get("aliases", []):
        return None
    return client.describe_alias(alias)["collection_name"]


def point_alias(client: MilvusClient, alias: str, collection: str) -> None:
    """Atomic for readers: the alias names the old collection until this call returns."""
    if served_collection(client, alias) is not None:
        client.alter_alias(collection, alias)
        return
    try:
        client.create_alias(collection, alias)
    except MilvusException as exc:
        # Milvus before 2.5.5 keeps an alias whose collection was dropped, unlisted, and refuses
        # to create it again (milvus#40236): altering it repairs it.
        if "exist" not in exc.message.lower():
            raise
        client.alter_alias(collection, alias)


def aliases(client: MilvusClient) -> dict[str, str]:
    """Every alias with the collection it serves."""
    return {a: client.describe_alias(a)["collection_name"] for a in client.list_aliases().get("aliases", [])}


def dense_search(client: MilvusClient, collection: str, vectors: list[list[float]], limit: int,
                 output_fields: list[str], field: str = "dense", timeout: float | None = None) -> list[list[dict]]:
    """``timeout``: the call's gRPC deadline in seconds (None: none; a hung server then hangs the caller)."""
    return client.search(collection, data=vectors, anns_field=field, limit=limit,
                         search_params={"metric_type": "COSINE"}, output_fields=output_fields, timeout=timeout)


def bm25_search(client: MilvusClient, collection: str, texts: list[str], limit: int,
                output_fields: list[str], timeout: float | None = None) -> list[list[dict]]:
    """Full-text search: Milvus turns the texts into BM25 sparse vectors itself."""
    return client.search(collection, data=texts, anns_field="sparse", limit=limit,
                         search_params={"metric_type": "BM25"}, output_fields=output_fields, timeout=timeout)


# The largest result one query may return (Milvus's maxQueryResultWindow, also Milvus Lite's).
QUERY_WINDOW = 16_384


def doc_of_ids(client: MilvusClient, name: str, timeout: float | None = None) -> dict[str, str]:
    """Every primary key of a collection with its doc path, paged so a large index never loads at once.
    A collection that fits one query's window is read in that one query: an iterator asks three
    (its timestamp, a page, an empty page), each waiting for a Strong read on a server."""
    rows = client.query(name, filter="", output_fields=["id", "doc_path"], limit=QUERY_WINDOW, timeout=timeout)
    if len(rows) < QUERY_WINDOW:
        return {row["id"]: row["doc_path"] for row in rows}
    iterator = client.query_iterator(name, batch_size=4096, filter="", output_fields=["id", "doc_path"],
                                     timeout=timeout)
    found: dict[str, str] = {}
    while page := iterator.next():
        found.update((row["id"], row["doc_path"]) for row in page)
    iterator.close()
    return found


def vector_fields(client: MilvusClient, name: str) -> list[str]:
    """The collection's dense vector fields (``dense``, and a multilingual one where it has it)."""
    return [f["name"] for f in client.describe_collection(name).get("fields", [])
            if f.get("type") == DataType.FLOAT_VECTOR]


def vectors_of(client: MilvusClient, name: str, ids: list[str], fields: list[str],
               timeout: float | None = None) -> dict[str, dict]:
    """id -> {field: vector} for the given dense fields."""
    rows = client.get(name, ids=ids, output_fields=fields, timeout=timeout)
    return {row["id"]: {f: [float(v) for v in row[f]] for f in fields} for row in rows}


def smoke_search(client: MilvusClient, name: str) -> bool:
    row = client.query(name, filter="", output_fields=["dense"], limit=1)
    return bool(row) and bool(client.search(name, data=[row[0]["dense"]], anns_field="dense", limit=1)[0])
