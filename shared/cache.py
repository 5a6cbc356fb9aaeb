"""The exact cache of provider calls (SPEC §14), shared by every worker through Redis.

A call is identified by (tenant, model, messages, parameters): the SHA-256 of their canonical
JSON (sorted keys, no whitespace). A batch with ``cache: "exact"`` asks the cache before each
call; an answer stored within ``CONCLAVE_CACHE_TTL_S`` answers instead of the provider. Stage 1
answers are the point, and reviews and syntheses come along with the same key: their messages
hold every answer they judge, so only a call whose inputs are all identical can hit. (A review
also shuffles the answers by query id, so in practice it hits only for a query run again.)

Layout (named in ``shared/keys.py``): ``{ns}:cache:{tenant}:{g}.{m}:{digest}``, where ``g`` and
``m`` are the tenant's and the model's invalidation generations, kept in one hash per tenant.
``DELETE /v1/cache`` bumps a generation (one ``HINCRBY``), so every older entry is unreachable at
once and ages out with its TTL: no scan. The tenant is in the key and in the digest, so no entry
ever answers another tenant.

In-flight de-duplication: a miss takes ``{entry}:lock`` (``SET NX PX``, the lookup and the claim
in one script run). Whoever holds it calls the provider and stores the answer; identical calls
meanwhile poll for the entry (50 ms, doubling to 400 ms). A holder whose call failed lets go of
the lock, and one that died lets it expire (``CONCLAVE_CACHE_LOCK_TTL_S``): the waiters then
claim it themselves, so nobody waits longer than about two lock lifetimes. A Redis error makes
the cache step aside: the call goes to the provider as if there were no cache.

The scripts build the entry key from the generations they read, so the cache needs one Redis
(not a cluster), as the rest of Conclave's shared state does.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import redis
import redis.asyncio as aioredis

from shared import keys

log = logging.getLogger("conclave.cache")

CacheMode = Literal["off", "exact", "semantic"]
ALL_MODELS = "*"  # the generation field that covers the whole tenant
POLL_MIN_S = 0.05
POLL_MAX_S = 0.4

# KEYS[1] generations hash. ARGV: entry prefix, model, digest, lock token ("" = do not claim),
# lock TTL (ms), lock suffix. Returns {entry key, entry or "", 1 if the lock was taken}.
_LOOKUP = """
local g = redis.call('HMGET', KEYS[1], ARGV[7], ARGV[2])
local key = ARGV[1] .. ':' .. (g[1] or '0') .. '.' .. (g[2] or '0') .. ':' .. ARGV[3]
local v = redis.call('GET', key)
if v then return {key, v, 0} end
if ARGV[4] ~= '' and redis.call('SET', key .. ARGV[6], ARGV[4], 'NX', 'PX', ARGV[5]) then
  return {key, '', 1}
end
return {key, '', 0}
"""
# KEYS[1] entry, KEYS[2] its lock. ARGV: entry (or "" to store nothing), TTL (s), lock token.
_SETTLE = """
if ARGV[1] ~= '' then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) end
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return 1
"""


@dataclass(frozen=True)
class Entry:
    """A cached answer and what it cost to get: the saving of each hit, at the model's price."""

    text: str
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Claim:
    """A miss: this caller calls the provider, then ``store``s or ``release``s. ``token`` is None
    when the caller calls without the lock (its wait ran out, or Redis failed)."""

    key: str
    token: str | None


def digest(
    tenant_id: str,
    model: str,
    messages: Sequence[dict[str, str]],
    max_tokens: int | None,
    temperature: float | None,
) -> str:
    """The call's identity: SHA-256 of canonical JSON over everything that shapes the answer."""
    body = {
        "tenant": tenant_id,
        "model": model,
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "max_tokens": max_tokens,
        "temperature": temperature,
    }
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


