"""Distributed rate limiter per provider (``rpm``, ``tpm``), shared by all workers through Redis.

GCRA (the generic cell rate algorithm, as in redis-cell): one timestamp per limit, O(1) state,
one Lua call per provider call. A limit of L per minute gets a burst allowance of B = L/20
(at least 1) and a sustained rate of (L - B - 1) per minute, so **no 60-second window ever holds
more than L**: at most B at once, then one every 60/(L - B - 1) seconds.

Calls wait for capacity instead of failing (up to ``max_wait_s``). Tokens are charged on an
estimate before the call and corrected by the real usage afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared import keys

# KEYS: one per limit. ARGV: now_ms, then per key: emission_ms (per unit), capacity_ms
# (burst × emission), cost. Either every limit admits the call (and all are charged) or none
# is charged and the reply is the wait in ms until all would admit it.
_ACQUIRE = """
local now = tonumber(ARGV[1])
local wait = 0
local tats = {}
for i, key in ipairs(KEYS) do
  local emission = tonumber(ARGV[2 + (i - 1) * 3])
  local capacity = tonumber(ARGV[3 + (i - 1) * 3])
  local cost = tonumber(ARGV[4 + (i - 1) * 3])
  local tat = tonumber(redis.call('get', key) or now)
  if tat < now then tat = now end
  local new_tat = tat + cost * emission
  -- Sub-millisecond excess is float rounding of emission x burst, not a real overrun.
  local over = new_tat - now - capacity
  if over > 0.01 and over > wait then wait = over end
  tats[i] = new_tat
end
if wait > 0 then return math.ceil(wait) end
for i, key in ipairs(KEYS) do
  redis.call('set', key, tostring(tats[i]), 'PX', math.ceil(tats[i] - now) + 60000)
end
return 0
"""

# KEYS[1] = tpm key. ARGV: emission_ms, delta tokens (may be negative), now_ms.
_ADJUST = """
local tat = tonumber(redis.call('get', KEYS[1]))
if not tat then return 0 end
local new_tat = tat + tonumber(ARGV[2]) * tonumber(ARGV[1])
local now = tonumber(ARGV[3])
if new_tat < now then new_tat = now end
redis.call('set', KEYS[1], tostring(new_tat), 'PX', math.ceil(new_tat - now) + 60000)
return 1
"""


@dataclass(frozen=True)
class Limit:
    per_minute: int

    @property
    def burst(self) -> int:
        return max(1, self.per_minute // 20)

    @property
    def emission_ms(self) -> float:
        # The burst is carved out of the minute's allowance, never added on top of it; so is one
        # more call: a provider counting a closed 60 s window (a call at t and one at t + 60 s)
        # by arrival time, with arrivals jittered by up to one interval, still sees at most L.
        # (CI saw 601 of 600 without it.)
        return 60_000 / max(1, self.per_minute - self.burst - 1)

    @property
    def capacity_ms(self) -> float:
        return self.burst * self.emission_ms


class RateLimitTimeout(Exception):
    """Capacity did not free up within ``max_wait_s``."""


class RateLimiter:
    """The rpm and tpm limits of one provider."""

    def __init__(
        self,
        client: aioredis.Redis,
        key: str,
        *,
        rpm: int | None,
        tpm: int | None,
        max_wait_s: float = 300.0,
    ):
        self.client = client
        self.rpm = Limit(rpm) if rpm else None
        self.tpm = Limit(tpm) if tpm else None
        self.rpm_key = keys.ratelimit_rpm(key)
        self.tpm_key = keys.ratelimit_tpm(key)
        self.max_wait_s = max_wait_s
        self._acquire = client.register_script(_ACQUIRE)
        self._adjust = client.register_script(_ADJUST)

    @property
    def active(self) -> bool:
        return self.rpm is not None or self.tpm is not None

    async def acquire(self, tokens: int) -> float:
        """Wait until the call fits; returns the seconds waited."""
        keys: list[str] = []
        args: list[float] = []
        if self.rpm:
            keys.append(self.rpm_key)
            args += [self.rpm.emission_ms, self.rpm.capacity_ms, 1]
        if self.tpm:
            keys.append(self.tpm_key)
            # A call larger than the burst could never fit; it goes alone once the bucket is empty.
            args += [self.tpm.emission_ms, self.tpm.capacity_ms, min(tokens, self.tpm.burst)]
        if not keys:
            return 0.0
        started = time.monotonic()
        while True:
            try:
                wait_ms = await self._acquire(keys=keys, args=[int(time.time() * 1000), *args])
            except RedisError:
                return time.monotonic() - started  # without Redis, no shared limit: let the provider say no
            if not wait_ms:
                return time.monotonic() - started
            waited = time.monotonic() - started
            if waited + wait_ms / 1000 > self.max_wait_s:
                raise RateLimitTimeout(f"no capacity within {self.max_wait_s:g}s")
            await asyncio.sleep(wait_ms / 1000)

    async def settle(self, estimated: int, actual: int) -> None:
        """Charge (or refund) the difference between the estimate and the real usage."""
        if not self.tpm or actual == estimated:
            return
        delta = actual - min(estimated, self.tpm.burst)
        with contextlib.suppress(RedisError):
            await self._adjust(
                keys=[self.tpm_key], args=[self.tpm.emission_ms, delta, int(time.time() * 1000)]
            )


def estimate_tokens(
    messages: tuple[dict[str, str], ...] | list[dict[str, str]], max_tokens: int | None
) -> int:
    """Prompt characters / 4 plus the output the call may produce (a cheap, pessimistic guess)."""
    prompt = sum(len(m.get("content", "")) for m in messages) // 4 + 4 * len(messages)
    return prompt + (max_tokens or 512)


def headroom(
    client: redis.Redis, namespace: str, provider: str, kind: str, per_minute: int, now: float
) -> int:
    """How many units (``kind`` ``rpm``: requests, ``tpm``: tokens) the shared limiter of
    ``provider`` would admit right now (synchronous: for the API)."""
    prefix = keys.ratelimit(namespace, provider)
    tat = client.get(keys.ratelimit_rpm(prefix) if kind == "rpm" else keys.ratelimit_tpm(prefix))
    limit = Limit(per_minute)
    backlog_ms = max(0.0, float(tat) - now * 1000) if tat else 0.0
    return max(0, int((limit.capacity_ms - backlog_ms) / limit.emission_ms))
