"""A stranger's first hour (issue 31): the mistakes a newcomer made, each as it must read now.

An ordinary mistake reads as at most three lines (what failed, why, what to do) and no traceback;
Prefect's own console lines about a failed run stay in its UI. The terminal is checked in a real
one (tmux): the progress bar and the log lines never share a line, and the task-run state chatter
stays out of it. An LLM server down is said at once, and Ctrl-C says how to resume.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from docsrag.flows.cli import main
from docsrag.tasks.core.settings import SettingsError, load_settings

from tests.conftest import DOCSRAG, FAQ, ROOT, api_env


def short(err: str) -> list[str]:
    """stderr of a refused command: its lines, at most three of them, none a traceback's."""
    lines = err.strip().splitlines()
    assert len(lines) <= 3 and "Traceback" not in err, err[-3000:]
    return lines


def docsrag(*args: str, env: dict | None = None, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([DOCSRAG, *args], env=env or api_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False, **kwargs)


def flow_runs() -> int:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return len(client.read_flow_runs())


# -- 1. errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, says", [
    (["--release", "nope.zip"], "release file not found: nope.zip"),
    (["--release", "ftp://example.com/docs.zip"], "unsupported release URL"),
    (["--release", "x.zip", "--version", "../2.4.x"], "refusing version '../2.4.x'"),
])
def test_inputs_are_checked_before_a_flow_starts(argv, says, home, prefect_server, capsys):
    before = flow_runs()
    assert main(["ingest", *argv]) == 1
    [line] = short(capsys.readouterr().err)
    assert line.startswith("docsrag ingest: ") and says in line
    assert flow_runs() == before, "no flow run (nor a Failed run in the UI) for an input checked at the door"


def test_a_missing_release_reads_as_one_line(home, prefect_server):
    done = docsrag("ingest", "--release", "nope.zip")
    assert done.returncode == 1
    said = ("docsrag ingest: release file not found: nope.zip (no such file here; pass --release with the path or "
            "URL of a docs release zip)")
    assert short(done.stderr) == [said]


@pytest.mark.parametrize("content", [b"this is not a zip\n", b"truncated"])
def test_a_refused_archive_reads_short_and_leaves_no_folder(content, home, prefect_server, releases, tmp_path):
    bad = tmp_path / "milvus_docs_9.9.x_en.zip"
    bad.write_bytes(content if content != b"truncated" else (releases / FAQ).read_bytes()[:4000])
    done = docsrag("ingest", "--release", str(bad))
    assert done.returncode == 1
    assert short(done.stderr)[-1].startswith("docsrag ingest: ")
    releases_folder = home / "objects" / "releases"
    assert not releases_folder.exists() or not any(releases_folder.iterdir()), list(releases_folder.rglob("*"))


def test_the_offline_default_says_to_pass_release(home, prefect_server):
    started = time.monotonic()  # port 9 (discard) refuses at once: what a machine without network meets
    done = docsrag("ingest", env=api_env(DOCSRAG_RELEASE_URL="https://127.0.0.1:9/milvus_docs_2.4.x_en.zip"))
    assert done.returncode == 1
    line = short(done.stderr)[-1]
    assert "could not reach" in line and "pass --release PATH" in line, line
    assert time.monotonic() - started < 30, "said at once, not after the retries a deployment's run makes"


def test_a_held_milvus_lite_file_names_its_holder(home, capsys):
    script = ("import sys, time; from pymilvus import MilvusClient; MilvusClient(sys.argv[1]); print('ready', "
              "flush=True); time.sleep(600)")
    home.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", script, str(home / "milvus.db")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        assert main(["search", "Where does Milvus store data?"]) == 1
        [line] = short(capsys.readouterr().err)
        assert f"held by pid {holder.pid} (" in line and "stop it" in line, line
    finally:
        holder.kill()
        holder.wait()


def test_an_unknown_option_shows_the_subcommands_usage_and_a_guess(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["ingest", "--relase", "x.zip"])
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert err.startswith("usage: docsrag ingest ") and "--relase (did you mean --release?)" in err, err


