"""The GitHub releases feed of the docs repository, and what of it was already seen.

Reads the REST releases list with ``If-None-Match`` (a 304 costs no rate limit), skips
drafts, picks the assets matching a glob, and keeps the ETag and the seen assets
(version + asset id + size) in the object store so a restarted watcher does not
re-announce every release.
"""

from __future__ import annotations

import fnmatch
import json
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from urllib.parse import urlparse, urlsplit

import httpx

from docsrag.tasks.core.errors import DocsragError
from docsrag.tasks.core.escaping import for_terminal
from docsrag.tasks.core.objectstore import ObjectStore
from docsrag.tasks.core.redaction import redact_text, redact_url
from docsrag.tasks.ingest.release import ReleaseError, checked_version, release_version
from docsrag.tasks.ingest.source_policy import GITHUB_HOSTS, is_repo_url

# GitHub's releases list (100 releases with their assets) is well under 1 MiB; a feed past these
# holds `watch-releases` (concurrency limit 1) and its memory, so it is stopped and not retried.
MAX_FEED_BYTES = 8 * 1024**2
FEED_DEADLINE_S = 60.0  # the whole read, far under the 15-minute schedule


class FeedError(DocsragError, RuntimeError):
    """The feed could not be read; the message says why and what to do."""


class RateLimited(FeedError):
    """The API asked us to wait: retrying sooner only burns the limit."""


class MalformedFeed(FeedError):
    """The API answered, but not with a list of releases: asking again in seconds gets the same."""


class FeedOverBudget(MalformedFeed):
    """The feed is larger than MAX_FEED_BYTES or slower than FEED_DEADLINE_S: so would a retry be."""


@dataclass(frozen=True)
class PublishedAsset:
    version: str
    tag: str
    asset_id: int
    name: str
    size: int
    url: str
    published_at: str | None
    refused: str | None = None  # why this asset must not be ingested (an untrusted URL, a hostile version)

    @property
    def key(self) -> str:
        return f"{self.version}:{self.asset_id}:{self.size}"


def read_feed(api_url: str, pattern: str, *, etag: str | None = None, token: str | None = None,
              timeout_s: float = 30.0, trusted: tuple[str, ...] = ()) -> tuple[list[PublishedAsset] | None, str | None]:
    """Assets of published releases matching ``pattern``; ``None`` when the feed is unchanged.
    The feed is read within MAX_FEED_BYTES and FEED_DEADLINE_S; errors show its URL redacted."""
    headers = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"}
    if etag:
        headers["If-None-Match"] = etag
    if token:
        headers["Authorization"] = f"Bearer {token}"
    shown = redact_url(api_url)
    try:
        with httpx.stream("GET", api_url, headers=headers, params={"per_page": 100}, timeout=timeout_s,
                          follow_redirects=True) as response:
            body = _read_capped(response, shown)
    except httpx.HTTPError as exc:
        raise FeedError(f"cannot read the releases feed {shown}: {exc.__class__.__name__}: "
                        f"{redact_text(str(exc))}") from None
    if response.status_code == 304:
        return None, etag
    if response.status_code in (403, 429) and _rate_limited(response):
        raise RateLimited(_rate_limit_message(shown, response, token is not None))
    if response.status_code >= 400:
        text = for_terminal(redact_text(body[:200].decode("utf-8", "replace")))
        raise FeedError(f"the releases feed {shown} answered HTTP {response.status_code}: {text}")
    return _assets(api_url, body, pattern, trusted), response.headers.get("etag")


def _read_capped(response: httpx.Response, shown: str) -> bytes:
    """The body, as it arrives, within MAX_FEED_BYTES and FEED_DEADLINE_S (a trickle of bytes keeps
    every single read within its timeout, so the deadline is counted over the whole body)."""
    deadline, limit = time.monotonic() + FEED_DEADLINE_S, MAX_FEED_BYTES
    body = bytearray()
    for block in response.iter_bytes():
        body += block
        if len(body) > limit:
            raise FeedOverBudget(f"the releases feed {shown} is over {limit} bytes: stopped")
        if time.monotonic() > deadline:
            raise FeedOverBudget(f"the releases feed {shown} was not read within {FEED_DEADLINE_S:.0f} s: stopped")
    return bytes(body)


def _rate_limited(response: httpx.Response) -> bool:
    return response.headers.get("x-ratelimit-remaining") == "0" or "retry-after" in response.headers \
        or response.status_code == 429