class ExactCache:
    def __init__(
        self,
        client: aioredis.Redis,
        namespace: str,
        *,
        ttl_s: int,
        lock_ttl_s: float,
    ):
        self._client = client
        self._ns = namespace
        self.ttl_s = ttl_s
        self.lock_ttl_s = lock_ttl_s
        self._lookup = client.register_script(_LOOKUP)
        self._settle = client.register_script(_SETTLE)

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    @property
    def namespace(self) -> str:
        return self._ns

    async def peek(
        self,
        tenant_id: str,
        model: str,
        messages: Sequence[dict[str, str]],
        max_tokens: int | None,
        temperature: float | None,
    ) -> Entry | None:
        """The cached answer of this exact call if there is one; claims nothing, waits for
        nothing (the semantic cache asks for the answers of questions it matched)."""
        key_digest = digest(tenant_id, model, messages, max_tokens, temperature)
        try:
            _key, value, _held = await self._lookup(
                keys=[keys.cache_generations(self._ns, tenant_id)],
                args=[keys.cache_prefix(self._ns, tenant_id), model, key_digest, "", 0, "", ALL_MODELS],
            )
        except redis.RedisError:
            return None
        return _entry(value) if value else None

    async def acquire(
        self,
        tenant_id: str,
        model: str,
        messages: Sequence[dict[str, str]],
        max_tokens: int | None,
        temperature: float | None,
    ) -> Entry | Claim | None:
        """A cached ``Entry`` (from the store, or from an identical call that was in flight), or
        a ``Claim`` to call the provider under; None when Redis failed (call, store nothing)."""
        key_digest = digest(tenant_id, model, messages, max_tokens, temperature)
        token = secrets.token_hex(8)
        deadline = time.monotonic() + 2 * self.lock_ttl_s
        lock_suffix = keys.cache_lock("")
        try:
            while True:
                key, value, held = await self._lookup(
                    keys=[keys.cache_generations(self._ns, tenant_id)],
                    args=[
                        keys.cache_prefix(self._ns, tenant_id),
                        model,
                        key_digest,
                        token,
                        int(self.lock_ttl_s * 1000),
                        lock_suffix,
                        ALL_MODELS,
                    ],
                )
                key = _text(key)
                if value:
                    return _entry(value)
                if held:
                    return Claim(key, token)
                # An identical call is in flight: wait for its answer, or for its lock to go.
                found = await self._wait(key, keys.cache_lock(key), deadline)
                if isinstance(found, Entry):
                    return found
                if found == "timeout":
                    return Claim(key, None)
        except redis.RedisError as exc:
            log.warning("the cache is unavailable (%s); calling the provider", type(exc).__name__)
            return None

    async def _wait(self, key: str, lock: str, deadline: float) -> Entry | Literal["gone", "timeout"]:
        delay = POLL_MIN_S
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_MAX_S)
            value, holder = await self._client.mget([key, lock])
            if value:
                return _entry(value)
            if holder is None:
                return "gone"  # answered nothing (failed) or died: try to claim it
        return "timeout"

    async def store(self, claim: Claim, entry: Entry) -> None:
        """Keep ``entry`` for the TTL and let go of the lock (waiters find the entry)."""
        payload = orjson.dumps([entry.text, entry.input_tokens, entry.output_tokens])
        await self._finish(claim, payload.decode())

    async def release(self, claim: Claim) -> None:
        """The call failed: let go of the lock so a waiter calls in its place."""
        await self._finish(claim, "")

    async def _finish(self, claim: Claim, payload: str) -> None:
        try:
            await self._settle(
                keys=[claim.key, keys.cache_lock(claim.key)],
                args=[payload, self.ttl_s, claim.token or ""],
            )
        except redis.RedisError as exc:
            log.warning("storing a cache entry failed (%s)", type(exc).__name__)


def invalidate(client: redis.Redis, namespace: str, tenant_id: str, model: str | None = None) -> int:
    """Forget a tenant's cached answers (of one model, or all): bumps the generation the keys are
    built from. Returns the new generation."""
    return int(client.hincrby(keys.cache_generations(namespace, tenant_id), model or ALL_MODELS, 1))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry(value: Any) -> Entry:
    text, input_tokens, output_tokens = orjson.loads(value)
    return Entry(text, int(input_tokens), int(output_tokens))