def test_a_closed_pipe_ends_quietly(home):
    """`docsrag search ... | head -1`: the listing of questions stands in for the search (the test
    process holds the shared index's Milvus Lite folder); both print through the same exit."""
    for n in range(3):
        assert main(["ask", f"question {n}?", "--json"]) == 0
    read, write = os.pipe()
    os.close(read)  # `| head -1` that has already gone
    try:
        done = subprocess.run([DOCSRAG, "questions"], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
                              check=False, cwd=ROOT, env={**os.environ, "DOCSRAG_HOME": str(home)})
    finally:
        os.close(write)
    assert done.returncode in (0, 141) and done.stderr == "", (done.returncode, done.stderr)


# -- 2. the terminal ----------------------------------------------------------------------------

BAR = re.compile(r"\d+/\d+ \[[\d:]+<")  # tqdm's "128/1835 [00:06<01:25"
LOG = re.compile(r"\d\d:\d\d:\d\d\.\d{3} \| [A-Z]+ +\|")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed (make test installs it)")
def test_a_real_terminal_shows_stages_and_a_bar_never_on_one_line(home, prefect_server, releases, tmp_path):
    seen = in_tmux(tmp_path, ["ingest", "--release", str(releases / FAQ)])
    assert "published" in seen[-1] and "(was None)" not in "\n".join(seen), seen
    assert not [line for line in seen if "Finished in state" in line], "\n".join(seen)
    assert not [line for line in seen if BAR.search(line) and LOG.search(line)], "\n".join(seen)
    stages = [line for line in seen if LOG.search(line)]
    assert any("Embedded 49 chunks" in line for line in stages) and len(stages) <= 12, "\n".join(seen)
    quiet = in_tmux(tmp_path, ["ingest", "--quiet", "--release", str(releases / FAQ)])
    assert len(quiet) == 1 and "unchanged" in quiet[0], quiet


def in_tmux(tmp_path: Path, args: list[str]) -> list[str]:
    """``docsrag ARGS`` in a 160x50 tmux pane: the non-empty lines of every screen seen, in order, the
    command's last output line last (its exit status is checked)."""
    session, status = f"docsrag-test-{os.getpid()}", tmp_path / "status"
    status.unlink(missing_ok=True)
    env = {k: v for k, v in api_env().items() if k.startswith(("DOCSRAG_", "PREFECT_", "HF_", "DO_NOT"))}
    command = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.quote(DOCSRAG),
                        *map(shlex.quote, args), f"; echo $? > {status}; sleep 600"])
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "50", "env", "TERM=xterm-256color",
                    "bash", "-c", command], check=True)
    screens: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while not status.exists() and time.monotonic() < deadline:
            screens.append(capture(session))
            time.sleep(0.2)
        screens.append(capture(session))
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)
    assert status.exists() and status.read_text().strip() == "0", screens[-1]
    lines: list[str] = []
    for screen in screens:
        for line in filter(str.strip, screen.splitlines()):
            if line not in lines:
                lines.append(line)
    last = [line for line in screens[-1].splitlines() if line.strip()]
    return [line for line in lines if line != last[-1]] + [last[-1]]


def capture(session: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-J", "-S", "-", "-t", session], capture_output=True,
                          text=True, check=False).stdout


# -- 3. outages said at once --------------------------------------------------------------------

