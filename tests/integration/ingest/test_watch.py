"""Watching releases, against a local server shaped like the GitHub releases API."""

import asyncio
import hashlib
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from docsrag.flows.cli import main

from tests.conftest import ROOT, api_env

API_PATH = "/repos/milvus-io/milvus-docs/releases"


class FakeGitHub:
    """Releases JSON with ETag/304, rate limits and malformed answers; assets served from disk."""

    def __init__(self, assets_dir: Path):
        self.assets_dir = assets_dir
        self.releases: list[dict] = []
        self.mode = "ok"
        self.requests: list[dict] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def publish(self, tag: str, asset: str, served_file: str, asset_id: int, draft: bool = False) -> None:
        size = (self.assets_dir / served_file).stat().st_size
        self.releases.insert(0, {"tag_name": tag, "draft": draft, "published_at": "2026-11-01T00:00:00Z", "assets": [
            {"id": asset_id, "name": asset, "size": size, "browser_download_url": f"{self.base}/download/{served_file}"},
            {"id": asset_id + 1000, "name": "source.tar.gz", "size": 1, "browser_download_url": f"{self.base}/x"},
        ]})

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.requests.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
                if self.path.startswith("/download/"):
                    data = (fake.assets_dir / self.path.removeprefix("/download/")).read_bytes()
                    return self._send(200, data, "application/zip")
                if fake.mode == "ratelimit":
                    return self._send(403, b'{"message": "API rate limit exceeded"}', headers={
                        "x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(time.time()) + 600)})
                if fake.mode == "malformed":
                    return self._send(200, b'{"message": "this is not a list"')
                if fake.mode == "huge":  # a list of releases that never ends, sent as fast as it goes
                    return self._send(200, b"[" + b'{"draft": true},' * (2 * 1024**2) + b"{}]")
                if fake.mode == "trickle":  # a byte every 0.2 s: each read is quick, the whole is not
                    return self._trickle(json.dumps(fake.releases).encode())
                body = json.dumps(fake.releases).encode()
                etag = '"' + hashlib.sha1(body).hexdigest() + '"'
                if self.headers.get("If-None-Match") == etag:
                    return self._send(304, b"", headers={"ETag": etag})
                self._send(200, body, headers={"ETag": etag})

            def _trickle(self, body):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    for byte in body:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(0.2)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the reader gave up, as it should

            def _send(self, status, body, content_type="application/json", headers=None):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

        return Handler


@pytest.fixture
def github(releases, home, monkeypatch):
    fake = FakeGitHub(releases)
    fake.publish("v2.4.6-preview", "milvus_docs_2.4.x_en.zip", "milvus_docs_faq_2.4.x_en.zip", asset_id=11)
    fake.publish("v2.6.0-draft", "milvus_docs_2.6.x_en.zip", "milvus_docs_faq_2.4.x_en.zip", asset_id=12, draft=True)
    monkeypatch.setenv("DOCSRAG_RELEASES_API", fake.base + API_PATH)
    yield fake
    fake.server.shutdown()


def watch(capsys, *args) -> dict:
    code = main(["watch", "--once", *args, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_new_release_is_reported_once_then_new_ones_only(github, prefect_server, capsys):
    assert watch(capsys) == {"new": ["2.4.x"], "seen": 1, "events": 1, "refused": []}
    assert watch(capsys) == {"new": [], "seen": 1, "events": 0, "refused": []}
    assert github.requests[-1]["if-none-match"], "the second read was conditional (304)"
    github.publish("v2.5.0", "milvus_docs_2.5.x_en.zip", "milvus_docs_2.5.x_en.zip", asset_id=21)
    assert watch(capsys) == {"new": ["2.5.x"], "seen": 2, "events": 1, "refused": []}


def test_seen_releases_survive_a_lost_etag(github, prefect_server, capsys, home):
    watch(capsys)
    state = home / "objects" / "watch" / "milvus-io__milvus-docs.json"
    saved = json.loads(state.read_text())
    state.write_text(json.dumps({**saved, "etag": None}))  # e.g. a feed that stops sending ETags
    assert watch(capsys)["new"] == []


def test_rate_limit_is_a_clear_error(github, prefect_server, capsys):
    github.mode = "ratelimit"
    assert main(["watch", "--once"]) == 1
    err = capsys.readouterr().err
    assert "GitHub rate limit reached" in err and "resets at" in err and "set GITHUB_TOKEN" in err


def test_malformed_feed_is_a_clear_error(github, prefect_server, capsys):
    github.mode = "malformed"
    started = time.monotonic()
    assert main(["watch", "--once"]) == 1
    assert "malformed releases feed from http://127.0.0.1" in capsys.readouterr().err
    assert time.monotonic() - started < 5, "not retried: the same answer would come back"


def test_token_is_sent_and_never_printed(github, prefect_server, capsys, monkeypatch):
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_secret_value")
    watch(capsys)
    assert github.requests[0]["authorization"] == "Bearer ghp_secret_value"
    captured = capsys.readouterr()
    assert "ghp_secret_value" not in captured.out + captured.err


def test_ingest_flag_ingests_new_releases_without_a_server(github, prefect_server, capsys):
    assert watch(capsys, "--ingest") == {"new": ["2.4.x"], "seen": 1, "events": 0, "refused": []}
    assert main(["search", "Where does Milvus store data?", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["doc_path"] == "en/faq/product_faq.md"


def test_event_triggers_the_ingest_deployment_with_the_asset_url(github, prefect_server, capsys):
    from prefect.client.orchestration import get_client

    env = api_env()
    prefect = [str(Path(sys.executable).parent / "prefect"), "--no-prompt"]
    for pool in ("docsrag-cpu", "docsrag-gpu"):
        subprocess.run([*prefect, "work-pool", "create", pool, "--type", "process", "--overwrite"], env=env,
                       cwd=ROOT, check=True, capture_output=True, timeout=120)
    deployed = subprocess.run([*prefect, "deploy", "--all"], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

    async def trigger_runs():
        async with get_client() as client:
            deployment = await client.read_deployment_by_name("ingest-docs/ingest-docs")
            runs = await client.read_flow_runs()
            return [r for r in runs if r.deployment_id == deployment.id and r.parameters.get("release")]

    time.sleep(5)  # the trigger service loads the new automation
    assert watch(capsys)["events"] == 1
    deadline, runs = time.monotonic() + 90, []
    while not runs and time.monotonic() < deadline:
        time.sleep(2)
        runs = asyncio.run(trigger_runs())
    assert runs, "the docsrag.release.published event created an ingest-docs run"
    assert runs[0].parameters == {"release": f"{github.base}/download/milvus_docs_faq_2.4.x_en.zip",
                                  "version": "2.4.x", "force": False, "publish_main": False}


def test_a_feed_over_its_size_cap_is_refused_without_retries(github, prefect_server, capsys):
    github.mode = "huge"
    started = time.monotonic()
    assert main(["watch", "--once"]) == 1
    err = capsys.readouterr().err
    assert "over 8388608 bytes" in err, err[-2000:]
    assert time.monotonic() - started < 20, "not retried: the same feed would come back"


def test_a_trickling_feed_stops_at_its_deadline(github, prefect_server, capsys, monkeypatch):
    from docsrag.tasks.ingest import feed

    monkeypatch.setattr(feed, "FEED_DEADLINE_S", 2.0)  # 60 s in production; the trickle takes minutes
    github.mode = "trickle"
    started = time.monotonic()
    assert main(["watch", "--once"]) == 1
    assert "not read within 2 s" in capsys.readouterr().err
    assert time.monotonic() - started < 20


def test_feed_errors_never_show_the_feeds_credentials(github, prefect_server, capsys, monkeypatch):
    monkeypatch.setenv("DOCSRAG_RELEASES_API", github.base.replace("http://", "http://bot:Pl4ntedS3cret@")
                       + API_PATH + "?access_token=Pl4ntedT0ken")
    github.mode = "malformed"
    assert main(["watch", "--once"]) == 1
    err = capsys.readouterr().err
    assert "malformed releases feed" in err and "Pl4nted" not in err, err[-2000:]


def test_an_asset_url_with_credentials_is_refused_not_announced(github, prefect_server, capsys):
    """An event is stored in Prefect's database and shown in its UI: a signed or credentialed asset
    URL would leave its secret there. Such an asset is refused with the reason, its secret unshown."""
    github.releases.clear()
    github.publish("v2.5.0", "milvus_docs_2.5.x_en.zip", "milvus_docs_faq_2.4.x_en.zip", asset_id=31)
    asset = github.releases[0]["assets"][0]
    asset["browser_download_url"] += "?X-Amz-Signature=Pl4ntedSig"
    result = watch(capsys)
    assert result["new"] == [] and result["events"] == 0
    assert "carries credentials" in result["refused"][0]["reason"]
    assert "Pl4ntedSig" not in json.dumps(result)


def test_an_asset_of_another_github_repository_is_refused_not_announced(github, prefect_server, capsys,
                                                                       monkeypatch):
    """The feed is the configured repository's; an asset it lists on GitHub is that repository's
    release download, or the run it would start refuses it (tasks/ingest/source_policy.py): said here first.
    Naming github.com as a trusted host does not open other repositories."""
    monkeypatch.setenv("DOCSRAG_RELEASE_HOSTS", "github.com")  # the fake API is on loopback, not api.github.com
    github.releases.clear()
    github.publish("v2.5.0", "milvus_docs_2.5.x_en.zip", "milvus_docs_faq_2.4.x_en.zip", asset_id=41)
    github.publish("v2.6.0", "milvus_docs_2.6.x_en.zip", "milvus_docs_faq_2.4.x_en.zip", asset_id=42)
    own, foreign = github.releases[1]["assets"][0], github.releases[0]["assets"][0]
    own["browser_download_url"] = "https://github.com/Milvus-IO/milvus-docs/releases/download/v2.5.0/" + own["name"]
    foreign["browser_download_url"] = "https://github.com/someone-else/x/releases/download/v2.6.0/" + foreign["name"]
    result = watch(capsys)
    assert result["new"] == ["2.5.x"] and result["events"] == 1
    assert [r["asset"] for r in result["refused"]] == ["milvus_docs_2.6.x_en.zip"]
    assert "milvus-io/milvus-docs" in result["refused"][0]["reason"], result["refused"]
