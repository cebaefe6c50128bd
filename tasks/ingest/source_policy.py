"""Which release a run started by a deployment may fetch.

A deployment's run takes its ``release`` from whoever can reach the orchestration: an event (any
``docsrag.release.*`` event starts one), a schedule, a person with API access. The operator's own
``docsrag`` command reads any path or URL; a deployment's run fetches only what the operator's
settings allow:

- https from the releases feed's site (``api.github.com`` -> ``github.com``; the API's own origin as
  configured), or http(s) from a host or origin in ``DOCSRAG_RELEASE_HOSTS``;
- on GitHub (``github.com``, ``api.github.com``), only what belongs to ``DOCSRAG_RELEASE_REPO``: its
  release downloads (``github.com/{owner}/{repo}/releases/download/{tag}/{asset}``) and its API paths
  (``api.github.com/repos/{owner}/{repo}/...``), owner and repo compared without case as GitHub
  does. Any repository's release is on the same host, and an event naming one of its own
  (``.../someone-else/x/releases/download/v999/...``) would otherwise label it 999.0 and keep every
  later release off the main alias. Naming ``github.com`` in ``DOCSRAG_RELEASE_HOSTS`` does not
  open other repositories. This is read from the URL alone, before any lookup;
- ``s3://`` from a bucket (or bucket/prefix) in ``DOCSRAG_RELEASE_BUCKETS``, never just any
  bucket the worker's credentials reach;
- a path or ``file://`` inside a folder of ``DOCSRAG_RELEASE_FOLDERS``, never anything else on
  the worker (``/etc/passwd``, another home's state);
- never an address that is loopback, link-local, private or otherwise not global, as the host
  *resolves* (a public name pointed at 127.0.0.1 is refused too), unless the operator named that
  host or origin in ``DOCSRAG_RELEASE_HOSTS``: internal services are not a release server.

A refused release fails the run with its reason before a byte is fetched. Each redirect the
download is given is checked before it is followed (``check_redirect``): by the same rules, except
that a GitHub URL (which the rules above limited to the configured repository) may send the run
to GitHub's asset hosts (``objects.githubusercontent.com``, ``release-assets.githubusercontent.com``),
over https and to public addresses, where a release download's bytes are served from a signed URL.
Those hosts are never a release's own URL, nor a redirect from anywhere else: what they serve is
chosen by GitHub for the repository the URL named. A name that resolves to another address between
the check and the connection (DNS rebinding) is outside what the checks see.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse, urlsplit

from docsrag.tasks.core.redaction import redact_url
from docsrag.tasks.core.settings import Settings
from docsrag.tasks.ingest.release import RedirectCheck, ReleaseError, release_version

Resolver = Callable[[str, int], list[str]]

GITHUB_HOSTS = frozenset({"github.com", "api.github.com"})
# Where GitHub redirects a release download (a signed URL, valid for minutes): reached only as a
# redirect from a GitHub URL of the configured repository, never named by a release or an event.
GITHUB_ASSET_HOSTS = frozenset({"objects.githubusercontent.com", "release-assets.githubusercontent.com"})


class RefusedSource(ReleaseError):
    """The release is not one this run may fetch; the message says which setting allows it."""


@dataclass(frozen=True)
class SourcePolicy:
    site_hosts: frozenset[str]  # the feed's own site: over https (or the API's own origin), public addresses only
    api_origin: str  # scheme://host:port of the releases API
    named_hosts: frozenset[str]  # DOCSRAG_RELEASE_HOSTS entries that are bare hosts
    named_origins: frozenset[str]  # DOCSRAG_RELEASE_HOSTS entries that are scheme://host[:port]
    buckets: tuple[tuple[str, str], ...]  # (bucket, key prefix)
    folders: tuple[Path, ...]  # resolved
    repo: str  # DOCSRAG_RELEASE_REPO, owner/name in lower case: the only one fetched from GitHub


def policy_for(settings: Settings) -> SourcePolicy:
    api = urlparse(settings.releases_api)
    api_host = _host(api.hostname or "")
    site = {api_host, api_host.removeprefix("api.")} - {""}
    entries = settings.trusted_release_hosts
    origins = frozenset(_origin(e) for e in entries if "://" in e)
    hosts = frozenset(_host(e) for e in entries if "://" not in e)
    return SourcePolicy(frozenset(site), _origin(settings.releases_api), hosts, origins,
                        _buckets(settings.release_buckets),
                        tuple(Path(f).expanduser().resolve() for f in _items(settings.release_folders)),
                        settings.release_repo.strip().strip("/").lower())


def check_source(url: str, policy: SourcePolicy, resolve: Resolver | None = None) -> None:
    """Raise RefusedSource unless ``policy`` allows fetching ``url``."""
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        try:
            parsed.port  # noqa: B018 - raises on a port that is not one
        except ValueError:
            raise RefusedSource(f"refusing release {redact_url(url)[:200]!r}: not a valid URL") from None
        _check_http(url, parsed, policy, resolve or _resolve)
    elif scheme == "s3":
        _check_s3(url, parsed, policy)
    elif scheme == "file" or not scheme or _is_windows_drive(url):
        _check_local(url, Path(unquote(parsed.path)) if scheme == "file" else Path(url).expanduser(), policy)
    else:
        raise RefusedSource(f"refusing release {redact_url(url)[:200]!r}: scheme {scheme!r} is not http(s), s3 or "
                            "an allowed folder")


def check_redirect(url: str, came_from: str, policy: SourcePolicy, resolve: Resolver | None = None) -> None:
    """Raise RefusedSource unless a download of ``came_from`` (itself allowed) may follow its redirect
    to ``url``: the policy's rules, or GitHub's asset hosts over https when GitHub sent it there."""
    target, source = urlparse(url), urlparse(came_from)
    host = _host(target.hostname or "")
    if host in GITHUB_ASSET_HOSTS and _host(source.hostname or "") in GITHUB_HOSTS:
        shown = redact_url(url)[:200]
        if target.scheme.lower() != "https":
            raise RefusedSource(f"refusing the redirect of {redact_url(came_from)[:200]!r} to {shown!r}: GitHub's "
                                "asset hosts are fetched over https only")
        try:
            port = target.port or 443
        except ValueError:
            raise RefusedSource(f"refusing the redirect to {shown!r}: not a valid URL") from None
        _check_public(shown, host, port, resolve or _resolve)
        return
    try:
        check_source(url, policy, resolve)
    except RefusedSource as exc:
        raise RefusedSource(f"{redact_url(came_from)[:200]!r} redirected the download: {exc}") from None


def check_version(url: str, version: str | None) -> None:
    """A version given beside a URL whose asset name names another one is refused: an event must
    not label the 2.4.x release 999.0 and keep every later release off the main alias."""
    named = release_version(url)
    if version and named and version != named:
        raise RefusedSource(f"refusing version {version[:64]!r} for release {redact_url(url)[:200]!r}, whose "
                            f"asset name says {named!r}")


def check_run_source(settings: Settings, version: str | None = None) -> RedirectCheck | None:
    """The ingest flow's guard: in a run a deployment started (an event, a schedule, the API), the
    release must be one the operator allows, and so must each redirect its download is given (the
    check returned, for ``fetch_release``). The operator's own command is not limited (None)."""
    from prefect.runtime import deployment

    if deployment.id is None:
        return None
    policy = policy_for(settings)
    check_source(settings.release_url, policy)
    check_version(settings.release_url, version)
    return partial(check_redirect, policy=policy)


