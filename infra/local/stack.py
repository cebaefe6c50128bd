"""The local real stack, without Docker: SeaweedFS S3, a Milvus 2.3 server on that S3, a Prefect
server on PostgreSQL with a process worker per work pool, and the deployments of prefect.yaml.

    python infra/local/stack.py up [--home DIR] [--free-ports] [--paused]
    python infra/local/stack.py down [--home DIR] [--purge]
    python infra/local/stack.py status [--home DIR]

Everything lives under ``$DOCSRAG_HOME/stack/`` (data, logs, pid files, generated credentials);
``up`` writes ``$DOCSRAG_HOME/stack.env`` for ``source``. Running ``up`` again starts only what is
not running; ``down`` stops only the processes whose pid files it wrote.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

from docsrag.flows.cli import local_server

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEFAULT_PORTS = {"s3": 8333, "milvus": 19530, "prefect": 4200}
# Ports the `milvus` package's config template names; etcd's peer port and the metrics port it does not.
MILVUS_PORTS = ("etcd_port", "root_coord_port", "proxy_internal_port", "query_coord_port", "query_node_port",
                "index_coord_port", "index_node_port", "data_coord_port", "data_node_port")
INTERNAL_PORTS = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3_grpc",
                  "s3_iceberg", "s3_lance", "weed_metrics", "milvus_metrics", "etcd_peer_port", *MILVUS_PORTS)
OBJECTS_BUCKET, MILVUS_BUCKET = "docsrag", "milvus"


class StackError(RuntimeError):
    """A component did not come up; the message names it and its log."""


# ---------------------------------------------------------------- state: ports, credentials, pids

def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_state(stack: Path, free_ports: bool, postgres: str, db_prefix: str) -> dict:
    """Ports and credentials are chosen once and kept, so a restarted component finds its data."""
    path = stack / "state.json"
    if path.is_file():
        return _with_prefect_auth(path, json.loads(path.read_text()))
    public = {name: free_port() if free_ports else port for name, port in DEFAULT_PORTS.items()}
    state = {
        "ports": {**public, **{name: free_port() for name in INTERNAL_PORTS}},
        "s3_access_key": "docsrag" + secrets.token_hex(4),
        "s3_secret_key": secrets.token_urlsafe(24),
        "milvus_password": secrets.token_urlsafe(18),
        "prefect_auth": _prefect_auth(),
        "postgres": postgres.rstrip("/"),
        "prefect_db": f"{db_prefix}_prefect",
        "queue_db": f"{db_prefix}_queue",
    }
    stack.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2))
    path.chmod(0o600)
    return state


def _prefect_auth() -> str:
    """The Prefect API's credentials (``user:password``, the UI asks for them): whoever reaches the
    API can emit the event that starts an ingest, start runs and read blocks."""
    return "docsrag:" + secrets.token_urlsafe(24)


def _with_prefect_auth(path: Path, state: dict) -> dict:
    """A stack made before the API had credentials gets them; its server takes them at its next start."""
    if "prefect_auth" not in state:
        state["prefect_auth"] = _prefect_auth()
        path.write_text(json.dumps(state, indent=2))
        path.chmod(0o600)
    return state


def running(stack: Path, name: str) -> int | None:
    """The process group we started for ``name``, if it is still alive."""
    pid_file = stack / f"{name}.pid"
    if not pid_file.is_file():
        return None
    pid = int(pid_file.read_text())
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def spawn(stack: Path, name: str, cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> None:
    """Start ``cmd`` detached in its own process group (so ``down`` stops it and its children)."""
    log = (stack / f"{name}.log").open("ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})}, cwd=cwd or stack, start_new_session=True)
    (stack / f"{name}.pid").write_text(str(proc.pid))


def stop(stack: Path, name: str, grace_s: float = 30) -> bool:
    pid = running(stack, name)
    if pid is None:
        return False
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(pid, signal.SIGKILL)
    (stack / f"{name}.pid").unlink(missing_ok=True)
    return True


def wait_for(what: str, check, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    error = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except StackError:
            raise  # the check knows it will never be ready
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            error = exc
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
    raise StackError(f"{what} not ready after {timeout_s:.0f} s (last error: {error}); log {log}:\n{tail}")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return resp.status == 200


FREE_PORTS_HINT = "Stop it, or start the stack on free ports: `make stack-up STACK_ARGS=--free-ports`."


def check_ports(stack: Path, state: dict) -> None:
    """Each public port of a component not yet running must be free: a component that cannot bind
    would leave its port to whatever holds it (a user's own Prefect server would get our deployments)."""
    for name in DEFAULT_PORTS:
        port = state["ports"][name]
        if not running(stack, name) and not local_server.port_free(port):
            raise StackError(f"port {port}, where the stack's {name} server should listen, {held_by(port)}. "
                             + FREE_PORTS_HINT)


def held_by(port: int) -> str:
    """Who listens on a loopback TCP port, in words: 'is held by pid 123 (prefect server start ...)'."""
    inodes = local_server.listening_sockets(port) or set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) in inodes for fd in fd_dir.iterdir()):
                command = (fd_dir.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                return f"is held by pid {fd_dir.parent.name} ({command.strip()[:160]})"
        except OSError:
            continue
    return "is held by another process"


# ---------------------------------------------------------------- components

def s3_endpoint(state: dict) -> str:
    return f"http://127.0.0.1:{state['ports']['s3']}"


def s3_client(state: dict):
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint(state), region_name="us-east-1",
                        aws_access_key_id=state["s3_access_key"], aws_secret_access_key=state["s3_secret_key"])


