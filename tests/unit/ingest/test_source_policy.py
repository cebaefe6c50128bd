"""The source policy: a run a deployment starts (an event, a schedule, the API) fetches only the
releases the operator's settings allow, and fails with the reason before a byte is fetched."""

from __future__ import annotations

import asyncio
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from docsrag.tasks.core.settings import Settings
from docsrag.tasks.ingest.source_policy import RefusedSource, check_redirect, check_source, check_version, policy_for
from tests.conftest import ROOT

FAQ = "milvus_docs_faq_2.4.x_en.zip"


def policy(**settings: str):
    return policy_for(Settings.model_validate({"home": Path("/nonexistent"), **settings}))


def refusal(url: str, resolve=None, **settings: str) -> str:
    with pytest.raises(RefusedSource) as refused:
        check_source(url, policy(**settings), resolve)
    return str(refused.value)


def public(host: str, port: int) -> list[str]:
    return ["140.82.121.4"]  # a public address, as github.com resolves on the internet


# ---------------------------------------------------------------- the policy itself

def test_the_feeds_own_site_over_https_is_allowed():
    check_source("https://github.com/milvus-io/milvus-docs/releases/download/v2.4.6/milvus_docs_2.4.x_en.zip",
                 policy(), public)


class Lookups:
    """A resolver that answers a public address and remembers each name it was asked."""

    def __init__(self):
        self.names: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.names.append(host)
        return public(host, port)


FOREIGN = "https://github.com/someone-else/x/releases/download/v999/milvus_docs_999.0.x_en.zip"


def test_a_github_url_of_another_repository_is_refused_before_any_lookup():
    """The issue's reproduction: the host is GitHub's, the repository is someone else's."""
    lookups = Lookups()
    message = refusal(FOREIGN, lookups)
    assert "milvus-io/milvus-docs" in message and "DOCSRAG_RELEASE_REPO" in message, message
    assert lookups.names == []


@pytest.mark.parametrize("url", [
    "https://github.com/milvus-io/milvus-docs-fork/releases/download/v2.4.6/milvus_docs_2.4.x_en.zip",
    "https://github.com/milvus-io/milvus-docs/archive/refs/heads/main.zip",  # not a release download
    "https://github.com/milvus-io/milvus-docs/releases/download/v2.4.6",  # no asset
    "https://github.com/milvus-io/milvus-docs/releases/download/v/../../../../someone-else/x/releases/download/v/a.zip",
    "https://github.com/milvus-io/milvus-docs/releases/download/v/%2e%2e/%2E%2E/../../someone-else/x/a.zip",
    "https://github.com/milvus-io%2Fmilvus-docs/releases/download/v/a.zip",
    "https://github.com//milvus-io/milvus-docs/releases/download/v/a.zip",
    "https://api.github.com/repos/someone-else/x/releases/assets/1",
    "https://api.github.com/users/milvus-io/repos",
])
def test_on_github_only_the_configured_repositorys_releases_are_fetched(url):
    lookups = Lookups()
    assert "DOCSRAG_RELEASE_REPO" in refusal(url, lookups)
    assert lookups.names == []


def test_the_repository_is_compared_as_github_does_without_case():
    for url in ("https://github.com/Milvus-IO/Milvus-Docs/releases/download/v2.4.6/milvus_docs_2.4.x_en.zip",
                "https://github.com/milvus-io/milvus-docs/releases/download/release/2.4/milvus_docs_2.4.x_en.zip",
                "https://api.github.com/repos/milvus-io/milvus-docs/releases/assets/123",
                "https://API.GitHub.com/repos/Milvus-io/milvus-docs/releases"):
        check_source(url, policy(), public)
    other = "https://github.com/Someone-Else/X/releases/download/v1/milvus_docs_2.4.x_en.zip"
    check_source(other, policy(release_repo="someone-else/x"), public)
    assert "someone-else/x" in refusal(FOREIGN.replace("someone-else/x", "milvus-io/milvus-docs"), public,
                                       release_repo="someone-else/x")


def test_naming_github_in_release_hosts_does_not_open_other_repositories():
    assert "DOCSRAG_RELEASE_REPO" in refusal(FOREIGN, public, release_hosts="github.com")


ASSET = "https://objects.githubusercontent.com/github-production-release-asset-2e65be/1/2?X-Amz-Signature=s"
DOWNLOAD = "https://github.com/milvus-io/milvus-docs/releases/download/v2.4.6/milvus_docs_2.4.x_en.zip"


