"""One writer per corpus: an ingest or a rollback holds it from its first stage to its last.

Two runs writing one corpus corrupt it (the ``newer`` check and the alias moves are read-decide-
write; one run's garbage collection can drop another's base or staging collection). Each tier
coordinates the way it already does:

- on a host, a file lock under ``DOCSRAG_HOME`` (Milvus Lite is a file on one host; two homes
  sharing one Milvus Lite file are refused by Milvus Lite itself);
- across hosts (pods, a laptop beside the cluster's worker), where Milvus is a server and a
  Prefect API is configured: a Prefect global concurrency limit of one slot per corpus and
  Milvus server, held with a lease that the holder renews, so a killed pod frees it once its
  lease runs out (``DOCSRAG_WRITER_LEASE_S``).

A second writer waits ``DOCSRAG_WRITER_WAIT_S`` (default 0: it exits at once) and then fails
saying who holds the slot and since when.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path

from tasks.redaction import redact_url
from tasks.settings import Settings


class WriterBusy(RuntimeError):
    """Another run holds the corpus; the message says who and since when."""


def _holder() -> str:
    run = ""
    try:
        from prefect.runtime import flow_run

        run = f"flow run {flow_run.name} ({flow_run.id}), " if flow_run.id else ""
    except Exception:  # noqa: BLE001 - who holds it is a courtesy, never a reason to fail
        pass
    return f"{run}host {socket.gethostname()} pid {os.getpid()} since {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC"


@contextmanager
def held(settings: Settings) -> Iterator[None]:
    """Hold the corpus ``settings.collection`` for writing, on this host and across hosts."""
    with file_lock(settings.home, settings.collection), _prefect_slot(settings):
        yield


@contextmanager
def file_lock(home: Path, corpus: str) -> Iterator[None]:
    path = home / "locks" / f"{corpus}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise WriterBusy(f"another ingest or rollback of {corpus!r} is running on this host "
                             f"({handle.read().strip() or 'unknown'}); wait for it to finish") from None
        handle.seek(0)
        handle.truncate()
        handle.write(_holder())
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def slot_name(settings: Settings) -> str:
    """One slot per corpus and Milvus server (never its credentials: the name is shown in the UI)."""
    server = hashlib.sha256(redact_url(settings.milvus_uri).encode()).hexdigest()[:8]
    return re.sub(r"[^a-z0-9-]", "-", f"docsrag-writer-{settings.collection.lower()}-{server}")


def _prefect_slot(settings: Settings):
    from prefect.settings import PREFECT_API_URL

    from tasks.store import is_server

    if not is_server(settings.milvus_uri) or not PREFECT_API_URL.value():
        return nullcontext()  # Milvus Lite: one host, the file lock is the whole story
    return _slot(slot_name(settings), settings.writer_wait_s, settings.writer_lease_s)


@contextmanager
def _slot(name: str, wait_s: float, lease_s: float) -> Iterator[None]:
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency
    from prefect.variables import Variable

    _ensure_limit(name)
    # Prefect's acquisition service logs a refused slot as an error of its own, with a traceback:
    # here a refusal is an answer, said once below.
    quiet = logging.getLogger("prefect._internal.concurrency")
    level, quiet.level = quiet.level, logging.CRITICAL
    try:
        slot = concurrency(name, occupy=1, strict=True, lease_duration=lease_s,
                           **({"timeout_seconds": wait_s} if wait_s > 0 else {"max_retries": 0}))
        slot.__enter__()
    except (ConcurrencySlotAcquisitionError, TimeoutError):
        who = Variable.get(name, default=None) or "a run that recorded no name"
        raise WriterBusy(f"another ingest or rollback holds the writer slot {name!r} ({who}); a killed holder "
                         f"frees it when its {lease_s:.0f} s lease runs out") from None
    finally:
        quiet.level = level
    try:
        Variable.set(name, _holder(), overwrite=True)
        yield
    finally:
        slot.__exit__(None, None, None)


def _ensure_limit(name: str) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass  # another writer created it first
