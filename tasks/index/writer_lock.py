"""One writer per corpus: an ingest or a rollback holds it from its first stage to its last.

Two runs writing one corpus corrupt it (the ``newer`` check and the alias moves are read-decide-
write; one run's garbage collection can drop another's base or staging collection). Each tier
coordinates the way it already does:

- on a host, a file lock under ``DOCSRAG_HOME`` (Milvus Lite is a file on one host; two homes
  sharing one Milvus Lite file are refused by Milvus Lite itself);
- across hosts (pods, a laptop beside the cluster's worker), where Milvus is a server: a Prefect
  global concurrency limit of one slot per corpus and Milvus server on the Prefect server every
  writer shares (``PREFECT_API_URL``), held with a lease that the holder renews, so a killed pod
  frees it once its lease runs out (``DOCSRAG_WRITER_LEASE_S``). A slot on the command's own
  Prefect server (kept or temporary, flows/cli/local_server.py) is seen by no other host: there a
  write to a Milvus server is refused unless ``DOCSRAG_SOLE_WRITER`` says no other host writes.

A second writer waits ``DOCSRAG_WRITER_WAIT_S`` (default 0: it exits at once) and then fails
saying who holds the slot and since when.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path

from docsrag.tasks.core.errors import DocsragError
from docsrag.tasks.core.redaction import redact_url
from docsrag.tasks.core.settings import Settings


class WriterBusy(DocsragError, RuntimeError):
    """Another run holds the corpus; the message says who and since when."""


class NoSharedSlot(DocsragError, RuntimeError):
    """A write to a Milvus server with no Prefect server that every writer shares: nothing would stop
    another host writing the same corpus at the same time."""


class WriterSlotError(DocsragError, RuntimeError):
    """Prefect could not give the writer slot for a reason other than another holder (a refused
    request, for one): the message is Prefect's own, never "busy"."""


# The Prefect APIs this process started for its own commands (flows/cli/common.py notes each).
_PRIVATE_APIS: set[str] = set()
POLL_S = 1.0  # how often a writer that waits looks at the slot again


def on_private_prefect(api_url: str) -> None:
    """This command's flows run on a Prefect server of its own (kept or temporary): a slot taken
    there is seen by no other host, so it cannot keep two hosts from writing one Milvus server."""
    _PRIVATE_APIS.add(api_url)


def shared_prefect() -> str | None:
    """The Prefect API every writer can share: the one configured (PREFECT_API_URL, a profile, a
    worker's), never the command's own local server."""
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    return api if api and api not in _PRIVATE_APIS else None


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
    cross_host = _cross_host(settings)  # a write nothing could coordinate is refused before anything is held
    with file_lock(settings.home, settings.collection), cross_host:
        yield


def check_coordinated(settings: Settings) -> None:
    """Raise NoSharedSlot now where ``held`` would: a caller can refuse before work that overlaps
    taking the slot (an ingest's model start-up)."""
    _cross_host(settings)


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


def _cross_host(settings: Settings) -> AbstractContextManager:
    from docsrag.tasks.index.store import is_server

    if not is_server(settings.milvus_uri):
        return nullcontext()  # Milvus Lite: one host, the file lock is the whole story
    if shared_prefect():
        return _slot(slot_name(settings), settings.writer_wait_s, settings.writer_lease_s)
    if settings.sole_writer:
        return nullcontext()  # the operator says no other host writes to this Milvus server
    raise NoSharedSlot(_no_shared_slot(settings))


def _no_shared_slot(settings: Settings) -> str:
    from prefect.settings import PREFECT_API_URL

    own = "; the only Prefect is the command's own local server" if PREFECT_API_URL.value() else ""
    return (f"{redact_url(settings.milvus_uri)} is a Milvus server, and this command has no Prefect server that "
            f"every writer shares (PREFECT_API_URL is not set{own}), so no writer slot would stop another host "
            "writing to it at the same time. Set PREFECT_API_URL to the Prefect server that every host's ingests "
            "and rollbacks use, or set DOCSRAG_SOLE_WRITER=true if this host is the only one that writes to that "
            "Milvus server")


@contextmanager
def _slot(name: str, wait_s: float, lease_s: float) -> Iterator[None]:
    from prefect.variables import Variable

    _ensure_limit(name)
    with ExitStack() as stack:
        _acquire(stack, name, wait_s, lease_s)
        Variable.set(name, _holder(), overwrite=True)
        yield


def _acquire(stack: ExitStack, name: str, wait_s: float, lease_s: float) -> None:
    """Take the slot into ``stack`` once it is free, within ``wait_s``. It is tried only when it looks
    free: Prefect logs each refused acquisition as an error of its own, and a busy slot is an answer."""
    deadline = time.monotonic() + wait_s
    while True:
        if _looks_free(name) and _tried(stack, name, lease_s):
            return
        if time.monotonic() >= deadline:
            raise _busy(name, lease_s)
        time.sleep(min(POLL_S, max(deadline - time.monotonic(), 0.0)))


def _tried(stack: ExitStack, name: str, lease_s: float) -> bool:
    """-> whether the slot was taken; False when another took it first (Prefect's 423 Locked)."""
    import httpx
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency

    try:
        stack.enter_context(concurrency(name, occupy=1, strict=True, lease_duration=lease_s, max_retries=0))
    except ConcurrencySlotAcquisitionError as exc:
        # Prefect raises what it could not get past as the cause: 423 is another holder, all else a failure.
        cause = exc.__cause__
        if isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code == 423:
            return False
        raise WriterSlotError(f"Prefect did not give the writer slot {name!r}: {exc}") from exc
    return True


def _busy(name: str, lease_s: float) -> WriterBusy:
    from prefect.variables import Variable

    who = Variable.get(name, default=None) or "a run that recorded no name"
    return WriterBusy(f"another ingest or rollback holds the writer slot {name!r} ({who}); a killed holder "
                      f"frees it when its {lease_s:.0f} s lease runs out")


def _looks_free(name: str) -> bool:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
    return limit.active_slots < limit.limit


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
