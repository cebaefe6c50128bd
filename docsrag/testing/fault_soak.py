"""A fault soak of the answer worker: several worker processes drain one PostgreSQL queue while
the model server, the database, Milvus and the workers themselves fail on a seeded schedule.

The parts are real: a private PostgreSQL cluster (so it can be restarted, ``pg_ctl restart -m
immediate``: a crash and recovery), a Milvus server process (killed and started again on its
port and data), worker processes running the drain in a loop as a scheduled deployment would
(one is SIGKILLed and replaced), and the continuous-batching emulator with per-request faults
(docsrag/testing/llm_emulator.py): a poison question per 100, resets, timeouts, trickled bodies, NUL
bytes, usage as strings, citations of thousands of digits, 503 bursts, a proxy's HTML page for
a while.

The invariants are read from the database at the end: every question answered exactly once
(a trigger counts each transition to ``answered``) or dead with a reason, every poison question
dead, no ordinary question dead, nothing left claimed. ``bench/soak.py`` runs it at 2,000
questions and reports the time against the same run without faults; tests/integration/queue/test_soak.py runs a
short one.

A worker: python -m docsrag.testing.fault_soak worker STOP_FILE (settings from DOCSRAG_* variables).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sqlalchemy import create_engine, text

from docsrag.testing.llm_emulator import Emulator
from docsrag.testing.milvus_server import MilvusServer, free_port

ROOT = Path(__file__).resolve().parents[2]
POISON = "POISON-MARK"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
WORKER_RUN_S = 20.0  # each drain run's max_seconds: runs hand over as a schedule would
QUESTIONS = ["Where does Milvus store data?", "Is Docker the only way to install and run Milvus?",
             "What are the main factors affecting recall?", "Can I upsert data in Milvus?",
             "How much memory does an index need?", "Does Milvus support inserting and searching at once?"]
# Per-request faults of an ordinary question, with their chance (a poison question always gets 500).
REQUEST_FAULTS = {"reset": 0.02, "hang": 0.01, "trickle": 0.01, "nul": 0.02, "bad_usage": 0.02,
                  "huge_citation": 0.01}


class PostgresServer:
    """A private PostgreSQL cluster on a free port, restartable without touching anyone else's."""

    def __init__(self):
        # Its own folder under /tmp: the server runs as the postgres user, who cannot enter a
        # root-only temporary folder.
        self.root, self.port = Path(tempfile.mkdtemp(prefix="docsrag-pg-")), free_port()
        os.chmod(self.root, 0o755)
        self.data = self.root / "pgdata"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg(self, *args: str) -> None:
        command = [str(PG_BIN / args[0]), *args[1:]]
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        # No pipes: the server started by pg_ctl would hold them open, and run() would wait for it.
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)

    def start(self) -> PostgresServer:
        if not self.data.exists():
            if os.geteuid() == 0:
                shutil.chown(self.root, "postgres")
            self._pg("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self._pg("pg_ctl", "-D", str(self.data), "-w", "-l", str(self.root / "log"), "-o",
                 f"-p {self.port} -k {self.root} -c fsync=off -c max_connections=200", "start")
        return self

    def restart(self) -> None:
        """A crash and recovery: every connection is cut, the server is back seconds later."""
        self._pg("pg_ctl", "-D", str(self.data), "-w", "-m", "immediate", "-l", str(self.root / "log"), "-o",
                 f"-p {self.port} -k {self.root} -c fsync=off -c max_connections=200", "restart")

    def stop(self) -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-w", "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def database(self, name: str) -> str:
        admin = create_engine(_driver(self.url), isolation_level="AUTOCOMMIT")
        with admin.connect() as db:
            db.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            db.exec_driver_sql(f"CREATE DATABASE {name}")
        admin.dispose()
        return self.url.rsplit("/", 1)[0] + f"/{name}"