def _rate_limit_message(api_url: str, response: httpx.Response, authenticated: bool) -> str:
    if "retry-after" in response.headers:
        when = f"retry after {response.headers['retry-after']} s"
    elif reset := response.headers.get("x-ratelimit-reset", "").strip():
        at = datetime.fromtimestamp(int(reset), timezone.utc)
        when = f"the limit resets at {at:%Y-%m-%d %H:%M:%S} UTC"
    else:
        when = "try again later"
    hint = "" if authenticated else "; set GITHUB_TOKEN for a higher limit"
    return f"GitHub rate limit reached for {api_url} (HTTP {response.status_code}): {when}{hint}"


def _refusal(url: str, version: str, api_url: str, trusted: tuple[str, ...]) -> str | None:
    """A feed says what to download: only what the configured API's own site serves (or hosts the
    user allowed with DOCSRAG_RELEASE_HOSTS) is followed, never a file on the worker."""
    try:
        checked_version(version)
    except ReleaseError as exc:
        return str(exc)
    if redact_url(url) != url:  # the URL would travel in an event, stored and shown by Prefect
        return (f"asset URL {redact_url(url)[:200]!r} carries credentials (user:password, a query or a "
                "fragment): not announced, they would be stored in Prefect's events")
    asset, api = urlparse(url), urlparse(api_url)
    host, repo = (asset.hostname or "").rstrip("."), _feed_repo(api_url)
    if host in GITHUB_HOSTS and repo and not is_repo_url(host, url, repo):  # as the run would refuse it
        return (f"asset URL {redact_url(url)[:200]!r} is not a release download of {repo!r}, the feed's "
                "repository (DOCSRAG_RELEASE_REPO)")
    origin = f"{asset.scheme}://{asset.netloc}"
    own_site = asset.scheme == "https" and asset.hostname in {api.hostname, (api.hostname or "").removeprefix("api.")}
    if origin == f"{api.scheme}://{api.netloc}" or own_site or origin in trusted or asset.hostname in trusted:
        return None
    return (f"asset URL {redact_url(url)[:200]!r} is not served by {api.hostname} over https; add its host to "
            "DOCSRAG_RELEASE_HOSTS if it is trusted")


def _feed_repo(api_url: str) -> str | None:
    """owner/repo of a feed at ``.../repos/{owner}/{repo}/releases`` (GitHub's REST path), in lower case."""
    segments = urlsplit(api_url).path.split("/")
    if "repos" not in segments:
        return None
    pair = segments[segments.index("repos") + 1:][:2]
    return "/".join(pair).lower() if len(pair) == 2 and all(pair) else None


def _assets(api_url: str, body: bytes, pattern: str, trusted: tuple[str, ...]) -> list[PublishedAsset]:
    try:
        releases = json.loads(body)
        if not isinstance(releases, list):
            raise ValueError(f"expected a JSON list of releases, got {type(releases).__name__}")
        found = []
        for release in releases:
            if release.get("draft"):
                continue
            for asset in release.get("assets") or []:
                if fnmatch.fnmatch(asset["name"], pattern):
                    version = release_version(asset["name"]) or str(release["tag_name"])
                    url = str(asset["browser_download_url"])
                    found.append(PublishedAsset(
                        version=version, tag=release["tag_name"], asset_id=int(asset["id"]), name=asset["name"],
                        size=int(asset["size"]), url=url, published_at=release.get("published_at"),
                        refused=_refusal(url, version, api_url, trusted)))
        return found
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MalformedFeed(f"malformed releases feed from {redact_url(api_url)}: {exc.__class__.__name__}: "
                            f"{for_terminal(redact_text(str(exc)))[:300]}") from None


class SeenReleases:
    """ETag and seen assets of one feed, as a small JSON object in the object store."""

    def __init__(self, store: ObjectStore, repo: str):
        self.store = store
        self.key = f"watch/{repo.replace('/', '__')}.json"
        raw = store.get_bytes(self.key)
        state = json.loads(raw) if raw else {}
        self.etag: str | None = state.get("etag")
        self.seen: dict[str, dict] = state.get("seen", {})

    def is_new(self, asset: PublishedAsset) -> bool:
        return asset.key not in self.seen

    def mark(self, asset: PublishedAsset) -> None:
        self.seen[asset.key] = {**asdict(asset), "seen_at": datetime.now(timezone.utc).isoformat()}

    def save(self, etag: str | None) -> None:
        self.etag = etag
        self.store.put_bytes(self.key, json.dumps({"etag": etag, "seen": self.seen}, indent=2).encode())