def start_s3(stack: Path, state: dict) -> None:
    """SeaweedFS master + volume + filer + S3 gateway in one process; signed requests only."""
    p = state["ports"]
    identities = stack / "s3-identities.json"
    identities.write_text(json.dumps({"identities": [{
        "name": "docsrag", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        "credentials": [{"accessKey": state["s3_access_key"], "secretKey": state["s3_secret_key"]}]}]}))
    identities.chmod(0o600)
    (stack / "s3").mkdir(exist_ok=True)
    spawn(stack, "s3", [
        str(BIN / "weed"), "server", f"-dir={stack / 's3'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}", "-master.volumeSizeLimitMB=256",
        f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}", "-volume.max=50",
        "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
        "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", f"-s3.port.iceberg={p['s3_iceberg']}",
        f"-s3.port.lance={p['s3_lance']}", f"-s3.config={identities}", f"-metricsPort={p['weed_metrics']}",
    ])
    wait_for("SeaweedFS S3", lambda: s3_client(state).list_buckets() is not None, stack / "s3.log")


def create_buckets(state: dict) -> None:
    client = s3_client(state)
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for bucket in {OBJECTS_BUCKET, MILVUS_BUCKET} - existing:
        client.create_bucket(Bucket=bucket)


def milvus_uri(state: dict) -> str:
    return f"http://127.0.0.1:{state['ports']['milvus']}"


def start_milvus(stack: Path, state: dict) -> None:
    """Milvus 2.3 standalone (embedded etcd and rocksmq) storing segments in its S3 bucket."""
    base = stack / "milvus"
    if not (base / "configs" / "milvus.yaml").is_file():
        prepare_milvus(base, state)
    # Run the binary ourselves: the package's launcher re-picks ports on every start (a crashed
    # server's port lingers in TIME_WAIT), and its embedded etcd would take the fixed 2379/2380.
    binary = base / "bin" / "milvus"
    env = {"DEPLOY_MODE": "STANDALONE", "METRICS_PORT": str(state["ports"]["milvus_metrics"]),
           "MILVUS_RUN_DIR": str(base / "run"), "LD_LIBRARY_PATH": str(binary.parent)}
    spawn(stack, "milvus", [str(binary), "run", "standalone"], env, cwd=base)
    wait_for("Milvus", lambda: milvus_login(state) is not None, stack / "milvus.log", timeout_s=240)