def _driver(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://")


@dataclass
class Plan:
    """What goes wrong, and when (seconds from the start), drawn from the seed."""

    seed: int
    faults: bool
    events: list[tuple[float, str]] = field(default_factory=list)

    @classmethod
    def drawn(cls, seed: int, span_s: float, faults: bool = True) -> Plan:
        if not faults:
            return cls(seed, False)
        rng = random.Random(seed)
        names = ["burst_503", "kill_worker", "html_10s", "restart_postgres", "restart_milvus", "burst_503"]
        slots = sorted(rng.uniform(0.05, 0.8) * span_s for _ in names)
        rng.shuffle(names)
        return cls(seed, True, list(zip(slots, names)))


@dataclass
class SoakResult:
    seed: int
    faults: bool
    questions: int
    poison: int
    answered: int
    dead: int
    dead_poison: int
    dead_ordinary: int
    left_claimed: int
    left_waiting: int
    answered_twice: int
    dead_without_reason: int
    seconds: float
    events: list[str] = field(default_factory=list)
    injected: dict[str, int] = field(default_factory=dict)
    factor: float | None = None  # seconds / the fault-free run's seconds

    def violations(self) -> list[str]:
        found = []
        if self.answered + self.dead != self.questions:
            found.append(f"{self.questions - self.answered - self.dead} questions neither answered nor dead")
        if self.dead_poison != self.poison:
            found.append(f"{self.poison - self.dead_poison} poison questions not dead")
        if self.dead_ordinary:
            found.append(f"{self.dead_ordinary} ordinary questions dead")
        if self.left_claimed:
            found.append(f"{self.left_claimed} left claimed")
        if self.answered_twice:
            found.append(f"{self.answered_twice} answered more than once")
        if self.dead_without_reason:
            found.append(f"{self.dead_without_reason} dead without a reason")
        return found

    def to_dict(self) -> dict:
        return asdict(self)


class RequestFaults:
    """The emulator's fault function: seeded draws per request, poison questions always 500."""

    def __init__(self, seed: int):
        self.rng, self.lock = random.Random(seed * 7919 + 1), threading.Lock()

    def __call__(self, question: str) -> str | None:
        if POISON in question:
            return "poison"
        with self.lock:
            draw = self.rng.random()
        for fault, chance in REQUEST_FAULTS.items():
            if draw < chance:
                return fault
            draw -= chance
        return None


@dataclass
class Stack:
    """What every soak run shares: the Milvus server with the index, PostgreSQL, the model server."""

    milvus: MilvusServer
    postgres: PostgresServer
    llm: Emulator
    env: dict[str, str]


def start_stack(root: Path, release: Path, ingest: Callable[[Path, str], None] | None = None) -> Stack:
    """Milvus with ``release`` ingested (by ``ingest(release, milvus_uri)``; default: the ingest flow on
    a temporary Prefect server), a private PostgreSQL, the emulated GPU."""
    milvus = MilvusServer(root / "milvus").start()
    env = {"DOCSRAG_HOME": str(root / "home"), "DOCSRAG_MILVUS_URI": milvus.uri, "DOCSRAG_MULTILINGUAL": "off"}
    try:
        (ingest or _ingest)(release, env)
        postgres = PostgresServer().start()
    except BaseException:
        milvus.kill()
        raise
    llm = Emulator(max_num_seqs=96, step_s=(0.002, 0.008), output_tokens=40).start()
    llm.hang_question_s = 5.0
    return Stack(milvus, postgres, llm, {**env, "DOCSRAG_LLM_BASE_URL": llm.url})


def _ingest(release: Path, env: dict[str, str]) -> None:
    from prefect.testing.utilities import prefect_test_harness

    os.environ.update(env)
    with prefect_test_harness(server_startup_timeout=120):
        from docsrag.flows.ingest import ingest_release

        ingest_release(release=str(release))


def stop_stack(stack: Stack) -> None:
    stack.llm.stop()
    stack.milvus.kill()
    stack.postgres.stop()


def worker_env(stack_env: dict[str, str], queue_url: str) -> dict[str, str]:
    return {**os.environ, **stack_env, "DOCSRAG_QUEUE_URL": queue_url, "DOCSRAG_LEASE_S": "6",
            "DOCSRAG_MAX_ATTEMPTS": "3", "DOCSRAG_RETRY_BACKOFF_S": "0.5", "DOCSRAG_LLM_TIMEOUT_S": "3",
            "DOCSRAG_LLM_MAX_RETRIES": "1", "DOCSRAG_LLM_DEADLINE_S": "10", "DOCSRAG_MILVUS_TIMEOUT_S": "5",
            "DOCSRAG_LLM_CONCURRENCY": "32", "DOCSRAG_MIN_RELEVANCE": "-1", "DOCSRAG_WEAK_RELEVANCE": "-1",
            "DOCSRAG_TRANSLATE_QUESTIONS": "false"}


def soak(stack: Stack, plan: Plan, questions: int, workers: int = 3, tmp: Path | None = None,
         limit_s: float = 600.0, log: Callable[[str], None] = lambda line: None) -> SoakResult:
    """Drain ``questions`` (one in 100 poison) with ``workers`` processes under ``plan``."""
    tmp = tmp or Path(os.environ.get("TMPDIR", "/tmp"))
    name = f"soak_{plan.seed}_{'faults' if plan.faults else 'clean'}_{os.getpid()}"
    url = stack.postgres.database(name)
    poison = _fill(url, questions)
    stack.llm.fault = RequestFaults(plan.seed) if plan.faults else None
    stack.llm.faults_injected = {}
    env = worker_env(stack.env, url)
    stop = tmp / f"{name}.stop"
    stop.unlink(missing_ok=True)
    started = time.monotonic()
    procs = [_worker(env, stop, tmp / f"{name}.w{n}.log") for n in range(workers)]
    done_events: list[str] = []
    pending_events = list(plan.events)
    try:
        while time.monotonic() - started < limit_s:
            elapsed = time.monotonic() - started
            while pending_events and pending_events[0][0] <= elapsed:
                _, event = pending_events.pop(0)
                log(f"{elapsed:6.1f}s {event}")
                _inject(event, stack, procs, env, stop, tmp / f"{name}.w{len(procs)}.log")
                done_events.append(f"{elapsed:.1f}s {event}")
            if not pending_events and _settled(url, questions):  # every scheduled fault happens
                break
            time.sleep(0.5)
        seconds = time.monotonic() - started
    finally:
        stop.touch()
        for proc in procs:
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        stack.llm.always = None
        stack.llm.always_fail = None
        stack.llm.fault = None
    result = _read_result(url, plan, questions, poison, round(seconds, 1))
    result.events, result.injected = done_events, dict(stack.llm.faults_injected)
    return result


def _fill(url: str, questions: int) -> int:
    """Create the queue (the workers find it made) and its answered-counting trigger; -> poison count."""
    from docsrag.tasks.queue.questions import Queue

    queue = Queue(url)
    with queue.engine.begin() as db:
        db.exec_driver_sql("CREATE TABLE soak_answered (id INTEGER NOT NULL)")
        db.exec_driver_sql("""CREATE FUNCTION soak_count() RETURNS trigger AS $$
            BEGIN INSERT INTO soak_answered VALUES (NEW.id); RETURN NEW; END $$ LANGUAGE plpgsql""")
        db.exec_driver_sql("""CREATE TRIGGER soak_answered AFTER UPDATE OF status ON docsrag_questions
            FOR EACH ROW WHEN (NEW.status = 'answered' AND OLD.status IS DISTINCT FROM 'answered')
            EXECUTE FUNCTION soak_count()""")
    poison = 0
    for i in range(questions):
        is_poison = i % 100 == 50
        poison += is_poison
        queue.submit(f"{QUESTIONS[i % len(QUESTIONS)]} (#{i}{' ' + POISON if is_poison else ''})", lang="en")
    queue.engine.dispose()
    return poison


def _worker(env: dict, stop: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "docsrag.testing.fault_soak", "worker", str(stop)], cwd=ROOT, env=env,
                            stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)


