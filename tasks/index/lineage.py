"""Lineage as Prefect asset events: which release archive produced which Milvus collection, and
which alias serves it. The publish step is a materializing task, so the event feed (and, on
Prefect Cloud, the lineage graph) links the archive in the object store to the collection."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from prefect.assets import Asset, AssetProperties, materialize
from prefect.cache_policies import NONE

from docsrag.tasks.core.redaction import redact_url
from docsrag.tasks.index import store

# Characters Prefect refuses in an asset key (a URI); a path holding one is still named.
_UNSAFE = re.compile(r"[\s#?&%\"'<>\[\]{}|\\^`]")


def asset_key(uri: str) -> str:
    """An asset key is stored in Prefect's database and sent in every asset event: never with the
    URI's credentials (pymilvus takes ``http://user:pass@host:19530``) or query."""
    return _UNSAFE.sub("_", redact_url(uri))[:500]


def milvus_asset(milvus_uri: str, name: str, description: str) -> Asset:
    server = re.sub(r"^[a-z]+://", "", redact_url(milvus_uri)).rstrip("/")
    scheme = "milvus" if store.is_server(milvus_uri) else "milvuslite"
    if scheme == "milvuslite":
        server = "/" + str(Path(server).resolve()).lstrip("/")
    return Asset(key=asset_key(f"{scheme}://{server}/{name}"), properties=AssetProperties(
        name=name, description=description))


def materializing(step: Callable, name: str, produces: list[Asset], reads: list[Asset]):
    """``step`` as a task that records what it produced from what."""
    return materialize(*produces, asset_deps=reads, name=name, cache_policy=NONE, persist_result=False)(step)