def test_ask_wait_names_a_server_that_is_down_and_keeps_the_question(faq_home, capsys, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("DOCSRAG_LLM_BASE_URL", "http://127.0.0.1:9/v1")
    started = time.monotonic()
    with temporary_settings({PREFECT_API_URL: None}):  # no Prefect server: no worker to wait for, as for a newcomer
        code = main(["ask", "Where does Milvus store data?", "--wait", "30"])
    out, err = capsys.readouterr()
    assert time.monotonic() - started < 20, "said within seconds, not at the end of --wait"
    assert code == 1, (out, err)
    [line] = short(err)
    assert "http://127.0.0.1:9/v1" in line and "stays queued" in line, line
    asked = re.search(r"question (\d+)", line).group(1)
    assert main(["show", asked, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["status"] == "pending" and shown["attempts"] == 0


@pytest.mark.parametrize("name", ["LLM_BASE_URL", "EMBEDDING_BASE_URL"])
def test_a_base_url_without_a_scheme_is_refused(name, monkeypatch):
    monkeypatch.setenv(f"DOCSRAG_{name}", "localhost:8000")
    with pytest.raises(SettingsError, match=f"DOCSRAG_{name}: must start with http:// or https://"):
        load_settings()


def test_answer_counts_the_question_it_put_back(faq_home, prefect_server, capsys, monkeypatch):
    monkeypatch.setenv("DOCSRAG_LLM_BASE_URL", "http://127.0.0.1:9/v1")
    assert main(["ask", "How does Milvus flush data?", "--json"]) == 0
    asked = json.loads(capsys.readouterr().out)["id"]
    assert main(["questions", "--status", "pending", "--json"]) == 0
    pending = len(json.loads(capsys.readouterr().out))
    assert main(["answer"]) == 1
    line = short(capsys.readouterr().err)[-1]  # after the run's link and its one line
    assert re.search(rf"\b{pending} claimed questions? went back to the queue", line), (pending, line)
    assert main(["show", str(asked), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "pending"


def test_search_without_an_llm_says_it_searched_as_asked(faq_home, capsys, monkeypatch):
    monkeypatch.setenv("DOCSRAG_LLM_BASE_URL", "http://127.0.0.1:9/v1")
    question = "Milvus에서 데이터는 어떻게 저장되나요?"
    assert main(["search", question, "-k", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == (
        "(searched as asked: no LLM to translate; DOCSRAG_MULTILINGUAL=e5 reads it better)")  # under the header
    assert main(["search", question, "-k", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["note"].startswith("searched as asked: no LLM to translate")
    assert main(["search", "Where does Milvus store data?", "--json"]) == 0
    assert "note" not in json.loads(capsys.readouterr().out)


# -- 4. questions not in English without an LLM -----------------------------------------------

def test_ask_wait_says_a_question_was_searched_as_asked_without_a_translation(faq_home, capsys, monkeypatch, tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("DOCSRAG_QUEUE_URL", f"sqlite:///{tmp_path / 'questions.db'}")
    monkeypatch.setenv("DOCSRAG_LLM_BASE_URL", "http://127.0.0.1:9/v1")  # nothing listens there
    monkeypatch.setenv("DOCSRAG_MIN_RELEVANCE", "1")  # "not covered": answered with no model call
    monkeypatch.setenv("DOCSRAG_WEAK_RELEVANCE", "1")
    with temporary_settings({PREFECT_API_URL: None}):  # no worker to wait for: answered here
        assert main(["ask", "Di mana Milvus menyimpan data?", "--wait", "30"]) == 0
        out = capsys.readouterr().out
        assert "(searched as asked: no translation was available)" in out.splitlines(), out
        assert main(["ask", "Bagaimana Milvus menyimpan indeks?", "--wait", "30", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["status"], shown["untranslated"]) == ("answered", "no translation was available"), shown


# -- 5. interrupts and resume -------------------------------------------------------------------

def test_ctrl_c_says_how_to_resume_and_the_rerun_says_it_resumed(home, prefect_server, releases):
    from docsrag.testing.llm_emulator import Emulator

    # Embeddings at 8 texts/s (an emulated server): the interrupt lands mid-run however fast the
    # CPU's own model is (OpenVINO's int8 embedded the whole FAQ before the Ctrl-C arrived).
    embedder = Emulator(embed_rate=8.0).start()
    env = api_env(DOCSRAG_EMBEDDING_BATCH_SIZE="4", DOCSRAG_EMBEDDING_CONCURRENCY="1", DOCSRAG_EMBEDDING="openai",
                  DOCSRAG_EMBEDDING_BASE_URL=embedder.url, DOCSRAG_EMBEDDING_MODEL="emulated",
                  DOCSRAG_MULTILINGUAL="off")
    try:
        _interrupted_then_resumed(env, releases)
    finally:
        embedder.stop()


def _interrupted_then_resumed(env: dict, releases) -> None:
    # As from a terminal, where Ctrl-C is not ignored: a suite started in the background of a shell
    # without job control inherits SIGINT ignored, and so would the command (it then ran to the end).
    proc = subprocess.Popen([DOCSRAG, "ingest", "--verbose", "--release", str(releases / FAQ)], stderr=subprocess.PIPE,
                            env=env, cwd=ROOT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    seen = b""
    while proc.poll() is None:
        seen += proc.stderr.read1(4096)
        if len(re.findall(rb"Task run 'write-batch-\w+' - Finished in state Completed", seen)) >= 2:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole process group
            break
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode == 130, (seen + rest).decode(errors="replace")[-3000:]
    assert rest.decode().strip().splitlines()[-1] == "interrupted: run the same command again to resume"

    resumed = docsrag("ingest", "--release", str(releases / FAQ), env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    carried = int(re.search(r"(\d+) carried over from an interrupted build", resumed.stderr).group(1))
    assert carried >= 8
    assert f"{49 - carried} embedded, 0 reused, {carried} resumed" in resumed.stdout, resumed.stdout


# -- 8. one process on the embedded tier ----------------------------------------------------------------

def test_with_the_api_holding_milvus_lite_ask_show_and_search_go_through_it(faq_index, tmp_path):
    """`docsrag api --answer` holds the Milvus Lite folder; the obvious next commands work beside it:
    `ask --wait` is answered by the API's worker (it failed with a traceback after queueing, and
    asking again made a duplicate), `show` reads the queue, `search` asks the running API."""
    from docsrag.testing.llm_emulator import Emulator
    from tests.support.api_server import free_port

    home = tmp_path / "home"
    shutil.copytree(faq_index.home, home)
    llm, port = Emulator().start(), free_port()
    env = {**os.environ, "DOCSRAG_HOME": str(home), "DOCSRAG_LLM_BASE_URL": llm.url}
    env.pop("PREFECT_API_URL", None)
    api = subprocess.Popen([DOCSRAG, "api", "--answer", f"--port={port}"], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not _answers(f"http://127.0.0.1:{port}/v1/versions"):
            assert api.poll() is None and time.monotonic() < deadline, api.stderr.read()[-3000:]
            time.sleep(0.5)
        before = {q["id"] for q in json.loads(docsrag("questions", "--json", env=env).stdout)}
        asked = docsrag("ask", "Where does Milvus store data?", "--wait", "60", "--json", env=env)
        assert asked.returncode == 0 and not asked.stderr.strip(), asked.stderr[-3000:]
        view = json.loads(asked.stdout)
        assert view["status"] == "answered", view
        shown = docsrag("show", str(view["id"]), "--json", env=env)
        assert shown.returncode == 0 and json.loads(shown.stdout)["status"] == "answered", shown.stderr[-3000:]
        listed = docsrag("questions", "--json", env=env)
        assert {q["id"] for q in json.loads(listed.stdout)} - before == {view["id"]}  # one question, no duplicate
        found = docsrag("search", "Where does Milvus store data?", "--json", env=env)
        assert found.returncode == 0, found.stderr[-3000:]
        assert json.loads(found.stdout)["results"][0]["doc_path"] == "en/faq/product_faq.md"
        human = docsrag("search", "Where does Milvus store data?", env=env)
        assert human.returncode == 0 and "en/faq/product_faq.md" in human.stdout, human.stderr[-3000:]
        # A version nothing serves is refused by the API before it is queued (it was queued, and failed later).
        unserved = docsrag("ask", "Where does Milvus store data?", "--version", "9.9.x", env=env)
        assert unserved.returncode == 1 and len(unserved.stderr.strip().splitlines()) == 1, unserved.stderr[-3000:]
        assert "9.9.x" in unserved.stderr and "2.4.x" in unserved.stderr, unserved.stderr
        listed = docsrag("questions", "--json", env=env)
        assert {q["id"] for q in json.loads(listed.stdout)} - before == {view["id"]}
    finally:
        os.killpg(api.pid, signal.SIGTERM)
        api.wait(timeout=60)
        llm.stop()


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