def _inject(event: str, stack: Stack, procs: list[subprocess.Popen], env: dict, stop: Path, log: Path) -> None:
    if event == "burst_503":
        stack.llm.always_fail = 503
        threading.Timer(2.0, lambda: setattr(stack.llm, "always_fail", None)).start()
    elif event == "html_10s":
        stack.llm.always = "html"
        threading.Timer(10.0, lambda: setattr(stack.llm, "always", None)).start()
    elif event == "kill_worker":
        victim = procs.pop(0)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        procs.append(_worker(env, stop, log))  # the deployment's next run, on a fresh process
    elif event == "restart_postgres":
        stack.postgres.restart()
    elif event == "restart_milvus":
        stack.milvus.kill()
        stack.milvus.start()


def _settled(url: str, questions: int) -> bool:
    try:
        engine = create_engine(_driver(url))
        with engine.connect() as db:
            final = db.scalar(text("SELECT count(*) FROM docsrag_questions WHERE status IN ('answered', 'dead')"))
        engine.dispose()
        return final == questions
    except Exception:  # noqa: BLE001 - PostgreSQL restarting: ask again
        return False


def _read_result(url: str, plan: Plan, questions: int, poison: int, seconds: float) -> SoakResult:
    engine = create_engine(_driver(url))
    with engine.connect() as db:
        def one(sql: str) -> int:
            return int(db.scalar(text(sql)) or 0)

        marked = f"question LIKE '%{POISON}%'"
        result = SoakResult(
            plan.seed, plan.faults, questions, poison,
            answered=one("SELECT count(*) FROM docsrag_questions WHERE status = 'answered'"),
            dead=one("SELECT count(*) FROM docsrag_questions WHERE status = 'dead'"),
            dead_poison=one(f"SELECT count(*) FROM docsrag_questions WHERE status = 'dead' AND {marked}"),
            dead_ordinary=one(f"SELECT count(*) FROM docsrag_questions WHERE status = 'dead' AND NOT {marked}"),
            left_claimed=one("SELECT count(*) FROM docsrag_questions WHERE status = 'claimed'"),
            left_waiting=one("SELECT count(*) FROM docsrag_questions WHERE status IN ('pending', 'failed')"),
            answered_twice=one("SELECT count(*) FROM (SELECT id FROM soak_answered GROUP BY id "
                               "HAVING count(*) > 1) twice"),
            dead_without_reason=one("SELECT count(*) FROM docsrag_questions WHERE status = 'dead' "
                                    "AND coalesce(last_error, '') = ''"),
            seconds=seconds)
    engine.dispose()
    return result


