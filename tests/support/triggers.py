"""The card's three triggers, proven by the runs they start on a Prefect server with process workers:
the watch schedule (a run Prefect's scheduler created), the release event (the ingest it started)
and the question event (the answer run it started). Shared by the SQLite tier (test_triggers.py)
and the PostgreSQL tier (test_stack.py).

Deployments come from ``prefect deploy`` of a copy of the project's prefect.yaml in which only the
watch interval is shortened: the path a user deploys, at a pace a test can wait for.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.conftest import DOCSRAG, FAQ, ROOT

PREFECT = str(Path(DOCSRAG).parent / "prefect")
WATCH_INTERVAL_S = 10
RELEASE = "milvus_docs_2.4.x_en.zip"  # the FAQ release under the name a published 2.4.x asset has


@dataclass(frozen=True)
class Server:
    """A Prefect API and the environment a client of it needs (its URL and credentials)."""

    url: str
    env: dict[str, str]

    def client(self):
        from prefect.client.orchestration import PrefectClient

        return PrefectClient(self.url, auth_string=self.env.get("PREFECT_API_AUTH_STRING"))


def short_schedule_file(folder: Path) -> Path:
    """prefect.yaml with the watch deployment's interval shortened, and nothing else changed."""
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    watch = next(d for d in config["deployments"] if d["name"] == "watch-releases")
    watch["schedules"][0]["interval"] = WATCH_INTERVAL_S
    path = folder / "prefect.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def prefect(server: Server, *args: str) -> None:
    done = subprocess.run([PREFECT, "--no-prompt", *args], env={**os.environ, **server.env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"


def deploy(server: Server, prefect_file: Path, *names: str) -> None:
    """`prefect deploy` as a user runs it, of the named deployments (all when none is named)."""
    chosen = [arg for name in names for arg in ("--name", name)] or ["--all"]
    prefect(server, "deploy", *chosen, "--prefect-file", str(prefect_file))


def release_feed(folder: Path, releases: Path):
    """A loopback feed shaped like GitHub's releases API, publishing the FAQ release as 2.4.x."""
    from tests.integration.ingest.test_watch import API_PATH, FakeGitHub

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(releases / FAQ, folder / RELEASE)
    feed = FakeGitHub(folder)
    # By name: the feed's site is then 'localhost', apart from the 127.0.0.1 servers other tests
    # point events at (a release there must stay refused by DOCSRAG_RELEASE_HOSTS, not taken as the feed's).
    feed.base = feed.base.replace("127.0.0.1", "localhost")
    feed.publish("v2.4.x", RELEASE, RELEASE, asset_id=24)
    feed.settings = {"DOCSRAG_RELEASES_API": feed.base + API_PATH, "DOCSRAG_RELEASE_HOSTS": feed.base}
    return feed


def runs_of(server: Server, deployment: str, since: float = 0.0) -> list:
    """The flow runs of a deployment (``flow/deployment``) created after ``since`` (epoch seconds)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    async def read():
        async with server.client() as client:
            found = await client.read_deployment_by_name(deployment)
            runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[found.id])))
            return [run for run in runs if run.created.timestamp() >= since]

    return asyncio.run(read())


def wait_for_run(server: Server, deployment: str, check, timeout_s: float, since: float = 0.0):
    """The first run of ``deployment`` for which ``check(run)`` holds; fails with what there is."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = runs_of(server, deployment, since)
        if found := next((run for run in runs if check(run)), None):
            return found
        time.sleep(1)
    raise AssertionError(f"no matching {deployment} run in {timeout_s:.0f} s: "
                         f"{[(r.name, r.state.name, r.state.message) for r in runs]}")


def pause_schedules(server: Server, deployment: str) -> None:
    async def pause():
        async with server.client() as client:
            found = await client.read_deployment_by_name(deployment)
            for schedule in found.schedules:
                await client.update_deployment_schedule(found.id, schedule.id, active=False)

    asyncio.run(pause())


def completed(run) -> bool:
    assert not (run.state.is_final() and not run.state.is_completed()), \
        f"{run.name} ended {run.state.name}: {run.state.message}"
    return run.state.is_completed()


def prove_the_schedules(server: Server, *names: str) -> None:
    """Each deployment prefect.yaml gives a schedule (or those named) has runs Prefect's scheduler created."""
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for deployment in (d for d in config["deployments"] if d.get("schedules") and d["name"] in (names or [d["name"]])):
        name = f"{deployment['name']}/{deployment['name']}"
        run = wait_for_run(server, name, lambda run: run.auto_scheduled, 30)
        assert run.expected_start_time is not None


def prove_the_schedule_and_the_release_event(server: Server, prefect_file: Path) -> tuple:
    """The scheduler creates watch runs from the deployed interval; a worker runs one; its event
    (the feed's new release) starts an ingest run that a worker completes. -> (watch run, ingest run)"""
    since = time.time()
    deploy(server, prefect_file, "watch-releases")
    scheduled = wait_for_run(server, "watch-releases/watch-releases",
                             lambda run: run.auto_scheduled and run.created.timestamp() >= since, 30)
    assert scheduled.state.name in {"Scheduled", "Late", "Pending", "Running", "Completed"}
    watched = wait_for_run(server, "watch-releases/watch-releases",
                           lambda run: run.auto_scheduled and completed(run), 120, since)
    pause_schedules(server, "watch-releases/watch-releases")  # one proof is enough; spare the CPU
    ingest = wait_for_run(server, "ingest-docs/ingest-docs",
                          lambda run: run.parameters.get("release", "").endswith(RELEASE) and completed(run), 240,
                          since)
    assert ingest.parameters["version"] == "2.4.x" and ingest.created >= watched.created
    return watched, ingest


def prove_the_question_event(server: Server, env: dict[str, str]) -> dict:
    """`docsrag ask` queues a question and announces it; the trigger starts an answer run on the GPU
    pool's worker, which answers it. -> the question as `docsrag show --json` gives it."""
    since = time.time()
    asked = subprocess.run([DOCSRAG, "ask", "Where does Milvus store data?", "--json"], env={**os.environ, **env},
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert asked.returncode == 0, asked.stderr[-3000:]
    question = json.loads(asked.stdout.splitlines()[-1])["id"]
    run = wait_for_run(server, "answer-questions/answer-questions", lambda run: completed(run), 240, since)
    assert not run.auto_scheduled  # the event's run, not the safety-net schedule's
    shown = subprocess.run([DOCSRAG, "show", str(question), "--json"], env={**os.environ, **env}, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-3000:]
    return json.loads(shown.stdout)
