"""Every trigger of the card on the installed stack's SQLite tier: Prefect's server as `docsrag`
keeps it (SQLite in PREFECT_HOME), the deployments of prefect.yaml, a process worker per pool.

The schedule is proven by a run Prefect's scheduler created and a worker completed (a fresh install
with SQLAlchemy 2.1 created none: the scheduler failed in the server's log only); the release and
question events by the runs they started. The PostgreSQL tier runs the same proofs in test_stack.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from docsrag.flows.cli.local_server import free_port
from tests.support import triggers
from tests.conftest import DOCSRAG, ROOT


def _start(name: str, command: list[str], env: dict, logs) -> subprocess.Popen:
    log = open(logs / f"{name}.log", "wb")
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def _stopped(worker: subprocess.Popen) -> None:
    """A worker asked to stop forwards SIGINT to its process and drains; one still busy 5 s later
    is killed with its group: this is cleanup, and both workers took the whole 30 s they were once
    given on every clean-clone run (62 s of teardown), the scheduled runs keeping them busy."""
    try:
        worker.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)


@pytest.fixture(scope="module")
def sqlite_tier(tmp_path_factory, releases):
    """The kept server in a PREFECT_HOME of its own, the prefect.yaml deployments, and a process
    worker per pool whose runs use a loopback release feed and the LLM emulator."""
    from docsrag.testing.llm_emulator import Emulator

    folder = tmp_path_factory.mktemp("triggers")
    feed, llm = triggers.release_feed(folder / "feed", releases), Emulator().start()
    settings = {"PREFECT_HOME": str(folder / "prefect"), "DOCSRAG_PREFECT_SERVER": "kept",
                "DOCSRAG_HOME": str(folder / "home"), "DOCSRAG_LLM_BASE_URL": llm.url, "DOCSRAG_MULTILINGUAL": "off",
                "HF_HUB_OFFLINE": "1", "PREFECT_WORKER_QUERY_SECONDS": "2", **feed.settings}
    env = {**os.environ, **settings}
    env.pop("PREFECT_API_URL", None)
    started = subprocess.run([DOCSRAG, "server", "start", "--json"], env=env, capture_output=True, text=True,
                             timeout=180)
    assert started.returncode == 0, started.stderr[-3000:]
    env["PREFECT_API_URL"] = json.loads(started.stdout)["ui"] + "/api"
    server = triggers.Server(env["PREFECT_API_URL"], env)
    workers = []
    try:
        for pool in ("docsrag-cpu", "docsrag-gpu"):
            triggers.prefect(server, "work-pool", "create", pool, "--type", "process", "--overwrite")
            workers.append(_start(pool, [triggers.PREFECT, "worker", "start", "--pool", pool], env, folder))
        triggers.deploy(server, ROOT / "prefect.yaml")
        yield server
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            _stopped(worker)
        subprocess.run([DOCSRAG, "server", "stop"], env=env, capture_output=True, timeout=120)
        feed.server.shutdown()
        llm.stop()


@pytest.fixture(scope="module")
def release_ingested(sqlite_tier, tmp_path_factory):
    """(the scheduled watch run, the ingest run its event started)"""
    return triggers.prove_the_schedule_and_the_release_event(sqlite_tier, triggers.short_schedule_file(
        tmp_path_factory.mktemp("short")))


def test_every_schedule_of_prefect_yaml_gets_runs_from_the_scheduler(sqlite_tier):
    triggers.prove_the_schedules(sqlite_tier)


def test_the_watch_schedule_runs_on_a_worker_and_its_release_event_starts_the_ingest(release_ingested):
    watched, ingest = release_ingested  # a fixture: the question test needs the ingested release too
    assert watched.auto_scheduled and watched.state.is_completed()
    assert ingest.state.is_completed() and ingest.parameters["version"] == "2.4.x"


def test_a_submitted_questions_event_starts_an_answer_run(sqlite_tier, release_ingested):
    shown = triggers.prove_the_question_event(sqlite_tier, sqlite_tier.env)
    assert shown["status"] == "answered", shown
    assert shown["sources"][0]["doc_path"] == "en/faq/product_faq.md"


def test_prefect_server_start_schedules_an_interval_deployment(tmp_path):
    """The issue's reproduction: `prefect server start` from the installed venv, an interval
    deployment created through the client. With SQLAlchemy 2.1.9 the scheduler failed on every loop
    (`Can't evaluate bulk DML statement`, in the server's log only) and no run was ever created;
    from the lock, runs are there within seconds."""
    import asyncio
    import datetime
    import time

    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import IntervalSchedule

    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    server = _start("server", [triggers.PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                    env, tmp_path)

    async def scheduled_runs() -> int:
        url = f"http://127.0.0.1:{port}/api"
        async with PrefectClient(url) as client:
            deadline = time.monotonic() + 90
            while (await client.api_healthcheck()) is not None:  # None once it answers
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                await asyncio.sleep(0.5)
            flow_id = await client.create_flow_from_name("scheduled")
            await client.create_deployment(flow_id=flow_id, name="every-minute", schedules=[DeploymentScheduleCreate(
                schedule=IntervalSchedule(interval=datetime.timedelta(seconds=60)), active=True)])
            deadline = time.monotonic() + 30
            while not (runs := await client.read_flow_runs()) and time.monotonic() < deadline:
                await asyncio.sleep(1)
            return len(runs)

    try:
        assert asyncio.run(scheduled_runs()) > 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        server.terminate()
        server.wait(timeout=60)