def run_worker(stop: Path) -> None:
    """Drain runs one after another until told to stop, as a scheduled deployment on one GPU would;
    a failed run (an outage) is followed by the next one a second later."""
    import asyncio
    import uuid

    from docsrag.tasks.answer.drain import Drain
    from docsrag.tasks.answer.retrieve import Retriever
    from docsrag.tasks.core.settings import load_settings
    from docsrag.tasks.embed import embedding
    from docsrag.tasks.queue.questions import Queue

    settings = load_settings()
    choice = embedding.resolve(settings)  # the worker's edge: resolved once, kept across Milvus restarts
    retriever = None
    while not stop.exists():
        try:
            retriever = retriever or Retriever(settings, choice)
            queue = Queue.from_settings(settings)
            summary = asyncio.run(Drain(settings, queue, retriever, owner=f"soak-{uuid.uuid4().hex[:12]}",
                                        max_seconds=WORKER_RUN_S).run())
            queue.engine.dispose()
            print(f"run: claimed {summary.claimed} answered {summary.answered} failed {summary.failed} dead "
                  f"{summary.dead} released {summary.released} lost {summary.lost} {summary.outage or ''}"[:400],
                  flush=True)
            if summary.outage and "Milvus" in summary.outage:
                retriever = None  # a Milvus restarted: a new client, and its collections loaded again
            if summary.claimed == 0:
                time.sleep(0.5)
        except Exception as exc:  # noqa: BLE001 - the next run tries again, as the schedule would
            print(f"run failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            if "Milvus" in str(exc):
                retriever = None  # a new client after a Milvus restart
            time.sleep(1.0)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    run_worker(Path(sys.argv[2]))
