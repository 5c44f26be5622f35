"""Admission, before any body is read: the API key of a /v1 request is checked, then its scope
(`api.deps.required_scope`, after the key's bucket is spent), then a token bucket per valid key
(per client address for everything else: a missing, unknown or revoked key, /docs) is spent, answered with 429 and
`Retry-After` when empty; MCS_RATE_LIMIT_PER_MINUTE=0 turns the limit off.

With Redis as the broker, the buckets live in Redis and every API process shares them (one atomic Lua script per
request). The embedded default has no Redis: its buckets live in the API process, which is then the only one."""

import asyncio
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from weakref import WeakKeyDictionary

import redis
import redis.asyncio
from redis.commands.core import AsyncScript
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from api.deps import authenticate, bearer_key, required_scope
from api.errors import service_response
from core.errors import InvalidRequest, RateLimited, ServiceError, Unauthorized
from core.service.db.repositories import hash_key
from core.service.keys import require_scope
from core.service.settings import Settings

log = logging.getLogger(__name__)
MAX_TRACKED = 100_000  # least recently seen local buckets are dropped beyond this: memory stays bounded
EXEMPT = ("/healthz", "/readyz")
REDIS_PREFIX = "mcs:ratelimit:"
# Refill by the time elapsed on Redis's own clock (API hosts' clocks need not agree), spend one token or return the
# seconds until one is due. The bucket expires once it would be full again, so idle keys cost no memory.
BUCKET_SCRIPT = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens = math.min(burst, (tonumber(state[1]) or burst) + (now - (tonumber(state[2]) or now)) * rate)
local wait = 0
if tokens < 1 then wait = (1 - tokens) / rate else tokens = tokens - 1 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'updated', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return tostring(wait)
"""


@dataclass
class _Bucket:
    tokens: float
    updated: float


class LocalBuckets:
    """Token buckets in this process's memory."""

    def __init__(self, per_minute: int, burst: int) -> None:
        self.rate, self.burst = per_minute / 60, burst
        self.buckets: OrderedDict[str, _Bucket] = OrderedDict()

    async def take(self, key: str) -> float:
        return self.take_now(key)

    def take_now(self, key: str) -> float:
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


class RedisBuckets:
    """Token buckets in Redis, shared by every API process. If Redis is unreachable the limit falls back to this
    process's own buckets: requests are still limited, and not refused because a limiter is down."""

    def __init__(self, url: str, per_minute: int, burst: int) -> None:
        self.url = url
        self.rate, self.burst = per_minute / 60, burst
        self.fallback = LocalBuckets(per_minute, burst)
        self.redis_up = True
        # an asyncio client per event loop (its connections belong to the loop that opened them): no thread hop,
        # which under CPU contention costs more than the round trip itself
        self.scripts: WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncScript] = WeakKeyDictionary()

    async def take(self, key: str) -> float:
        """Spend one token; return 0, or the seconds until a token is available."""
        try:
            wait_s = float(await self._script()(keys=[REDIS_PREFIX + key], args=[self.rate, self.burst]))
        except (redis.RedisError, OSError) as exc:
            if self.redis_up:  # log the change, not every request
                log.warning("rate limit: Redis unreachable (%s); limiting per process until it is back", exc)
            self.redis_up = False
            return self.fallback.take_now(key)
        self.redis_up = True
        return wait_s

    def _script(self) -> AsyncScript:
        loop = asyncio.get_running_loop()
        script = self.scripts.get(loop)
        if script is None:
            client = redis.asyncio.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
            script = self.scripts[loop] = client.register_script(BUCKET_SCRIPT)
        return script


def rate_limit_buckets(settings: Settings) -> LocalBuckets | RedisBuckets | None:
    """Shared buckets when the broker is Redis, this process's otherwise; None when the limit is off."""
    if settings.rate_limit_per_minute == 0:
        return None
    if settings.broker_url.startswith(("redis://", "rediss://")):
        return RedisBuckets(settings.broker_url, settings.rate_limit_per_minute, settings.rate_limit_burst)
    return LocalBuckets(settings.rate_limit_per_minute, settings.rate_limit_burst)


class Admission:
    """FastAPI reads and parses a body before it solves a route's dependencies, so the key is checked here, before
    the app receives anything: a request refused here costs no body. Routes get the tenant through `TenantDep`."""

    def __init__(self, app: ASGIApp, buckets: LocalBuckets | RedisBuckets | None) -> None:
        self.app = app
        self.buckets = buckets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self._admit(scope)
        except ServiceError as exc:
            await _refusal(scope, exc)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _admit(self, scope: Scope) -> None:
        if not scope["path"].startswith("/v1/"):
            await self._spend(scope, _address_bucket(scope))
            return
        try:
            principal = await authenticate(scope)
        except (InvalidRequest, Unauthorized):
            await self._spend(scope, _address_bucket(scope))  # random keys buy no fresh buckets
            raise
        scope.setdefault("state", {}).update(tenant=principal.tenant, principal=principal)
        await self._spend(scope, "key:" + hash_key(bearer_key(scope)))
        require_scope(principal, required_scope(scope))  # after the spend: refused requests are limited too

    async def _spend(self, scope: Scope, bucket: str) -> None:
        if self.buckets is None or scope["path"] in EXEMPT:
            return
        wait_s = await self.buckets.take(bucket)
        if wait_s > 0:
            retry_after = math.ceil(wait_s)
            raise RateLimited(f"too many requests for this API key or client address; retry in {retry_after} s",
                              {"retry_after_s": retry_after})


def _address_bucket(scope: Scope) -> str:
    client = scope.get("client")
    return f"addr:{client[0] if client else 'unknown'}"


def _refusal(scope: Scope, exc: ServiceError) -> Response:
    """A request refused before its body was read closes the connection: the server then reads no more of it."""
    response = service_response(exc)
    headers = dict(scope["headers"])
    if headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers:
        response.headers["Connection"] = "close"
    return response
