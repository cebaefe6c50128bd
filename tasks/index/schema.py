"""The index's vocabulary, shared by the half that builds it and the half that searches it.

The row schema, the names of aliases and of the physical collections behind them, and
``BuildInfo``: what each physical collection records about itself. tasks/index/build.py (a build),
tasks/index/publish.py (which collection each alias serves) and tasks/answer/retrieve.py (search) read it;
none of them imports another for these words.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from typing import Literal

from pymilvus import DataType, Function, FunctionType, MilvusClient

from docsrag.tasks.core.language import DEFAULT as DEFAULT_LANGUAGE
from docsrag.tasks.index import store
from docsrag.tasks.ingest.chunking import FIELD_MAX, Chunk
from docsrag.tasks.ingest.release import version_slug

SCHEMA_VERSION = 2  # 2: BM25 over search_text (doc path words, headings, text)
TEXT_MAX = 65_535  # bytes; chunks are far below, but a VARCHAR needs a bound
# The row schema: every field a row holds, with its VARCHAR bound, then the dense vector.
VARCHAR_FIELDS = {"id": 64, **FIELD_MAX, "version": 64, "text": TEXT_MAX, "search_text": TEXT_MAX}
ROW_FIELDS = [*VARCHAR_FIELDS, "dense"]
MULTILINGUAL = "dense_multilingual"  # the second dense field, where it is configured
BM25_INPUT = "search_text"
BUILD_SEPARATOR = "__"  # <alias>__<version slug>__<utc time>
BUILD_TIME = "%Y%m%dT%H%M%S%f"  # the <utc time> of a build's name: names sort by it

BuildState = Literal["building", "ready"]


@dataclass(frozen=True)
class BuildInfo:
    """What a physical collection says about itself (a collection property, so it lives and dies
    with the collection). ``published`` and ``main`` are publish sequence numbers: the version
    alias serves the highest ``published`` of its version, the main alias the highest ``main``,
    among ready builds not rolled back (tasks/index/publish.py)."""

    build_key: str
    version: str
    lang: str = DEFAULT_LANGUAGE
    state: BuildState = "building"
    release_sha256: str = ""
    embedder: str = ""
    published: int | None = None
    main: int | None = None
    rolled_back: bool = False

    @property
    def candidate(self) -> bool:
        """May an alias serve it: validated, and not rolled back."""
        return self.state == "ready" and not self.rolled_back

    def but(self, **changes) -> BuildInfo:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> BuildInfo | None:
        """None for a collection that is not a build (no key or version)."""
        if not raw.get("build_key") or not raw.get("version"):
            return None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


def info_of(client: MilvusClient, name: str) -> BuildInfo | None:
    return BuildInfo.from_dict(store.collection_info(client, name))


def record(client: MilvusClient, name: str, info: BuildInfo) -> None:
    """One property write: the commit point of every change of a build's state."""
    store.set_collection_info(client, name, info.to_dict())


def row(chunk: Chunk, vectors: dict[str, list[float]], version: str) -> dict:
    """``vectors``: ``dense`` (and ``dense_multilingual`` where configured)."""
    return {"id": chunk.id, "doc_path": chunk.doc_path, "title": chunk.title, "heading": chunk.heading,
            "version": version, "text": chunk.text, "search_text": chunk.search_text, **vectors}


def create_collection(client: MilvusClient, name: str, dim: int, *, bm25: bool, info: BuildInfo | None = None,
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
    store.create_collection(client, name, schema, index, info.to_dict() if info else {})


def aliases_for(collection: str, version: str | None, lang: str = DEFAULT_LANGUAGE) -> str:
    """The alias serving a version of the docs in a language: each version is served on its own
    (milvus_docs + 2.5.x -> milvus_docs_2_5_x) and ``collection`` follows the newest; a localized
    tree gets its own (milvus_docs_ko, milvus_docs_2_4_x_ko). No version: the newest."""
    suffix = "" if lang == DEFAULT_LANGUAGE else f"_{lang}"
    return f"{collection}_{version_slug(version)}{suffix}" if version else f"{collection}{suffix}"


@dataclass(frozen=True)
class Corpus:
    """One language of a collection's docs: its main alias and one alias per version."""

    collection: str
    lang: str = DEFAULT_LANGUAGE

    @property
    def alias(self) -> str:
        return aliases_for(self.collection, None, self.lang)

    def version_alias(self, version: str) -> str:
        return aliases_for(self.collection, version, self.lang)


def build_name(alias: str, version: str, stamp: str) -> str:
    return f"{alias}{BUILD_SEPARATOR}{version_slug(version)}{BUILD_SEPARATOR}{stamp}"


def builds_of(client: MilvusClient, alias: str) -> list[str]:
    """Physical collections built for an alias, oldest first (names sort by build time)."""
    return sorted((c for c in client.list_collections() if c.startswith(f"{alias}{BUILD_SEPARATOR}")),
                  key=lambda c: c.rsplit(BUILD_SEPARATOR, 1)[-1])


def built_at(name: str) -> str | None:
    """When a build was started, from its name (ISO 8601, UTC); None for a name that holds no time."""
    try:
        stamp = datetime.strptime(name.rsplit(BUILD_SEPARATOR, 1)[-1], BUILD_TIME)
    except ValueError:
        return None
    return stamp.replace(tzinfo=timezone.utc).isoformat(timespec="seconds")
