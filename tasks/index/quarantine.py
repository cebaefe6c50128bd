"""A damaged Milvus Lite collection set aside, so that the commands that can recover go on.

Milvus Lite (3.2) opens every collection to list them (each one reads all its segment files), so
one collection with a truncated segment fails every listing: no build can be planned, published or
rolled back. Its ``drop_collection`` would still work (it opens nothing), but it deletes what an
operator may want to look at or restore. Instead the collection's folder is moved, whole and as it
is, out of the Milvus Lite folder into ``<folder>.damaged/`` beside it (one file system: a rename).
Milvus Lite then lists the rest; its aliases file still names the collection (``describe_alias``
answers with it, ``alter_alias`` and ``drop_alias`` work), so the aliases that named it are dropped
here, as a drop of the collection would have dropped them. The next converge puts each alias back
on a sound build (tasks/index/publish.py).

Only ``docsrag ingest --force`` and ``docsrag rollback`` set a collection aside, only on Milvus Lite
(a server's collections are the server's to repair), and only the folder that Milvus Lite's error
names, inside this Milvus Lite folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pymilvus import MilvusClient

from docsrag.tasks.core.settings import Settings
from docsrag.tasks.index import store
from docsrag.tasks.index.store import DamagedCollection, StoreError

# A folder with more damaged collections than this is more than a torn write: a person looks first.
MAX_SET_ASIDE = 4

T = TypeVar("T")


@dataclass(frozen=True)
class SetAside:
    """A damaged collection moved out of the Milvus Lite folder: where it is kept, which aliases named it."""

    collection: str
    kept_in: Path
    aliases: tuple[str, ...]

    def __str__(self) -> str:
        served = f"; the aliases {', '.join(self.aliases)} no longer name it" if self.aliases else ""
        return f"the collection {self.collection!r} is damaged: set aside in {self.kept_in}{served}"

    def to_dict(self) -> dict:
        return {"collection": self.collection, "kept_in": str(self.kept_in), "aliases": list(self.aliases)}


def recovering(client: MilvusClient, settings: Settings, step: Callable[[list[SetAside]], T],
               said: Callable[[str], None]) -> tuple[T, list[SetAside]]:
    """``step(set aside so far)``, run again after each damaged collection it meets is set aside
    (``said`` says where, in one line). -> what the step returned, and what was set aside."""
    aside: list[SetAside] = []
    while True:
        try:
            with store.damage_reported(settings.milvus_uri):
                return step(aside), aside
        except DamagedCollection as damage:
            aside.append(set_aside(client, settings, damage, aside))
            said(str(aside[-1]))


def readable(client: MilvusClient, settings: Settings, said: Callable[[str], None]) -> list[SetAside]:
    """Every collection opens (Milvus Lite opens each to list them), the damaged ones set aside."""
    return recovering(client, settings, lambda _: client.list_collections(), said)[1]


def set_aside(client: MilvusClient, settings: Settings, damage: DamagedCollection,
              before: list[SetAside]) -> SetAside:
    """Move the damaged collection's folder to ``<Milvus Lite folder>.damaged/`` and drop the
    aliases that named it. Refused (the damage raised as it is) where it would not be safe."""
    source = _damaged_folder(settings.milvus_uri, damage, before)
    named = tuple(client.list_aliases(collection_name=damage.collection).get("aliases", []))  # opens nothing
    kept = _free_place(Path(os.path.abspath(settings.milvus_uri) + ".damaged") / damage.collection)
    try:
        kept.parent.mkdir(parents=True, exist_ok=True)
        source.rename(kept)
    except OSError as exc:
        raise StoreError(f"{damage}; setting it aside in {kept} failed: {exc}") from None
    for alias in named:  # after the move: a failed move leaves the aliases as they were
        client.drop_alias(alias)
    return SetAside(damage.collection, kept, named)


def _damaged_folder(uri: str, damage: DamagedCollection, before: list[SetAside]) -> Path:
    """The damaged collection's own folder in this Milvus Lite folder; anything else raises the damage."""
    if store.is_server(uri) or any(s.collection == damage.collection for s in before):
        raise damage  # a server repairs its own; the same one twice: moving it did not help
    if len(before) >= MAX_SET_ASIDE:
        raise StoreError(f"{damage}. {len(before)} damaged collections were set aside already "
                         f"({', '.join(s.collection for s in before)}): look at {uri} before going on") from None
    folder = Path(os.path.abspath(uri)) / "collections" / damage.collection
    inside = damage.collection not in ("", ".", "..") and "/" not in damage.collection
    if not (inside and folder.is_dir() and Path(os.path.abspath(damage.file)).is_relative_to(folder)):
        raise damage
    return folder


def _free_place(path: Path) -> Path:
    """``path``, or ``path.2``, ``path.3``... when a collection of that name was set aside before."""
    place, n = path, 1
    while place.exists():
        n += 1
        place = path.with_name(f"{path.name}.{n}")
    return place