def prepare_milvus(base: Path, state: dict) -> None:
    """Unpack the `milvus` package's binary and write its config once, with every port pinned."""
    import milvus
    import yaml

    p = state["ports"]
    config = milvus.MilvusServerConfig(data_dir=str(base), proxy_port=p["milvus"],
                                       **{name: p[name] for name in MILVUS_PORTS})
    for key, value in {
        "common.storageType": "minio", "minio.address": "127.0.0.1", "minio.port": p["s3"],
        "minio.bucketName": MILVUS_BUCKET, "minio.rootPath": "files", "minio.useSSL": "false",
        "minio.accessKeyID": state["s3_access_key"], "minio.secretAccessKey": state["s3_secret_key"],
        "authorization_enabled": True,
    }.items():
        config.set(key, value)
    config.resolve()
    milvus._initialize_data_files(str(base))  # the package's unpacking step (no public name for it)
    etcd = base / "configs" / "embedEtcd.yaml"
    client_url, peer_url = f"http://127.0.0.1:{p['etcd_port']}", f"http://127.0.0.1:{p['etcd_peer_port']}"
    etcd.write_text(yaml.safe_dump({
        "listen-client-urls": client_url, "advertise-client-urls": client_url,
        "listen-peer-urls": peer_url, "initial-advertise-peer-urls": peer_url,
        "initial-cluster": f"default={peer_url}"}))
    main_config = base / "configs" / "milvus.yaml"
    settings = yaml.safe_load(main_config.read_text())
    settings["etcd"]["config"] = {"path": str(etcd)}
    main_config.write_text(yaml.safe_dump(settings, sort_keys=False))
    main_config.chmod(0o600)  # it holds the S3 secret key


def milvus_login(state: dict) -> str:
    """The root password is rotated from Milvus's well-known default on first start."""
    from pymilvus import MilvusClient

    token = f"root:{state['milvus_password']}"
    try:
        MilvusClient(uri=milvus_uri(state), token=token, timeout=5).list_collections()
    except Exception:  # noqa: BLE001 - the default password still works on a fresh server
        client = MilvusClient(uri=milvus_uri(state), token="root:Milvus", timeout=5)
        client.update_password("root", "Milvus", state["milvus_password"])
    return token


def postgres_url(state: dict, database: str, driver: str = "") -> str:
    base = state["postgres"].rsplit("/", 1)[0] if state["postgres"].count("/") > 2 else state["postgres"]
    return base.replace("postgresql://", f"postgresql{driver}://", 1) + f"/{database}"


def create_databases(state: dict) -> None:
    import psycopg

    with psycopg.connect(postgres_url(state, "postgres"), autocommit=True) as db:
        existing = {row[0] for row in db.execute("SELECT datname FROM pg_database")}
        for name in {state["prefect_db"], state["queue_db"]} - existing:
            db.execute(f'CREATE DATABASE "{name}"')


def prefect_api(state: dict) -> str:
    return f"http://127.0.0.1:{state['ports']['prefect']}/api"