def test_a_release_download_may_redirect_to_githubs_asset_hosts_only():
    allowed = policy()
    check_redirect(ASSET, DOWNLOAD, allowed, public)
    check_redirect(ASSET.replace("objects.", "release-assets."), DOWNLOAD, allowed, public)
    check_redirect(ASSET, "https://api.github.com/repos/milvus-io/milvus-docs/releases/assets/1", allowed, public)
    with pytest.raises(RefusedSource, match="DOCSRAG_RELEASE_HOSTS"):  # only GitHub sends a run there
        check_redirect(ASSET, "https://mirror.example/x.zip", policy(release_hosts="mirror.example"), public)
    with pytest.raises(RefusedSource, match="https only"):
        check_redirect(ASSET.replace("https:", "http:"), DOWNLOAD, allowed, public)
    with pytest.raises(RefusedSource, match="DOCSRAG_RELEASE_REPO"):
        check_redirect(FOREIGN, DOWNLOAD, allowed, public)
    with pytest.raises(RefusedSource, match="DOCSRAG_RELEASE_HOSTS"):
        check_redirect("https://evil.example/x.zip", DOWNLOAD, allowed, public)


def test_a_redirect_is_checked_as_its_target_resolves():
    lookups = Lookups()
    with pytest.raises(RefusedSource, match="non-public address"):
        check_redirect(ASSET, DOWNLOAD, policy(), lambda host, port: ["127.0.0.1"])
    check_redirect(ASSET, DOWNLOAD, policy(), lookups)
    assert lookups.names == ["objects.githubusercontent.com"]


def test_the_feeds_site_is_fetched_over_https_only():
    http = "http://github.com/milvus-io/milvus-docs/releases/download/v/milvus_docs_2.4.x_en.zip"
    assert "https only" in refusal(http, public)


def test_hosts_off_the_feeds_site_are_refused_unless_named():
    assert "DOCSRAG_RELEASE_HOSTS" in refusal("https://evil.example/x.zip", public)
    check_source("https://mirror.example/x.zip", policy(release_hosts="mirror.example"), public)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1", "0x7f000001", "[::1]", "[::ffff:127.0.0.1]",
                                  "169.254.169.254", "10.1.2.3", "192.168.0.7", "[fe80::1]", "0.0.0.0"])
def test_internal_addresses_are_refused_as_they_resolve(host):
    # the feed's site is that host: still refused, because what it resolves to is not public
    api = f"http://{host}:9/repos/o/r/releases"
    assert "non-public address" in refusal(f"http://{host}:9/x.zip", releases_api=api)


def test_a_name_that_resolves_to_loopback_is_refused():
    """DNS cannot point around it: `localhost` is a name, resolved before anything is fetched."""
    message = refusal("http://localhost:9/x.zip", releases_api="http://localhost:9/repos/o/r/releases")
    assert "resolves to a non-public address (127.0.0.1" in message or "(::1" in message


def test_the_operator_may_name_exactly_one_internal_origin():
    allowed = policy(release_hosts="http://127.0.0.1:8080")
    check_source("http://127.0.0.1:8080/x.zip", allowed)
    with pytest.raises(RefusedSource):
        check_source("http://127.0.0.1:8081/x.zip", allowed)
    with pytest.raises(RefusedSource):
        check_source("https://127.0.0.1:8080/x.zip", allowed)


def test_s3_only_from_configured_buckets_and_prefixes():
    assert "DOCSRAG_RELEASE_BUCKETS" in refusal("s3://another-bucket/x.zip")
    allowed = policy(release_buckets="releases, docsrag/incoming")
    check_source("s3://releases/any/x.zip", allowed)
    check_source("s3://docsrag/incoming/x.zip", allowed)
    for url in ("s3://docsrag/reports/x.zip", "s3://docsrag/incoming/../watch/x.zip", "s3://docsrag/incomingx/y"):
        with pytest.raises(RefusedSource):
            check_source(url, allowed)


def test_local_files_only_inside_configured_folders(tmp_path):
    folder = tmp_path / "releases"
    folder.mkdir()
    (folder / FAQ).write_bytes(b"zip")
    (folder / "passwd").symlink_to("/etc/passwd")
    allowed = policy(release_folders=str(folder))
    check_source(str(folder / FAQ), allowed)
    check_source((folder / FAQ).as_uri(), allowed)
    for url in ("file:///etc/passwd", "/etc/passwd", str(folder / ".." / ".." / "etc" / "passwd"),
                str(folder / "passwd")):
        with pytest.raises(RefusedSource, match="DOCSRAG_RELEASE_FOLDERS"):
            check_source(url, allowed)


def test_other_schemes_are_refused():
    for url in ("ftp://github.com/x.zip", "gopher://github.com/x", "C:\\x.zip", "https://github.com:99999/x.zip"):
        with pytest.raises(RefusedSource):
            check_source(url, policy(), public)


