"""A damaged Milvus Lite collection set aside (tasks/index/quarantine.py): only its own folder moves,
only on Milvus Lite, a bounded number of times; the aliases that named it follow the policy again.
Milvus Lite's listing is stood in for where a damaged segment is needed (a real one: the lifecycle
tests in tests/integration/index)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pymilvus import MilvusClient
from pymilvus.exceptions import MilvusException

from docsrag.tasks.core.settings import Settings
from docsrag.tasks.index import publish, quarantine, store
from docsrag.tasks.index import schema as index
from docsrag.tasks.index.schema import BuildInfo, Corpus
from docsrag.tasks.index.store import DamagedCollection, StoreError


class LiteListing:
    """What quarantine asks of Milvus Lite 3.2: listing opens every collection, and fails on one
    holding a file marked damaged, naming that file as Milvus Lite does; aliases are a dict."""

    def __init__(self, folder: Path, aliases: dict[str, str]):
        self.folder, self.aliases = folder, aliases

    def list_collections(self) -> list[str]:
        names = sorted(os.listdir(self.folder / "collections"))
        for name in names:
            if (segment := self.folder / "collections" / name / "data.parquet").read_bytes() == b"torn":
                raise MilvusException(message=f"Could not open Parquet input source '{segment}': Parquet magic bytes "
                                              "not found in footer. Either the file is corrupted or this is not a "
                                              "parquet file.")
        return names

    def list_aliases(self, collection_name: str) -> dict:
        return {"aliases": sorted(a for a, c in self.aliases.items() if c == collection_name)}

    def drop_alias(self, alias: str) -> None:
        del self.aliases[alias]


def lite(tmp_path: Path, collections: dict[str, bytes], aliases: dict[str, str]) -> tuple[LiteListing, Settings]:
    folder = tmp_path / "milvus.db"
    for name, segment in collections.items():
        (folder / "collections" / name).mkdir(parents=True)
        (folder / "collections" / name / "data.parquet").write_bytes(segment)
    return LiteListing(folder, aliases), Settings(home=tmp_path, milvus_uri=str(folder))


def test_each_damaged_collection_moves_whole_beside_the_folder_and_the_aliases_naming_it_are_dropped(tmp_path):
    client, settings = lite(tmp_path, {"a": b"torn", "b": b"torn", "c": b"sound"},
                            {"milvus_docs": "a", "milvus_docs_2_5_x": "a", "milvus_docs_2_4_x": "b", "old": "c"})
    said: list[str] = []
    aside = quarantine.readable(client, settings, said.append)

    kept = tmp_path / "milvus.db.damaged"
    assert [(s.collection, s.kept_in, s.aliases) for s in aside] == [
        ("a", kept / "a", ("milvus_docs", "milvus_docs_2_5_x")), ("b", kept / "b", ("milvus_docs_2_4_x",))]
    assert (kept / "a" / "data.parquet").read_bytes() == b"torn" and client.list_collections() == ["c"]
    assert client.aliases == {"old": "c"}
    assert said == [f"the collection 'a' is damaged: set aside in {kept / 'a'}; the aliases milvus_docs, "
                    "milvus_docs_2_5_x no longer name it", f"the collection 'b' is damaged: set aside in {kept / 'b'}; "
                    "the aliases milvus_docs_2_4_x no longer name it"]


def test_a_name_set_aside_before_is_kept_beside_the_first(tmp_path):
    client, settings = lite(tmp_path, {"a": b"torn"}, {})
    (tmp_path / "milvus.db.damaged" / "a").mkdir(parents=True)
    assert quarantine.readable(client, settings, print)[0].kept_in == tmp_path / "milvus.db.damaged" / "a.2"


def test_a_milvus_server_collection_is_never_moved(tmp_path):
    client, settings = lite(tmp_path, {"a": b"torn"}, {"milvus_docs": "a"})
    server = Settings(home=tmp_path, milvus_uri="http://127.0.0.1:19530")
    with pytest.raises(DamagedCollection, match="the collection 'a' .* is damaged"):
        quarantine.readable(client, server, print)
    assert (tmp_path / "milvus.db" / "collections" / "a").is_dir() and client.aliases == {"milvus_docs": "a"}


def test_a_damaged_file_outside_this_milvus_lite_folder_moves_nothing(tmp_path):
    client, _ = lite(tmp_path / "other", {"a": b"torn"}, {"milvus_docs": "a"})
    _, settings = lite(tmp_path, {"a": b"sound"}, {})
    with pytest.raises(DamagedCollection):
        quarantine.readable(client, settings, print)
    assert (tmp_path / "other" / "milvus.db" / "collections" / "a").is_dir()
    assert (tmp_path / "milvus.db" / "collections" / "a").is_dir() and not (tmp_path / "milvus.db.damaged").exists()


def test_setting_aside_stops_at_its_bound_and_says_what_it_set_aside(tmp_path):
    names = [f"c{n}" for n in range(quarantine.MAX_SET_ASIDE + 2)]
    client, settings = lite(tmp_path, dict.fromkeys(names, b"torn"), {})
    with pytest.raises(StoreError, match=f"{quarantine.MAX_SET_ASIDE} damaged collections were set aside already"):
        quarantine.readable(client, settings, print)
    assert sorted(os.listdir(tmp_path / "milvus.db.damaged")) == names[:quarantine.MAX_SET_ASIDE]


def test_an_alias_left_on_a_build_that_is_gone_follows_the_policy_again(tmp_path):
    """A run killed after it moved a damaged build out and before it dropped the aliases naming it:
    Milvus Lite still names the build in those aliases. The next converge repoints or drops them."""
    client, corpus = MilvusClient(str(tmp_path / "milvus.db")), Corpus("milvus_docs")
    older, newer = (index.build_name(corpus.alias, v, f"2026010{n}T000000000000") for n, v in ((1, "2.4.x"),
                                                                                                 (2, "2.5.x")))
    for n, (name, version) in enumerate(((older, "2.4.x"), (newer, "2.5.x")), 1):
        index.create_collection(client, name, 4, bm25=False, info=BuildInfo(name, version, state="ready",
                                                                            published=n, main=n))
    publish.converge(client, corpus)
    (tmp_path / "milvus.db" / "collections" / newer).rename(tmp_path / newer)  # set aside, aliases left

    assert publish.converge(client, corpus) == {"milvus_docs": older, "milvus_docs_2_4_x": older}
    assert store.aliases(client) == {"milvus_docs": older, "milvus_docs_2_4_x": older}