def prefect_env(stack: Path, state: dict) -> dict:
    return {"PREFECT_HOME": str(stack / "prefect"), "PREFECT_API_URL": prefect_api(state),
            "PREFECT_API_AUTH_STRING": state["prefect_auth"],
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true"}


def start_prefect(stack: Path, state: dict) -> None:
    spawn_prefect(stack, state)
    wait_for_prefect(stack, state)


def spawn_prefect(stack: Path, state: dict) -> None:
    env = {**prefect_env(stack, state),
           "PREFECT_API_DATABASE_CONNECTION_URL": postgres_url(state, state["prefect_db"], "+asyncpg"),
           "PREFECT_SERVER_API_AUTH_STRING": state["prefect_auth"]}  # every route but /health asks for it
    env.pop("PREFECT_API_URL")
    spawn(stack, "prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(state["ports"]["prefect"])], env)


def wait_for_prefect(stack: Path, state: dict) -> None:
    wait_for("Prefect server", lambda: ours_answers(stack, state), stack / "prefect.log")


def ours_answers(stack: Path, state: dict) -> bool:
    """The server we started answers, not whatever holds the port: /health answers for any Prefect
    (no auth), so our process must be alive and an authenticated route must take our credentials."""
    port = state["ports"]["prefect"]
    if not running(stack, "prefect"):
        raise StackError(f"the stack's Prefect server exited: port {port} {held_by(port)}. "
                         + FREE_PORTS_HINT)
    if not http_ok(prefect_api(state) + "/health"):
        return False
    # Ours takes the stack's credentials and refuses a request without them: a server with no auth
    # (another home's) would take both.
    statuses = prefect_status(state, "/deployments/filter"), prefect_status(state, "/deployments/filter", auth=False)
    if statuses != (200, 401):
        raise StackError(f"port {port} answers with a Prefect server that is not the stack's (HTTP {statuses[0]} with "
                         f"its credentials, {statuses[1]} without): it {held_by(port)}. " + FREE_PORTS_HINT)
    return True


def prefect_status(state: dict, path: str, auth: bool = True) -> int:
    """The HTTP status of a POST to the stack's Prefect API, with the stack's credentials or none."""
    import base64
    import urllib.error

    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(state["prefect_auth"].encode()).decode()
    request = urllib.request.Request(prefect_api(state) + path, data=b"{}", method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def prefect_cli(stack: Path, state: dict, *args: str) -> None:
    env = {**os.environ, **prefect_env(stack, state), **stack_env(stack.parent, state)}
    done = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise StackError(f"prefect {' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def work_pools() -> list[str]:
    """The pools prefect.yaml deploys to; the first one (CPU) gets the local worker."""
    import yaml

    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return [pool["name"] for pool in config["definitions"]["work_pools"].values()]


def deploy(stack: Path, state: dict, paused: bool) -> None:
    with ThreadPoolExecutor() as pools:  # each `prefect` command is seconds of start-up: the pools at once
        list(pools.map(lambda pool: prefect_cli(stack, state, "work-pool", "create", pool, "--type", "process",
                                                "--overwrite"), work_pools()))
    prefect_cli(stack, state, "deploy", "--all")
    if paused:
        asyncio.run(_pause_schedules(state))
    create_automations(stack, state)


def create_automations(stack: Path, state: dict) -> None:
    """The shipped automations, where the user has said whom to notify (never stored here)."""
    if not (os.environ.get("DOCSRAG_NOTIFY_WEBHOOK_URL") or os.environ.get("DOCSRAG_NOTIFY_BLOCK")):
        print("stack: automations not created: set DOCSRAG_NOTIFY_WEBHOOK_URL or DOCSRAG_NOTIFY_BLOCK and run "
              "`docsrag automations` (with stack.env sourced) to be told when runs fail", file=sys.stderr)
        return
    env = {**os.environ, **prefect_env(stack, state), **stack_env(stack.parent, state)}
    done = subprocess.run([str(BIN / "docsrag"), "automations"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    if done.returncode:
        raise StackError(f"docsrag automations failed:\n{done.stderr[-2000:]}")


async def _pause_schedules(state: dict) -> None:
    """Tests and demos trigger runs by hand: no schedule fires behind their back."""
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(prefect_api(state), auth_string=state["prefect_auth"]) as client:
        for deployment in await client.read_deployments():
            for schedule in deployment.schedules:
                await client.update_deployment_schedule(deployment.id, schedule.id, active=False)


def worker_name(pool: str) -> str:
    """``worker`` for the first (CPU) pool, ``worker-gpu`` for docsrag-gpu, ..."""
    return "worker" if pool == work_pools()[0] else "worker-" + pool.rsplit("-", 1)[-1]


def start_workers(stack: Path, state: dict) -> None:
    """A process worker per pool of prefect.yaml, so every deployment's runs are taken here (the
    answer runs too, with the LLM the caller's DOCSRAG_LLM_BASE_URL names)."""
    env = {**prefect_env(stack, state), **stack_env(stack.parent, state)}
    started = {}
    for pool in work_pools():  # all started, then all waited for: they start up side by side
        name = worker_name(pool)
        if running(stack, name):
            continue
        spawn(stack, name, [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"], env,
              cwd=ROOT)
        started[pool] = stack / f"{name}.log"
    for pool, log in started.items():
        wait_for(f"Prefect worker of {pool}", lambda log=log: "started" in log.read_text(errors="replace").lower(),
                 log, timeout_s=120)


# ---------------------------------------------------------------- stack.env

def stack_env(home: Path, state: dict) -> dict:
    return {
        "DOCSRAG_HOME": str(home),
        "DOCSRAG_MILVUS_URI": milvus_uri(state),
        "DOCSRAG_MILVUS_TOKEN": f"root:{state['milvus_password']}",
        "DOCSRAG_MILVUS_BUCKET": MILVUS_BUCKET,
        "DOCSRAG_OBJECT_STORE": f"s3://{OBJECTS_BUCKET}/docsrag",
        "DOCSRAG_S3_ENDPOINT_URL": s3_endpoint(state),
        "DOCSRAG_QUEUE_URL": postgres_url(state, state["queue_db"]),
        "AWS_ACCESS_KEY_ID": state["s3_access_key"],
        "AWS_SECRET_ACCESS_KEY": state["s3_secret_key"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "PREFECT_API_URL": prefect_api(state),
        "PREFECT_API_AUTH_STRING": state["prefect_auth"],
        # What a deployment's run may ingest (tasks/ingest/source_policy.py): the stack's own incoming/
        # prefix and the folders of release zips, so `prefect deployment run ... -p release=<zip>`
        # works here; nothing else on this machine, and no other bucket.
        "DOCSRAG_RELEASE_BUCKETS": f"{OBJECTS_BUCKET}/incoming",
        "DOCSRAG_RELEASE_FOLDERS": release_folders(),
    }


def release_folders() -> str:
    """DOCSRAG_RELEASE_FOLDERS as the operator set it, else the shared release zips beside the
    checkout (DOCSRAG_TEST_DATA), where they exist."""
    if os.environ.get("DOCSRAG_RELEASE_FOLDERS"):
        return os.environ["DOCSRAG_RELEASE_FOLDERS"]
    shared = Path(os.environ.get("DOCSRAG_TEST_DATA", ROOT.parent / "shared")) / "data" / "releases"
    return str(shared.resolve()) if shared.is_dir() else ""


def write_env(home: Path, state: dict) -> Path:
    path = home / "stack.env"
    lines = [f"export {name}={shlex.quote(value)}" for name, value in stack_env(home, state).items()]
    path.write_text("# Written by `make stack-up`; `source` it to point docsrag at the local stack.\n"
                    + "\n".join(lines) + "\n")
    path.chmod(0o600)  # it holds the generated S3 and Milvus credentials
    return path


# ---------------------------------------------------------------- commands

def up(home: Path, free_ports: bool, paused: bool, postgres: str, db_prefix: str) -> Path:
    stack = home / "stack"
    state = load_state(stack, free_ports, postgres, db_prefix)
    check_ports(stack, state)
    # The Prefect server needs only its database: it starts up while S3 and Milvus do.
    create_databases(state)
    fresh_server = not running(stack, "prefect")
    if fresh_server:
        spawn_prefect(stack, state)
    if not running(stack, "s3"):
        start_s3(stack, state)
    create_buckets(state)
    if not running(stack, "milvus"):
        start_milvus(stack, state)
    wait_for_prefect(stack, state)  # a server left running is checked too: it is what we deploy into
    env_file = write_env(home, state)
    if fresh_server or not (stack / "deployed").exists():
        deploy(stack, state, paused)
        (stack / "deployed").touch()
    start_workers(stack, state)
    return env_file


def down(home: Path, purge: bool) -> list[str]:
    stack = home / "stack"
    grace_s = 0 if purge else 30  # data about to be deleted needs no clean shutdown
    stopped = [name for name in (*map(worker_name, work_pools()), "prefect", "milvus", "s3")
               if stop(stack, name, grace_s)]
    if purge and (stack / "state.json").is_file():
        state = json.loads((stack / "state.json").read_text())
        _drop_databases(state)
        shutil.rmtree(stack)
        (home / "stack.env").unlink(missing_ok=True)
    return stopped


def _drop_databases(state: dict) -> None:
    import psycopg

    with psycopg.connect(postgres_url(state, "postgres"), autocommit=True) as db:
        for name in (state["prefect_db"], state["queue_db"]):
            db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def status(home: Path) -> dict:
    stack = home / "stack"
    return {name: running(stack, name) for name in ("s3", "milvus", "prefect", *map(worker_name, work_pools()))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stack", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("DOCSRAG_HOME", ROOT / ".docsrag")))
    parser.add_argument("--free-ports", action="store_true", help="pick free ports instead of 8333/19530/4200")
    parser.add_argument("--paused", action="store_true", help="deploy with every schedule paused")
    parser.add_argument("--postgres", default=os.environ.get("DOCSRAG_STACK_POSTGRES",
                                                             "postgresql://postgres@127.0.0.1:5432"))
    parser.add_argument("--db-prefix", default="docsrag", help="database names: PREFIX_prefect, PREFIX_queue")
    parser.add_argument("--purge", action="store_true", help="down: also delete the stack's data and databases")
    args = parser.parse_args(argv)
    home = args.home.resolve()
    try:
        if args.command == "up":
            print(f"stack up; source {up(home, args.free_ports, args.paused, args.postgres, args.db_prefix)}")
        elif args.command == "down":
            print(f"stopped: {', '.join(down(home, args.purge)) or 'nothing was running'}")
        else:
            print(json.dumps(status(home)))
    except StackError as exc:
        print(f"stack: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
