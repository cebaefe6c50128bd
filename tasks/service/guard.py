"""Who may call the HTTP API, as whom, and how often. Plain logic, no web framework: ``docsrag.flows.api.app``
asks and answers.

Two modes:
- **tokens** (DOCSRAG_API_TOKENS and/or DOCSRAG_API_OPERATOR_TOKENS set): a bearer token is
  required. A caller token owns the questions it asks and sees only those; an operator token sees
  every question, the stats and the coverage gaps. A question's owner is a hash of its token
  (``owner_of``), never the token: the database holds nothing a caller could present.
- **loopback** (no token set): the machine's own user, who also runs the CLI. Only a loopback
  client is served, only under a loopback host name (or one in DOCSRAG_API_ALLOWED_HOSTS: a page
  on another site that rebinds its name to 127.0.0.1 still sends its own name as ``Host``), and no
  state-changing request whose ``Origin`` is another site. Every loopback caller is one caller, as
  the CLI is: the operator, owner ``""`` like the CLI's own questions.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from docsrag.tasks.core.errors import DocsragError
from docsrag.tasks.core.settings import Settings, split_setting

LOCAL_OWNER = ""  # the machine's own questions: the CLI's, and the API's in loopback mode
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_BUCKETS = 10_000  # rate-limit buckets kept; beyond this the least recently used go


def loopback(host: str | None) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address((host or "").strip("[]")).is_loopback
    except ValueError:
        return False


def owner_of(token: str) -> str:
    """A token's questions are stored under this: stable across restarts and the order tokens are
    listed in, and not the token (a database reader learns nothing to call the API with)."""
    return "t-" + hashlib.sha256(b"docsrag-api-owner\0" + token.encode()).hexdigest()[:24]


class Refused(DocsragError):
    """A call the API does not serve: ``status`` (401, 403, 429), ``reason``, and for 429 ``retry_after_s``."""

    def __init__(self, status: int, reason: str, retry_after_s: int | None = None):
        super().__init__(reason)
        self.status, self.reason, self.retry_after_s = status, reason, retry_after_s


@dataclass(frozen=True)
class Caller:
    """Who is calling: ``owner``, whose questions it asks and reads (a token's hash; ``""`` in
    loopback mode); ``operator``: it reads every question and the stats. The rate limit counts
    each owner once."""

    owner: str
    operator: bool = False

    @property
    def sees(self) -> str | None:
        """The owner whose questions this caller may read; None: every question."""
        return None if self.operator else self.owner


@dataclass(frozen=True)
class Request:
    """What the guard reads of an HTTP request (the edge fills it in; nothing is taken from
    X-Forwarded-* headers: the client address is the socket's)."""

    method: str
    authorization: str | None
    client_host: str | None
    host: str | None  # the Host header as sent
    origin: str | None  # the Origin header as sent


class Tokens:
    """DOCSRAG_API_TOKENS (callers) and DOCSRAG_API_OPERATOR_TOKENS (operators)."""

    def __init__(self, configured: str | None, operators: str | None = None):
        self.callers = [(t.encode(), Caller(owner_of(t))) for t in split_setting(configured)]
        self.operators = [(t.encode(), Caller(owner_of(t), operator=True)) for t in split_setting(operators)]

    @property
    def configured(self) -> bool:
        return bool(self.callers or self.operators)

    def caller(self, authorization: str | None) -> Caller:
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise Refused(401, "a bearer token is required: send 'Authorization: Bearer <token>'")
        presented, found = given.strip().encode(), None
        for token, caller in self.operators + self.callers:
            # Every token compared in constant time: the answer's timing tells nothing of a token.
            if hmac.compare_digest(token, presented) and found is None:
                found = caller
        if found is None:
            raise Refused(401, "the bearer token is not one this API accepts")
        return found


class Loopback:
    """Loopback mode's checks: the client address, the host name asked for, the page's origin."""

    def __init__(self, allowed_hosts: str = ""):
        self.allowed = {name.lower().strip("[]") for name in split_setting(allowed_hosts)}

    def caller(self, request: Request) -> Caller:
        if not loopback(request.client_host):
            raise Refused(401, "this API answers loopback clients only: its operator set no DOCSRAG_API_TOKENS")
        if not self._host_allowed(request.host):
            raise Refused(403, "without tokens this API answers loopback host names only (localhost, 127.0.0.1, "
                               "[::1]) and those in DOCSRAG_API_ALLOWED_HOSTS")
        if request.method.upper() not in SAFE_METHODS and not _same_site(request.origin, request.host):
            raise Refused(403, "a request that changes something was sent from another site's page (its Origin)")
        return Caller(LOCAL_OWNER, operator=True)

    def _host_allowed(self, host: str | None) -> bool:
        name = _host_name(host)
        return name is not None and (loopback(name) or name in self.allowed)


def _host_name(host: str | None) -> str | None:
    """The name in a Host header, less its port (``[::1]:8080`` -> ``::1``); None if malformed."""
    if not host:
        return None
    try:
        parsed = urlsplit(f"//{host}")
        parsed.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return None
    return parsed.hostname


def _same_site(origin: str | None, host: str | None) -> bool:
    """No Origin (curl, the CLI, a same-origin form in older browsers) or the very host the request
    was sent to. ``null`` (a sandboxed frame, a file) is another site."""
    if origin is None:
        return True
    parsed = urlsplit(origin)
    return bool(host) and parsed.scheme in ("http", "https") and parsed.netloc.lower() == host.lower()


class RateLimit:
    """A token bucket per caller: ``per_minute`` requests, refilled continuously, a burst of as many.
    At most ``max_buckets`` are kept (the least recently used go first: a bucket unused for a
    minute is full again, the same as a new one)."""

    def __init__(self, per_minute: int, max_buckets: int = MAX_BUCKETS, clock: Callable[[], float] = time.monotonic):
        self.capacity = float(per_minute)
        self.refill_per_s = per_minute / 60.0
        self.max_buckets, self.clock = max_buckets, clock
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # owner -> (tokens, when)
        self.lock = threading.Lock()

    def take(self, caller: Caller) -> None:
        """Spend one request of the caller's allowance, or raise Refused(429) saying when to come back."""
        moment = self.clock()
        with self.lock:
            tokens, then = self.buckets.pop(caller.owner, (self.capacity, moment))
            tokens = min(self.capacity, tokens + (moment - then) * self.refill_per_s)
            spent = tokens >= 1.0
            self.buckets[caller.owner] = (tokens - 1.0 if spent else tokens, moment)  # now the most recent
            while len(self.buckets) > self.max_buckets:
                self.buckets.popitem(last=False)
        if not spent:
            wait = math.ceil((1.0 - tokens) / self.refill_per_s)
            raise Refused(429, f"rate limit: {int(self.capacity)} requests per minute per caller", max(1, wait))


class Guard:
    def __init__(self, settings: Settings):
        def secret(value):
            return value.get_secret_value() if value else None

        self.tokens = Tokens(secret(settings.api_tokens), secret(settings.api_operator_tokens))
        self.loopback = Loopback(settings.api_allowed_hosts)
        self.rate = RateLimit(settings.api_rate_per_min)

    def admit(self, request: Request) -> Caller:
        caller = self.tokens.caller(request.authorization) if self.tokens.configured else self.loopback.caller(request)
        self.rate.take(caller)
        return caller
