"""The shipped automations on a real Prefect server: created from the repo's file, fired by real runs."""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from docsrag.flows.cli import main


class Webhook:
    """A chat webhook: records what it is sent."""

    def __init__(self):
        self.received: list[dict] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T0KEN-s3cret"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, text: str, timeout_s: float = 60) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for message in self.received:
                if text in message["text"]:
                    return message["text"]
            time.sleep(0.3)
        raise AssertionError(f"no notification with {text!r}; got {self.received}")


@pytest.fixture
def webhook(prefect_server, home, monkeypatch):
    hook = Webhook()
    monkeypatch.setenv("DOCSRAG_NOTIFY_WEBHOOK_URL", hook.url)
    yield hook
    hook.server.shutdown()


def automations() -> list:
    import asyncio

    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return await client.read_automations()

    return [a for a in asyncio.run(read()) if a.name.startswith("docsrag:")]


def test_automations_are_created_from_the_repo_file_once(webhook, capsys):
    assert main(["automations", "--json"]) == 0
    assert main(["automations", "--json"]) == 0, "applying again replaces them"
    names = json.loads(capsys.readouterr().out.splitlines()[-1])["automations"]
    assert names == ["docsrag: a run failed", "docsrag: no ingest completed for 26 hours",
                     "docsrag: questions dead-lettered"]
    found = automations()
    assert sorted(a.name for a in found) == sorted(names)
    assert all(a.actions[0].type == "send-notification" for a in found)
    assert "s3cret" not in json.dumps([a.model_dump(mode="json") for a in found]), "the webhook is a block secret"


def test_a_failed_answer_run_reaches_the_webhook(webhook, capsys):
    assert main(["automations"]) == 0
    assert main(["answer"]) == 1  # nothing ingested: the run fails before claiming
    text = webhook.wait_for("answer-questions run")
    assert "Failed" in text and re.search(r"\(id [0-9a-f-]{36}\)", text)


def test_the_failure_notification_names_the_run_not_its_parameters_or_error(webhook):
    """A chat service is outside: it gets the run's name, state and link, never its parameters
    or its error text, which may quote a URL's credentials."""
    from docsrag.flows.ingest import ingest_release

    assert main(["automations"]) == 0
    planted = "Pl4ntedN0tification"  # its own: the run's parameters keep it (test_trust scans every run)
    with pytest.raises(Exception, match="unsupported release URL ftp://mirror.example/"):
        ingest_release(release=f"ftp://docs:{planted}@mirror.example/milvus_docs_2.4.x_en.zip")
    text = webhook.wait_for("ingest-docs run")
    assert "Failed" in text and re.search(r"\(id [0-9a-f-]{36}\)", text) and planted not in text


def test_dead_lettered_questions_reach_the_webhook(webhook):
    from docsrag.flows.answer import _announce_dead
    from docsrag.tasks.core.summaries import DrainSummary

    assert main(["automations"]) == 0
    summary = DrainSummary(dead=1, problems=[{"id": 7, "question": "q", "status": "dead",
                                              "reason": "EmptyAnswer: the model returned no answer"}])
    # The server's trigger service loads a new automation on its own schedule (seconds, more on a
    # busy machine): an event emitted before that is not matched, so the run's event is sent again.
    deadline = time.monotonic() + 60
    while True:
        _announce_dead(summary, "run-1")
        try:
            text = webhook.wait_for("dead-lettered", timeout_s=5)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
    assert "1 questions dead-lettered" in text and "EmptyAnswer" in text and "[7]" in text


def test_without_a_notification_target_the_command_says_what_to_set(prefect_server, home, capsys):
    assert main(["automations"]) == 1
    assert "set DOCSRAG_NOTIFY_WEBHOOK_URL" in capsys.readouterr().err
