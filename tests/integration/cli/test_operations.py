"""What a data engineer reads in the Prefect UI, read back through the API of a real server."""

import json
import os
import time

from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, LogFilter
from prefect.client.schemas.sorting import FlowRunSort
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.logging.handlers import APILogWorker

from docsrag.flows.cli import main
from docsrag.tasks.core.settings import load_settings
from docsrag.tasks.index import lineage


def test_an_ingest_run_is_named_logged_and_leaves_lineage(home, prefect_server, releases, capsys):
    assert main(["ingest", "--release", str(releases / "milvus_docs_faq_2.4.x_en.zip"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    APILogWorker.drain_all(timeout=10)  # logs travel in batches
    with get_client(sync_client=True) as client:
        run = next(r for r in client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC)
                   if r.name == "ingest 2.4.x (49 new)")
        logs = client.read_logs(LogFilter(flow_run_id={"any_": [run.id]}))
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))
        settings = load_settings()
        collection = lineage.milvus_asset(settings.milvus_uri, summary["collection"], "").key
        alias = lineage.milvus_asset(settings.milvus_uri, "milvus_docs", "").key
        made, moved = _events(client, collection), _events(client, alias)
    story = "\n".join(log.message for log in logs)
    for line in ("Fetched ", "version 2.4.x", "Parsed 4 documents (0 skipped, 1 with warnings)",
                 "Chunked into 49 chunks",
                 "Compared with nothing served: 49 chunks new", "Embedded 49 chunks", "chunks/s",
                 f"Validated {summary['collection']}: exactly the release's 49 chunk ids",
                 f"milvus_docs serves {summary['collection']}"):
        assert line in story, f"{line!r} not in the run's logs"
    warning = next(log for log in logs if log.level == 30)
    assert "en/faq/operational_faq.md: include {{fragments/cpu_support.md}} not found" in warning.message
    # 49 chunks, two embedding slots: two batches, so both cores embed
    assert {"embed-batch 1/2", "embed-batch 2/2"} <= {t.name for t in tasks}
    assert collection.startswith("milvuslite:///") and made, "the collection's materialization is an event"
    upstream = [r.id for r in made[0].related if r.role == "asset"]
    assert any(u.startswith("file:///") and u.endswith("milvus_docs_faq_2.4.x_en.zip") for u in upstream), upstream
    assert collection in [r.id for r in moved[0].related], "the main alias's move names the collection it serves"


def _events(client, asset_key: str) -> list:
    """The server stores events a moment after they arrive."""
    deadline = time.monotonic() + 20
    while not (found := client.read_events(_materialized(asset_key), limit=50).events) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def _materialized(asset_key: str) -> EventFilter:
    return EventFilter(event=EventNameFilter(name=["prefect.asset.materialization.succeeded"]),
                       resource=EventResourceFilter(id=[asset_key]))


def test_runs_persist_no_task_results_even_when_prefect_persists_by_default(home, prefect_server, releases, tmp_path,
                                                                            capsys):
    """A worker configured to persist results by default (as a Kubernetes pool may be) stores the
    run's summary and no task result: no vectors, no clients, no local paths."""
    import subprocess

    from tests.conftest import DOCSRAG, ROOT, api_env

    storage = tmp_path / "results"
    env = api_env(PREFECT_RESULTS_PERSIST_BY_DEFAULT="true", PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(storage))
    done = subprocess.run([DOCSRAG, "ingest", "--release", str(releases / "milvus_docs_faq_2.4.x_en.zip")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    import base64
    import pickle

    [stored] = [p for p in storage.rglob("*") if p.is_file()]  # the flow's own result: the run summary
    summary = pickle.loads(base64.b64decode(stored.read_bytes()))
    assert summary.chunks == 49 and summary.version == "2.4.x" and stored.stat().st_size < 20_000


def test_the_stage_table_counts_the_command_from_its_process_start(home, releases, tmp_path):
    """`docsrag ingest` with no Prefect server: the seconds before the first stage (interpreter,
    imports, Prefect's temporary server, started beside them) are stages of their own, so the
    table accounts for the command's time up to its exit."""
    import subprocess

    from tests.conftest import DOCSRAG, ROOT, servers_with_home

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(tmp_path)}
    started = time.monotonic()
    done = subprocess.run([DOCSRAG, "ingest", "--release", str(releases / "milvus_docs_faq_2.4.x_en.zip"), "--json"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.splitlines()[-1])
    stages = summary["stages"]
    assert list(stages)[:4] == ["start-up", "prefect-api", "fetch", "extract"]
    assert {"open-store", "plan", "model-wait", "embed+write", "validate", "publish"} <= stages.keys()
    assert stages["start-up"] > 0.2, "the interpreter and imports count from the process's start"
    assert stages["start-up"] + stages["prefect-api"] < summary["seconds"] <= wall
    assert wall - summary["seconds"] < 20, "what the table leaves out is the exit"
    assert not servers_with_home(tmp_path), "the temporary API server ends with the command"
