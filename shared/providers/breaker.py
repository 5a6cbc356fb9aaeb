"""Circuit breaker per provider, shared by every worker process and machine through Redis.

States (SPEC §5.2): ``closed`` (calls flow), ``open`` (calls refused with ``CircuitOpen`` until
the cooldown passes), ``half_open`` (one probe at a time, cluster-wide; its success closes the
circuit, its failure re-opens it with a doubled cooldown).

The circuit opens when, over a sliding window, at least ``min_failures`` health failures were
seen and they are at least ``failure_ratio`` of the calls. There is deliberately no
"N consecutive failures" rule: with hundreds of calls in flight, completion order says
nothing (a burst of timeouts from calls started together arrives back to back even from a
provider that answers 95% of calls), while a provider that is really down fails nearly every
call and trips the ratio within its first ``min_failures`` calls.

The ratio's denominator is the calls *started* in the window, not the calls finished: errors
come back in milliseconds while answers take seconds, so at the start of a burst the finished
calls are nearly all failures even from a provider that answers 80% of them (the chaos suite
saw a circuit open 1.3 s into a batch at a 20% error rate). Counting starts, that provider
shows 20%; a dead one, whose every started call fails, crosses the ratio once that share of
the calls it was sent has failed (calls that hang all time out together, so this costs little).

Cost on the hot path: a failure is reported to Redis at once (failures must spread fast) with
the calls started since the last report; other starts are flushed at most once a second; each
process re-reads the shared state at most every ``refresh_s``, so a circuit opened anywhere
is seen everywhere within that time, without a Redis round trip per call.

Only failures that say the provider is unhealthy count (server, overloaded, timeout, network,
bad_response, auth); a rejected request or a rate limit says nothing about its health, and a
half-open probe answered with one closes the circuit (the provider answered: it is alive).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared import keys

log = logging.getLogger("conclave.breaker")

HEALTH_FAILURES = frozenset({"server", "overloaded", "timeout", "network", "bad_response", "auth"})

# KEYS[1] = breaker hash. ARGV: now_ms, failures, started (calls started since the last report),
# window_ms, min_failures, ratio, cooldown_ms, probe (1 = a half-open probe's outcome).
# Returns {state, opened_at_ms, cooldown_ms}.
# The window is a sliding-window counter: the previous window's counts, weighted by how much
# of it still overlaps, plus the current window's.
_REPORT = """
local key = KEYS[1]
local now = tonumber(ARGV[1])
local failures = tonumber(ARGV[2])
local started = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local min_failures = tonumber(ARGV[5])
local ratio = tonumber(ARGV[6])
local base_cooldown = tonumber(ARGV[7])
local probe = tonumber(ARGV[8])

local h = redis.call('hmget', key, 'state', 'opened_at', 'cooldown', 'start', 'fails', 'calls',
                    'prev_fails', 'prev_calls')
local state = h[1] or 'closed'
local opened_at = tonumber(h[2]) or 0
local cooldown = tonumber(h[3]) or base_cooldown
local start = tonumber(h[4]) or now
local fails = tonumber(h[5]) or 0
local calls = tonumber(h[6]) or 0
local prev_fails = tonumber(h[7]) or 0
local prev_calls = tonumber(h[8]) or 0

local elapsed = now - start
if elapsed >= 2 * window then
  prev_fails = 0; prev_calls = 0; fails = 0; calls = 0; start = now; elapsed = 0
elseif elapsed >= window then
  prev_fails = fails; prev_calls = calls; fails = 0; calls = 0; start = start + window; elapsed = now - start
end
fails = fails + failures
calls = calls + started

if probe == 1 then
  if failures > 0 then
    state = 'open'; opened_at = now; cooldown = math.min(cooldown * 2, base_cooldown * 16)
  else
    state = 'closed'; cooldown = base_cooldown
    fails = 0; calls = 0; prev_fails = 0; prev_calls = 0; start = now
  end
elseif state == 'closed' then
  local weight = 1 - elapsed / window
  local eff_fails = fails + prev_fails * weight
  -- A failure of a call started before the window still counts against at least itself.
  local eff_calls = math.max(calls + prev_calls * weight, eff_fails)
  if eff_fails >= min_failures and eff_fails >= ratio * eff_calls then
    state = 'open'; opened_at = now; cooldown = base_cooldown
  end
end

redis.call('hset', key, 'state', state, 'opened_at', opened_at, 'cooldown', cooldown, 'start', start,
           'fails', fails, 'calls', calls, 'prev_fails', prev_fails, 'prev_calls', prev_calls)
