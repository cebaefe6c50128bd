"""Incremental re-indexing on the real releases: diff, reuse, resume, guard rails, rollback."""

import json
import os
import re
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from flows.cli import main
from tasks import chunking, markdown, store
from tasks.settings import load_settings

from .conftest import ROOT


def ingest(capsys, *args: str) -> dict:
    code = main(["ingest", *args, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def served_ids(alias="milvus_docs") -> set[str]:
    client = store.connect(load_settings())
    return set(store.doc_of_ids(client, store.loaded(client, alias)))


def fresh_build_ids(summary: dict) -> set[str]:
    """The ids a fresh build of that release holds: its own parse and chunking, nothing else."""
    settings = load_settings()
    parsed = markdown.parse_release(settings.home / "releases" / summary["sha256"])
    return {c.id for c in chunking.chunk_documents(parsed.documents, settings.chunking_config, settings.embedder_id)}


def prefect_env() -> dict:
    from prefect.settings import PREFECT_API_URL

    return {"PREFECT_API_URL": PREFECT_API_URL.value()}




