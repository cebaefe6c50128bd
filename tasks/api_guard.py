"""Who may call the HTTP API and how often: bearer tokens, loopback-only without them, and a
token bucket per caller. Plain logic, no web framework: ``flows.api`` asks and answers."""

from __future__ import annotations

import hmac
import ipaddress
import math
import threading
import time
from dataclasses import dataclass

from tasks.settings import Settings


def loopback(host: str | None) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address((host or "").strip("[]")).is_loopback
    except ValueError:
        return False


class Refused(Exception):
    """A call the API does not serve: ``status`` (401, 429), ``reason``, and for 429 ``retry_after_s``."""

    def __init__(self, status: int, reason: str, retry_after_s: int | None = None):
        super().__init__(reason)
        self.status, self.reason, self.retry_after_s = status, reason, retry_after_s


@dataclass(frozen=True)
class Caller:
    """Who is calling, as the rate limit counts them: a token's position, or the client address."""

    name: str


class Tokens:
    """DOCSRAG_API_TOKENS: comma-separated bearer tokens; none configured admits loopback clients only."""

    def __init__(self, configured: str | None):
        self.tokens = [t.strip() for t in (configured or "").split(",") if t.strip()]

    def caller(self, authorization: str | None, client_host: str | None) -> Caller:
        if not self.tokens:
            if loopback(client_host):
                return Caller(f"address {client_host}")
            raise Refused(401, "this API answers loopback clients only: its operator set no DOCSRAG_API_TOKENS")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise Refused(401, "a bearer token is required: send 'Authorization: Bearer <token>'")
        for n, token in enumerate(self.tokens, 1):
            # Every token compared in constant time: the answer's timing tells nothing of a token.
            if hmac.compare_digest(token.encode(), given.strip().encode()):
                return Caller(f"token {n}")
        raise Refused(401, "the bearer token is not one this API accepts")


class RateLimit:
    """A token bucket per caller: ``per_minute`` requests, refilled continuously, a burst of as many."""

    def __init__(self, per_minute: int):
        self.capacity = float(per_minute)
        self.refill_per_s = per_minute / 60.0
        self.buckets: dict[Caller, tuple[float, float]] = {}  # caller -> (tokens, when)
        self.lock = threading.Lock()

    def take(self, caller: Caller) -> None:
        """Spend one request of the caller's allowance, or raise Refused(429) saying when to come back."""
        moment = time.monotonic()
        with self.lock:
            tokens, then = self.buckets.get(caller, (self.capacity, moment))
            tokens = min(self.capacity, tokens + (moment - then) * self.refill_per_s)
            if tokens < 1.0:
                self.buckets[caller] = (tokens, moment)
                wait = math.ceil((1.0 - tokens) / self.refill_per_s)
                raise Refused(429, f"rate limit: {int(self.capacity)} requests per minute per caller", max(1, wait))
            self.buckets[caller] = (tokens - 1.0, moment)


class Guard:
    def __init__(self, settings: Settings):
        secret = settings.api_tokens.get_secret_value() if settings.api_tokens else None
        self.tokens = Tokens(secret)
        self.rate = RateLimit(settings.api_rate_per_min)

    def admit(self, authorization: str | None, client_host: str | None) -> Caller:
        caller = self.tokens.caller(authorization, client_host)
        self.rate.take(caller)
        return caller