redis.call('pexpire', key, 86400000)
return {state, tostring(opened_at), tostring(cooldown)}
"""


@dataclass(frozen=True)
class BreakerConfig:
    min_failures: int = 10  # health failures in the window before the circuit may open
    failure_ratio: float = 0.5  # ... and their share of the window's calls
    window_s: float = 10.0
    cooldown_s: float = 15.0  # open → half-open; doubles on each failed probe, up to 16×
    refresh_s: float = 0.25  # how stale a process's view of the shared state may be
    flush_s: float = 1.0  # how long counts of started calls may wait to be sent
    probe_timeout_s: float = 60.0


@dataclass
class _View:
    state: str = "closed"
    opened_at_ms: float = 0.0
    cooldown_ms: float = 0.0
    read_at: float = 0.0


class CircuitBreaker:
    """One provider's breaker as seen from one process."""

    def __init__(self, client: aioredis.Redis, key: str, config: BreakerConfig):
        self.client = client
        self.key = key
        self.config = config
        self._report = client.register_script(_REPORT)
        self._view = _View()
        self._pending_started = 0
        self._last_flush = time.monotonic()
        self._refreshing: asyncio.Task[None] | None = None

    async def state(self) -> tuple[str, float]:
        """(state, seconds until a probe may run) from a view at most ``refresh_s`` old."""
        now = time.monotonic()
        if now - self._view.read_at > self.config.refresh_s:
            await self._refresh(now)
        view = self._view
        if view.state == "open":
            remaining = (view.opened_at_ms + view.cooldown_ms) / 1000 - time.time()
            return ("half_open", 0.0) if remaining <= 0 else ("open", remaining)
        return view.state, 0.0

    async def acquire(self) -> tuple[bool, bool, float]:
        """May a call go now? Returns (allowed, is_probe, retry_after_s)."""
        state, remaining = await self.state()
        if state == "closed":
            self._pending_started += 1
            return True, False, 0.0
        if state == "open":
            return False, False, remaining
        try:
            won = await self.client.set(
                keys.breaker_probe(self.key), "1", nx=True, px=int(self.config.probe_timeout_s * 1000)
            )
        except RedisError:
            return True, False, 0.0  # without Redis, fail open: the breaker must not stop all work
        return (True, True, 0.0) if won else (False, False, 1.0)

    async def record(self, ok: bool, category: str | None, probe: bool = False) -> None:
        if probe:
            # A probe answered with a rate limit or a refusal reached a live provider: it closes
            # the circuit like a success. Only a health failure says the provider is still down.
            healthy = ok or category not in HEALTH_FAILURES
            await self._send(failures=0 if healthy else 1, started=1, probe=True)
            await self.release_probe()
            return
        if ok or category not in HEALTH_FAILURES:
            if time.monotonic() - self._last_flush >= self.config.flush_s:
                await self.flush()
            return
        started, self._pending_started = self._pending_started, 0
        await self._send(failures=1, started=started, probe=False)

    async def release_probe(self) -> None:
        """Give the probe slot back without an outcome: the probe never reached the provider (its
        rate-limiter wait timed out), so the next caller anywhere may probe now, not in 60 s."""
        with contextlib.suppress(RedisError):
            await self.client.delete(keys.breaker_probe(self.key))

    async def flush(self) -> None:
        started, self._pending_started = self._pending_started, 0
        self._last_flush = time.monotonic()
        if started:
            await self._send(failures=0, started=started, probe=False)

    async def _send(self, *, failures: int, started: int, probe: bool) -> None:
        c = self.config
        args = [
            int(time.time() * 1000),
            failures,
            started,
            int(c.window_s * 1000),
            c.min_failures,
            c.failure_ratio,
            int(c.cooldown_s * 1000),
            1 if probe else 0,
        ]
        try:
            state, opened_at, cooldown = await self._report(keys=[self.key], args=args)
        except RedisError as exc:
            # Counts are lost, not calls: the breaker degrades to "closed", never to "stop all work".
            log.warning("breaker %s: Redis unavailable (%s)", self.key, type(exc).__name__)
            return
        state = state.decode() if isinstance(state, bytes) else str(state)
        if state != self._view.state:
            log.warning("circuit %s is now %s", self.key, state)
        self._view = _View(state, float(opened_at), float(cooldown), time.monotonic())

    async def _refresh(self, now: float) -> None:
        try:
            state, opened_at, cooldown = await self.client.hmget(self.key, ["state", "opened_at", "cooldown"])
        except RedisError:
            self._view.read_at = now
            return
        self._view = _View(
            state.decode() if isinstance(state, bytes) else (state or "closed"),
            float(opened_at or 0),
            float(cooldown or 0),
            now,
        )


@dataclass(frozen=True)
class CircuitReading:
    """What an operator sees of one provider's circuit (``/v1/admin/providers``)."""

    state: str  # closed | open | half_open
    window_calls: int
    window_error_rate: float


def read_circuit(client: redis.Redis, namespace: str, provider: str, now: float) -> CircuitReading:
    """The shared circuit of ``provider`` as every worker sees it (synchronous: for the API)."""
    raw = client.hgetall(keys.breaker(namespace, provider))
    h = {_text(k): _text(v) for k, v in raw.items()}
    state = h.get("state", "closed")
    if state == "open" and now * 1000 >= float(h.get("opened_at", 0)) + float(h.get("cooldown", 0)):
        state = "half_open"  # the cooldown has passed: the next call is the probe
    calls = float(h.get("calls", 0))
    error_rate = round(float(h.get("fails", 0)) / calls, 4) if calls else 0.0
    return CircuitReading(state, int(calls), error_rate)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