# ---------------------------------------------------------------- one scheme each

def _check_http(url: str, parsed, policy: SourcePolicy, resolve: Resolver) -> None:
    shown = redact_url(url)[:200]
    host = _host(parsed.hostname or "")
    if not host:
        raise RefusedSource(f"refusing release {shown!r}: no host")
    if host in GITHUB_HOSTS and not is_repo_url(host, url, policy.repo):
        raise RefusedSource(f"refusing release {shown!r}: on {host} only the releases of {policy.repo!r} "
                            f"(DOCSRAG_RELEASE_REPO) are fetched, as {_REPO_PATHS[host].format(policy.repo)}")
    named = host in policy.named_hosts or _origin(url) in policy.named_origins
    if not named and host not in policy.site_hosts:
        raise RefusedSource(f"refusing release {shown!r}: host {host!r} is neither the releases feed's site nor "
                            "in DOCSRAG_RELEASE_HOSTS")
    if named:
        return  # the operator named this host or origin: internal addresses included
    if parsed.scheme.lower() != "https" and _origin(url) != policy.api_origin:
        raise RefusedSource(f"refusing release {shown!r}: the feed's site is fetched over https only")
    _check_public(shown, host, parsed.port or (443 if parsed.scheme.lower() == "https" else 80), resolve)


