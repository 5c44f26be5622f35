"""Per-API-key rate limit: a token bucket per key (or per client address when no key is sent), answered with 429
and `Retry-After` before any route runs. Buckets live in the API process: with N API processes a key gets up to
N times the limit, which bounds abuse without a shared store; MCS_RATE_LIMIT_PER_MINUTE=0 turns it off."""

import hashlib
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import error_response
from core.errors import RateLimited

MAX_TRACKED = 100_000  # least recently seen buckets are dropped beyond this: memory stays bounded
EXEMPT = ("/healthz", "/readyz")


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimit:
    def __init__(self, app: ASGIApp, per_minute: int, burst: int) -> None:
        self.app = app
        self.rate, self.burst = per_minute / 60, burst
        self.buckets: OrderedDict[str, _Bucket] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.rate == 0 or scope["path"] in EXEMPT:
            await self.app(scope, receive, send)
            return
        wait_s = self._take(_client_key(scope))
        if wait_s > 0:
            retry_after = str(math.ceil(wait_s))
            message = f"too many requests for this API key; retry in {retry_after} s"
            response = error_response(429, RateLimited.code, message, {"retry_after_s": int(retry_after)},
                                      headers={"Retry-After": retry_after})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _take(self, key: str) -> float:
        """Spend one token; return 0, or the seconds until a token is available."""
        now = time.monotonic()
        bucket = self.buckets.pop(key, None) or _Bucket(float(self.burst), now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        self.buckets[key] = bucket
        if len(self.buckets) > MAX_TRACKED:
            self.buckets.popitem(last=False)
        if bucket.tokens < 1:
            return (1 - bucket.tokens) / self.rate
        bucket.tokens -= 1
        return 0.0


def _client_key(scope: Scope) -> str:
    authorization = dict(scope["headers"]).get(b"authorization")
    if authorization:
        return "key:" + hashlib.sha256(authorization).hexdigest()  # never keep the key itself in memory
    client = scope.get("client")
    return f"addr:{client[0] if client else 'unknown'}"