def test_a_version_that_contradicts_the_asset_name_is_refused():
    check_version("https://github.com/o/r/releases/download/v/milvus_docs_2.4.x_en.zip", "2.4.x")
    check_version("https://github.com/o/r/releases/download/v/docs.zip", "2.4.x")  # nothing to contradict
    with pytest.raises(RefusedSource, match="999.0"):
        check_version("https://github.com/o/r/releases/download/v/milvus_docs_2.4.x_en.zip", "999.0")
    with pytest.raises(RefusedSource, match="asset name says '2.4.x'"):  # as the server decodes it
        check_version("https://github.com/o/r/releases/download/v/milvus_docs_%32.4.x_en.zip", "32.4.x")


# ---------------------------------------------------------------- in the flow, from a deployment

class Recording:
    """A loopback HTTP server that records the paths asked of it and answers each with ``status``
    (and ``headers``)."""

    def __init__(self, status: int, headers: dict[str, str] | None = None):
        self.requests: list[str] = []
        requests = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                requests.append(self.path)
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class Watched(Recording):
    """An HTTP server that must see no request."""

    def __init__(self):
        super().__init__(404)


class Redirecting(Recording):
    """An HTTP server that answers every request with a redirect to ``target`` (and counts them)."""

    def __init__(self, target: str):
        super().__init__(302, {"Location": target})


@pytest.fixture(scope="module")
def ingest_deployment(prefect_server):
    from docsrag.flows.ingest import ingest_release

    return ingest_release.to_deployment(name="source-policy").apply()


def run_from_deployment(deployment_id, **parameters):
    """A flow run created from the deployment on the server and executed as a worker does."""
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow

    from docsrag.flows.ingest import ingest_release

    async def create():
        async with get_client() as client:
            return await client.create_flow_run_from_deployment(deployment_id, parameters=parameters)

    run = asyncio.run(create())
    return run_flow(ingest_release, flow_run=run, parameters=run.parameters, return_type="state")


@pytest.mark.parametrize("release, reason", [
    ("file:///etc/passwd", "DOCSRAG_RELEASE_FOLDERS"),
    ("/etc/passwd", "DOCSRAG_RELEASE_FOLDERS"),
    ("s3://another-bucket/x.zip", "DOCSRAG_RELEASE_BUCKETS"),
    (FOREIGN, "DOCSRAG_RELEASE_REPO"),  # refused by its path, where it once failed by the name's lookup
])
def test_a_deployment_run_refuses_what_the_operator_did_not_allow(ingest_deployment, home, release, reason):
    state = run_from_deployment(ingest_deployment, release=release, version="999.0")
    assert state.is_failed() and reason in state.message, state.message
    assert not (home / "milvus.db").exists() and not (home / "downloads").exists()


def test_a_deployment_run_sends_no_request_to_a_loopback_server(ingest_deployment, home):
    server = Watched()
    state = run_from_deployment(ingest_deployment, release=f"{server.url}/milvus_docs_999.0_en.zip")
    server.server.shutdown()
    assert state.is_failed() and "DOCSRAG_RELEASE_HOSTS" in state.message, state.message
    assert server.requests == []
    assert not (home / "milvus.db").exists()


def test_a_deployment_run_follows_no_redirect_the_policy_refuses(ingest_deployment, home, monkeypatch):
    """An allowed mirror sends the run to an internal server: that hop is checked before it is asked."""
    internal = Watched()
    mirror = Redirecting(f"{internal.url}/milvus_docs_999.0_en.zip")
    monkeypatch.setenv("DOCSRAG_RELEASE_HOSTS", mirror.url)
    state = run_from_deployment(ingest_deployment, release=f"{mirror.url}/milvus_docs_2.4.x_en.zip")
    mirror.server.shutdown()
    internal.server.shutdown()
    assert state.is_failed() and "DOCSRAG_RELEASE_HOSTS" in state.message and "redirect" in state.message, \
        state.message
    assert len(mirror.requests) == 1 and internal.requests == []
    assert not (home / "milvus.db").exists()


def test_a_deployment_run_reads_an_allowed_folder_but_not_a_forged_version(ingest_deployment, home, releases,
                                                                             monkeypatch, tmp_path):
    monkeypatch.setenv("DOCSRAG_RELEASE_FOLDERS", str(tmp_path))
    (tmp_path / FAQ).write_bytes(b"not a zip")  # allowed, so it gets as far as extraction
    state = run_from_deployment(ingest_deployment, release=str(tmp_path / FAQ))
    assert state.is_failed() and "not a valid zip archive" in state.message, state.message
    forged = run_from_deployment(ingest_deployment, release=str(tmp_path / FAQ), version="999.0")
    assert forged.is_failed() and "asset name says '2.4.x'" in forged.message, forged.message


def test_the_event_trigger_never_takes_force_or_publish_main_from_the_event():
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    ingest = next(d for d in config["deployments"] if d["name"] == "ingest-docs")
    for trigger in ingest["triggers"]:
        parameters = trigger["parameters"]
        assert parameters.get("force") is False and parameters.get("publish_main") is False, parameters
        assert all("event" not in str(parameters[name]) for name in ("force", "publish_main"))
