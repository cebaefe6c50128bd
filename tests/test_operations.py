"""What a data engineer reads in the Prefect UI, read back through the API of a real server."""

import json

from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, LogFilter, TaskRunFilter
from prefect.events.filters import EventFilter, EventNameFilter

from flows.cli import main
from prefect.logging.handlers import APILogWorker


def test_an_ingest_run_is_named_logged_and_leaves_lineage(home, prefect_server, releases, capsys):
    assert main(["ingest", "--release", str(releases / "milvus_docs_faq_2.4.x_en.zip"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    APILogWorker.drain_all(timeout=10)  # logs travel in batches
    with get_client(sync_client=True) as client:
        [run] = [r for r in client.read_flow_runs() if r.name == "ingest 2.4.x (49 new)"]
        logs = client.read_logs(LogFilter(flow_run_id={"any_": [run.id]}))
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))
        events = client.read_events(EventFilter(event=EventNameFilter(prefix=["prefect.asset."])), limit=50).events
    story = "\n".join(log.message for log in logs)
    for line in ("Fetched ", "version 2.4.x", "Parsed 4 documents (0 skipped, 1 with warnings)", "Chunked into 49 chunks",
                 "Compared with nothing served: 49 chunks new", "Embedded 49 chunks", "chunks/s",
                 f"Validated {summary['collection']}: 49 rows", f"milvus_docs serves {summary['collection']}"):
        assert line in story, f"{line!r} not in the run's logs"
    warning = next(log for log in logs if log.level == 30)
    assert "en/faq/operational_faq.md: include {{fragments/cpu_support.md}} not found" in warning.message
    assert "embed-batch 1/1" in {t.name for t in tasks}
    produced = {e.resource.id: e for e in events if e.event == "prefect.asset.materialization.succeeded"}
    collection = next(key for key in produced if key.endswith("/" + summary["collection"]))
    assert collection.startswith("milvuslite:///")
    upstream = [r.id for r in produced[collection].related if r.role == "asset"]
    assert any(u.startswith("file:///") and u.endswith("milvus_docs_faq_2.4.x_en.zip") for u in upstream), upstream
    assert any(key.endswith("/milvus_docs") for key in produced), "the main alias's move is recorded too"