def _check_public(shown: str, host: str, port: int, resolve: Resolver) -> None:
    try:
        addresses = resolve(host, port)
    except OSError as exc:
        raise RefusedSource(f"refusing release {shown!r}: host {host!r} does not resolve ({exc.strerror or exc})") \
            from None
    internal = sorted({a for a in addresses if not _is_global(a)})
    if internal or not addresses:
        raise RefusedSource(f"refusing release {shown!r}: host {host!r} resolves to a non-public address "
                            f"({', '.join(internal) or 'none'}); name it in DOCSRAG_RELEASE_HOSTS if it is trusted")


# What of GitHub belongs to a repository, as a path's first segments (the rest is the tag and asset,
# or the API's own path): a release download, or the REST API's paths of that repository.
_REPO_PATHS = {"github.com": "/{}/releases/download/<tag>/<asset>", "api.github.com": "/repos/{}/..."}


def is_repo_url(host: str, url: str, repo: str) -> bool:
    """Whether ``url`` on GitHub's ``host`` is the repository's own. Each segment is read decoded and
    '.', '..' or an encoded '/' are refused: a client or GitHub resolving them would land elsewhere."""
    raw = urlsplit(url).path.split("/")[1:]
    segments = [unquote(segment) for segment in raw]
    if any(not s or s in (".", "..") or "/" in s for s in segments):
        return False
    if host == "api.github.com":
        return len(segments) >= 3 and segments[0] == "repos" and "/".join(segments[1:3]).lower() == repo
    return (len(segments) >= 6 and "/".join(segments[:2]).lower() == repo
            and segments[2:4] == ["releases", "download"])


def _check_s3(url: str, parsed, policy: SourcePolicy) -> None:
    bucket, key = parsed.netloc, unquote(parsed.path).lstrip("/")
    parts = PurePosixPath(key).parts
    allowed = ".." not in parts and any(
        bucket == b and (not prefix or key.startswith(prefix + "/")) for b, prefix in policy.buckets)
    if not allowed:
        raise RefusedSource(f"refusing release {redact_url(url)[:200]!r}: bucket {bucket!r} (or that prefix) is not "
                            "in DOCSRAG_RELEASE_BUCKETS")


def _check_local(url: str, path: Path, policy: SourcePolicy) -> None:
    real = path.resolve()  # links and '..' resolved: the folder check sees where the bytes are
    if not any(real.is_relative_to(folder) for folder in policy.folders):
        raise RefusedSource(f"refusing release {url[:200]!r}: a local file outside DOCSRAG_RELEASE_FOLDERS")


# ---------------------------------------------------------------- helpers

def _resolve(host: str, port: int) -> list[str]:
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def _is_global(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # a scope id (fe80::1%eth0) is not part of it
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _host(host: str) -> str:
    return host.strip().lower().rstrip(".").strip("[]")


def _origin(url: str) -> str:
    parsed = urlparse(url.strip())
    scheme = parsed.scheme.lower()
    port = parsed.port or (443 if scheme == "https" else 80)
    return f"{scheme}://{_host(parsed.hostname or '')}:{port}"


def _items(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _buckets(value: str) -> tuple[tuple[str, str], ...]:
    found = []
    for item in _items(value):
        bucket, _, prefix = item.removeprefix("s3://").partition("/")
        found.append((bucket, prefix.strip("/")))
    return tuple(found)


def _is_windows_drive(url: str) -> bool:
    return len(url) > 2 and url[1] == ":" and url[0].isalpha()
