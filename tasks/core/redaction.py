"""One redaction for every URL and error text that leaves the process.

Whatever docsrag writes outside itself (Prefect's database: asset keys, events, artifacts, state
messages, logs; notifications; the queue's ``last_error``) must not carry a credential. Operators
put them in URLs (``http://user:pass@milvus:19530``, ``postgresql://u:pw@db/q``, an LLM base URL
with a key in its query), and errors quote those URLs. Two rules, one module:

- a URL loses its ``user:password@``, its query string and its fragment (tokens and signatures
  travel there), whatever its scheme;
- free text has each URL in it redacted that way, and each secret value it is told about
  (``Secrets.of(settings)``: tokens, API keys, passwords inside configured URLs) replaced.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from docsrag.tasks.core.settings import Settings

HIDDEN = "***"
# scheme://... up to whitespace or a quote: what an error message or a log line quotes as a URL.
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]{1,15}://[^\s'\"<>`]+")
_SHORTEST_SECRET = 6  # shorter values ("root", "1") would blank out ordinary words


def redact_url(url: str) -> str:
    """``url`` without ``user:password@``, query and fragment; other URLs (and paths) unchanged."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a URL Python cannot parse is shown by its scheme alone
        return url.split("://", 1)[0] + "://" + HIDDEN if "://" in url else url
    if not parts.scheme or not (parts.username is not None or parts.password is not None or parts.query
                                or parts.fragment):
        return url
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = host + (f":{port}" if port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "redacted" if parts.query else "", ""))


@dataclass(frozen=True)
class Secrets:
    """Values that must never be shown, known from the settings the edge built."""

    values: tuple[str, ...] = ()

    @classmethod
    def of(cls, settings: Settings) -> Secrets:
        found: list[str] = []
        for secret in (settings.milvus_token, settings.llm_api_key, settings.embedding_api_key,
                       settings.github_token, settings.notify_webhook_url):
            if secret is not None:
                value = secret.get_secret_value()
                found += [value, value.partition(":")[2]]  # a Milvus token is user:password
        for url in (settings.milvus_uri, settings.llm_base_url, settings.embedding_base_url or "",
                    settings.queue_url, settings.release_url, settings.releases_api, settings.s3_endpoint_url or ""):
            found += _url_secrets(url)
        return cls(tuple(sorted({v for v in found if len(v) >= _SHORTEST_SECRET}, key=len, reverse=True)))


def redact_text(text: str, secrets: Secrets | Iterable[str] = ()) -> str:
    """``text`` (an error, a reason, a log line) with every URL redacted and every secret hidden."""
    values = secrets.values if isinstance(secrets, Secrets) else tuple(secrets)
    text = _URL.sub(_redacted_match, str(text))
    for value in values:  # longest first: a token is hidden whole, not around a shorter one inside it
        text = text.replace(value, HIDDEN)
    return text


def _redacted_match(match: re.Match) -> str:
    # A sentence's punctuation after a URL ("at http://h:19530: refused") is not part of it.
    url = match.group()
    core = url.rstrip(".,;:!?)]")
    return redact_url(core) + url[len(core):]


def _url_secrets(url: str) -> list[str]:
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    return [v for v in (parts.password, parts.query, parts.fragment) if v]
