"""The local real stack (infra/local/stack.py): SeaweedFS S3, a Milvus 2.3 server storing into it,
a Prefect server on PostgreSQL with a process worker, and the deployments of prefect.yaml.

The stack starts once for this module, through the same script as `make stack-up`, on free ports
and its own databases, and is purged afterwards. Runs go through the CLI and the worker, as a
user's would.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest
from pymilvus import MilvusClient
from pymilvus.exceptions import MilvusException

from docsrag.tasks.index import store
from tests.support import triggers
from tests.conftest import DOCSRAG, ROOT
from tests.unit.ingest.test_source_policy import Watched

_spec = importlib.util.spec_from_file_location("stack", ROOT / "infra" / "local" / "stack.py")
stack_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stack_script)

FAQ = "milvus_docs_faq_2.4.x_en.zip"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, releases):
    """The stack as `make stack-up` starts it, from a shell whose settings name a release feed (a
    loopback one shaped like GitHub's) and an LLM (the emulator): its workers' runs use them."""
    from docsrag.testing.llm_emulator import Emulator

    folder = tmp_path_factory.mktemp("stack")
    home, feed, llm = folder / "home", triggers.release_feed(folder / "feed", releases), Emulator().start()
    prefix = f"docsrag_t{uuid.uuid4().hex[:6]}"
    try:
        with pytest.MonkeyPatch.context() as shell:
            # A run of a deployment at its concurrency limit (ingest-docs: 1) is tried again after
            # this many seconds (Prefect's default: 30): the queued runs of a test follow each other at once.
            for name, value in {**feed.settings, "DOCSRAG_LLM_BASE_URL": llm.url, "PREFECT_WORKER_QUERY_SECONDS": "2",
                                "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "1"}.items():
                shell.setenv(name, value)
            env_file = stack_script.up(home, free_ports=True, paused=True, db_prefix=prefix,
                                       postgres=os.environ.get("DOCSRAG_TEST_POSTGRES_URL",
                                                               "postgresql://postgres@127.0.0.1:5432"))
        yield read_env(env_file)
    finally:
        stack_script.down(home, purge=True)
        feed.server.shutdown()
        llm.stop()


def read_env(path: Path) -> dict:
    lines = [line.removeprefix("export ") for line in path.read_text().splitlines() if line.startswith("export ")]
    return {name: shlex.split(value)[0] if value else "" for name, value in (line.split("=", 1) for line in lines)}


def docsrag(stack: dict, *args: str, timeout: int = 600, **extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **stack, "HF_HUB_OFFLINE": "1", **extra}
    return subprocess.run([DOCSRAG, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def milvus(stack: dict) -> MilvusClient:
    return MilvusClient(uri=stack["DOCSRAG_MILVUS_URI"], token=stack["DOCSRAG_MILVUS_TOKEN"], timeout=30)


def s3(stack: dict):
    return boto3.client("s3", endpoint_url=stack["DOCSRAG_S3_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id=stack["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=stack["AWS_SECRET_ACCESS_KEY"])


def keys(stack: dict, bucket: str, prefix: str = "") -> list[str]:
    found = s3(stack).list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return [item["Key"] for item in found]


def rows_in(client: MilvusClient, name: str) -> int:
    try:
        return store.count(client, name)
    except MilvusException:  # still being created and loaded
        return 0


def run_deployment(stack: dict, name: str, parameters: dict, timeout_s: float = 300):
    """Create a flow run from a deployment on the stack's server; wait for the worker to finish it."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def go():
        async with PrefectClient(stack["PREFECT_API_URL"], auth_string=stack["PREFECT_API_AUTH_STRING"]) as client:
            deployment = await client.read_deployment_by_name(name)
            run = await client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
            deadline = time.monotonic() + timeout_s
            while not (run := await client.read_flow_run(run.id)).state.is_final():
                assert time.monotonic() < deadline, f"{name} run still {run.state.name} after {timeout_s} s"
                await asyncio.sleep(2)
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
            return run, artifacts

    return asyncio.run(go())


def test_stack_up_twice_is_harmless_and_writes_the_env_file(stack):
    home = Path(stack["DOCSRAG_HOME"])
    before = stack_script.status(home)
    assert all(before.values()), before
    again = subprocess.run([sys.executable, str(ROOT / "infra/local/stack.py"), "up", "--home", str(home)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert stack_script.status(home) == before  # nothing restarted
    assert set(stack) >= {"DOCSRAG_MILVUS_URI", "DOCSRAG_MILVUS_TOKEN", "DOCSRAG_MILVUS_BUCKET",
                          "DOCSRAG_OBJECT_STORE", "DOCSRAG_S3_ENDPOINT_URL", "DOCSRAG_QUEUE_URL",
                          "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PREFECT_API_URL"}
    assert (home / "stack.env").stat().st_mode & 0o077 == 0  # it holds credentials


def test_deployment_runs_on_the_worker_and_writes_to_s3_and_milvus(stack, releases):
    run, artifacts = run_deployment(stack, "ingest-docs/ingest-docs", {"release": str(releases / FAQ)})
    assert run.state.is_completed(), run.state.message
    assert {"milvus-docs-ingest-summary", "milvus-docs-ingest-documents"} <= {a.key for a in artifacts}
    summary = next(a for a in artifacts if a.key == "milvus-docs-ingest-summary").data
    assert "dense only (server has no BM25)" in summary  # the 2.3 server's capability, said plainly
    # Raw release and report archived in the object store; Milvus's own segments in its bucket.
    bucket, prefix = stack["DOCSRAG_OBJECT_STORE"].removeprefix("s3://").split("/", 1)
    archived = keys(stack, bucket, prefix)
    assert any(k.endswith(f"/releases/2.4.x/{k.split('/')[-2]}/{FAQ}") for k in archived), archived
    assert any("/reports/2.4.x/" in k and k.endswith(".json") for k in archived), archived
    assert keys(stack, stack["DOCSRAG_MILVUS_BUCKET"], "files/insert_log/")
    assert milvus(stack).describe_alias("milvus_docs")["collection_name"].startswith("milvus_docs__2_4_x__")


def test_s3_release_url_and_dense_search_on_the_server(stack, releases):
    bucket = stack["DOCSRAG_OBJECT_STORE"].removeprefix("s3://").split("/", 1)[0]
    s3(stack).upload_file(str(releases / FAQ), bucket, f"incoming/{FAQ}")
    done = docsrag(stack, "ingest", "--release", f"s3://{bucket}/incoming/{FAQ}", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["unchanged"] and summary["search"] == "dense only (server has no BM25)"
    found = docsrag(stack, "search", "Where does Milvus store data?", "--json")
    assert found.returncode == 0, found.stderr[-3000:]
    assert json.loads(found.stdout)["results"][0]["doc_path"] == "en/faq/product_faq.md"


def test_a_wrong_milvus_token_is_refused_clearly(stack):
    done = docsrag(stack, "search", "Where does Milvus store data?", DOCSRAG_MILVUS_TOKEN="root:wrong")
    assert done.returncode == 1
    assert f"Milvus at {stack['DOCSRAG_MILVUS_URI']}" in done.stderr and "root:wrong" not in done.stderr


def test_unreachable_s3_names_the_endpoint_and_changes_nothing(stack, releases):
    client = milvus(stack)
    collections, served = set(client.list_collections()), client.describe_alias("milvus_docs")
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    done = docsrag(stack, "ingest", "--release", str(releases / "milvus_docs_2.5.x_en.zip"),
                   DOCSRAG_S3_ENDPOINT_URL=dead)
    assert done.returncode == 1
    assert f"S3 endpoint {dead} unreachable" in done.stderr.splitlines()[-1]
    assert set(client.list_collections()) == collections and client.describe_alias("milvus_docs") == served


def test_milvus_lost_mid_ingest_fails_clearly_and_the_alias_survives(stack, releases):
    """Kill the server while a build writes; the run fails after its retries, readers keep the
    served collection, and search works again once the server is back."""
    client = milvus(stack)
    before, served = set(client.list_collections()), client.describe_alias("milvus_docs")["collection_name"]
    # Three retries of the failed write, as by default, a second apart instead of 1, 5 and 15 s.
    env = {**os.environ, **stack, "HF_HUB_OFFLINE": "1", "DOCSRAG_MILVUS_WRITE_RETRY_DELAYS_S": "1,1,1"}
    ingest = subprocess.Popen([DOCSRAG, "ingest", "--release", str(releases / "milvus_docs_2.4.x_en.zip"),
                               "--version", "2.4.x-fault"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (staging := set(client.list_collections()) - before) or not rows_in(client, staging.pop()):
        # the served vectors are copied in: what is left to write are the embedded batches
        assert ingest.poll() is None and time.monotonic() < deadline, ingest.communicate()[1][-3000:]
        time.sleep(0.5)
    home = Path(stack["DOCSRAG_HOME"])
    stack_script.stop(home / "stack", "milvus", grace_s=0)  # a crash, not a clean shutdown
    _, err = ingest.communicate(timeout=300)
    assert ingest.returncode == 1
    message = err.strip().splitlines()[-1]
    assert f"Milvus at {stack['DOCSRAG_MILVUS_URI']} failed during the build" in message
    assert "run the ingest again once Milvus is reachable" in message
    assert "Retry 3/3" in err, err[-4000:]  # the write task retried before giving up

    stack_script.up(home, free_ports=True, paused=True, postgres="", db_prefix="")  # state.json wins
    client = milvus(stack)
    assert client.describe_alias("milvus_docs")["collection_name"] == served
    found = docsrag(stack, "search", "Where does Milvus store data?", "--json")
    assert found.returncode == 0, found.stderr[-3000:]
    assert json.loads(found.stdout)["results"][0]["doc_path"] == "en/faq/product_faq.md"


def prefect_status(stack: dict, path: str, auth: str | None) -> int:
    """The HTTP status of a POST to the stack's Prefect API, with or without Basic credentials."""
    request = urllib.request.Request(stack["PREFECT_API_URL"] + path, data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_prefect_api_refuses_requests_without_the_stacks_credentials(stack):
    assert prefect_status(stack, "/deployments/filter", None) == 401
    assert prefect_status(stack, "/deployments/filter", "docsrag:wrong") == 401
    assert prefect_status(stack, "/deployments/filter", stack["PREFECT_API_AUTH_STRING"]) == 200


def ingest_runs(stack: dict) -> list:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    async def read():
        async with PrefectClient(stack["PREFECT_API_URL"], auth_string=stack["PREFECT_API_AUTH_STRING"]) as client:
            deployment = await client.read_deployment_by_name("ingest-docs/ingest-docs")
            return await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id])))

    return asyncio.run(read())


def test_hostile_release_events_start_runs_that_fail_with_their_reason_and_change_nothing(stack):
    """The issue's reproduction, through the server's trigger and the stack's worker: each event
    starts an ingest-docs run; none fetches, none forces, the served index stays."""
    served, collections = served_alias(stack), set(milvus(stack).list_collections())
    watched = Watched()
    hostile = {f"{watched.url}/milvus_docs_999.0_en.zip": "DOCSRAG_RELEASE_HOSTS",
               "s3://milvus/files/x.zip": "DOCSRAG_RELEASE_BUCKETS",
               "file:///etc/passwd": "DOCSRAG_RELEASE_FOLDERS",
               "https://github.com/someone-else/x/releases/download/v999/milvus_docs_999.0.x_en.zip":
                   "DOCSRAG_RELEASE_REPO"}
    before = {run.id for run in ingest_runs(stack)}
    emitting = []  # the four events are emitted at once, each by its own `prefect event emit`
    for url in hostile:
        payload = {"asset_url": url, "version": "999.0", "force": True, "publish_main": True}
        emitting.append(subprocess.Popen([str(Path(DOCSRAG).parent / "prefect"), "event", "emit",
                                          "docsrag.release.published", "--resource-id", "docsrag.release.999.0",
                                          "--payload", json.dumps(payload)],
                                         env={**os.environ, **stack}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True))
    for emitted in emitting:
        _, err = emitted.communicate(timeout=60)
        assert emitted.returncode == 0, err[-2000:]
    deadline = time.monotonic() + 150
    while len(runs := [r for r in ingest_runs(stack) if r.id not in before and r.state.is_final()]) < len(hostile):
        assert time.monotonic() < deadline, [(r.name, r.state.name) for r in ingest_runs(stack) if r.id not in before]
        time.sleep(1)
    watched.server.shutdown()
    for run in runs:
        assert run.state.is_failed(), (run.parameters, run.state.message)
        assert run.parameters["force"] is False and run.parameters["publish_main"] is False
        assert hostile[run.parameters["release"]] in run.state.message, run.state.message
    assert watched.requests == []
    assert served_alias(stack) == served and set(milvus(stack).list_collections()) == collections


def served_alias(stack: dict) -> str | None:
    try:
        return milvus(stack).describe_alias("milvus_docs")["collection_name"]
    except MilvusException:  # nothing served yet (the test ran alone)
        return None


def this_machines_address() -> str | None:
    """An address of this machine other than loopback (the one its default route would use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # no packet is sent: UDP connect only picks a route
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_the_prefect_api_and_s3_listen_on_loopback_only(stack):
    """Milvus 2.3's servers listen on every interface (no setting binds them; its root password is
    generated); what the stack can bind, it binds to 127.0.0.1."""
    address = this_machines_address()
    if address is None:
        pytest.skip("this machine has no address besides loopback")
    for url in (stack["PREFECT_API_URL"], stack["DOCSRAG_S3_ENDPOINT_URL"]):
        port = int(url.split(":")[2].split("/")[0])
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=2).close()
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_the_lifecycle_state_machine_holds_on_the_stacks_milvus_server(stack, tmp_path):
    """A bounded run of docsrag/testing/lifecycle_machine.py against the stack's Milvus 2.3 (no BM25: its
    builds are created dense only, as capabilities() detects)."""
    from hypothesis import HealthCheck, settings

    from docsrag.testing.lifecycle_machine import run_machine

    client = milvus(stack)
    assert not store.capabilities(client).bm25
    counts = run_machine(client, tmp_path, settings(max_examples=2, stateful_step_count=10, deadline=None,
                                                    derandomize=True, database=None,
                                                    suppress_health_check=list(HealthCheck)))
    print("lifecycle on the stack's Milvus:", counts)
    assert counts["ingests"] and counts["crashes injected"]



def stack_server(stack: dict) -> triggers.Server:
    return triggers.Server(stack["PREFECT_API_URL"], stack)


def test_every_schedule_of_prefect_yaml_gets_runs_from_the_scheduler_on_postgresql(stack, tmp_path):
    """The stack deploys with its schedules paused; deployed again as a user does, they get runs."""
    server = stack_server(stack)
    triggers.deploy(server, ROOT / "prefect.yaml", "ingest-docs", "answer-questions")
    try:
        triggers.prove_the_schedules(server, "ingest-docs", "answer-questions")
    finally:
        for name in ("ingest-docs/ingest-docs", "answer-questions/answer-questions"):
            triggers.pause_schedules(server, name)


def test_the_watch_schedule_runs_on_the_stacks_worker_and_its_release_event_starts_the_ingest(stack, tmp_path):
    watched, ingest = triggers.prove_the_schedule_and_the_release_event(stack_server(stack),
                                                                        triggers.short_schedule_file(tmp_path))
    assert watched.auto_scheduled and ingest.state.is_completed()


def test_a_submitted_questions_event_starts_an_answer_run_on_the_gpu_pools_worker(stack):
    shown = triggers.prove_the_question_event(stack_server(stack), stack)
    assert shown["status"] == "answered", shown
    assert shown["sources"][0]["doc_path"] == "en/faq/product_faq.md"


def test_stack_up_refuses_a_port_held_by_another_prefect_server_and_deploys_nothing_into_it(tmp_path,
                                                                                          prefect_server):
    """The session's own Prefect server holds the port the stack's Prefect should take: `up` fails
    at once, naming the port, its holder and --free-ports, before starting anything."""
    from prefect.settings import PREFECT_API_URL

    other = PREFECT_API_URL.value()
    home = tmp_path / "home"
    state = stack_script.load_state(home / "stack", True, "postgresql://postgres@127.0.0.1:5432", "unused")
    state["ports"]["prefect"] = int(other.split(":")[2].split("/")[0])
    (home / "stack" / "state.json").write_text(json.dumps(state))
    before = deployment_names(other)
    done = subprocess.run([sys.executable, str(ROOT / "infra/local/stack.py"), "up", "--home", str(home)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    message = done.stderr.strip()
    assert f"port {state['ports']['prefect']}" in message and "held by pid" in message, message
    assert "--free-ports" in message
    assert deployment_names(other) == before
    assert not any(stack_script.status(home).values())  # nothing was started


def deployment_names(api_url: str) -> set[str]:
    from prefect.client.orchestration import PrefectClient

    async def read():
        async with PrefectClient(api_url) as client:
            return {d.name for d in await client.read_deployments()}

    return asyncio.run(read())


def test_a_port_taken_over_while_the_stacks_server_lives_is_refused_before_deploying(tmp_path, prefect_server):
    """Our process is alive, but the port answers with a Prefect server without auth (another
    home's): it takes the stack's credentials as any others, so it must also refuse a request
    without them before the stack deploys into it."""
    from prefect.settings import PREFECT_API_URL

    stack = tmp_path / "stack"
    state = stack_script.load_state(stack, True, "postgresql://postgres@127.0.0.1:5432", "unused")
    state["ports"]["prefect"] = int(PREFECT_API_URL.value().split(":")[2].split("/")[0])
    ours = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        (stack / "prefect.pid").write_text(str(ours.pid))
        with pytest.raises(stack_script.StackError, match="not the stack's .HTTP 200 with its credentials, 200 without"):
            stack_script.ours_answers(stack, state)
    finally:
        ours.kill()
        ours.wait()
