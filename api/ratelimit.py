"""Sliding-window rate limits for the API, in Redis so they hold across API replicas (SPEC §6).

A window is a sorted set of request timestamps: one atomic Lua call trims it, counts, and admits
or refuses. Exact (no fixed-window edge bursts): any 60 s holds at most ``limit`` requests.

Windows by kind: ``key`` (per API key, the tier's limit), ``ip`` (every request from an address)
and ``auth_failures`` (failed authentications from an address). The last is charged and checked
only for a request whose key did not authenticate, so a client guessing or mistyping keys is
throttled on its own: requests that carry a valid key from the same address (a NAT, a proxy, a
CI runner) are never refused for it, and failures cost the general ``ip`` budget nothing extra.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import time
import uuid
from dataclasses import dataclass

import redis
from redis.exceptions import RedisError

from shared import keys

WINDOW_MS = 60_000
AUTH_FAILURES = "auth_failures"

# KEYS[1] = window. ARGV: now_ms, window_ms, limit, cost, member.
# Returns {admitted (0/1), used, ms until the oldest entry leaves the window}.
_SLIDE = """
local key = KEYS[1]
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
redis.call('zremrangebyscore', key, '-inf', now - window)
local used = redis.call('zcard', key)
local admitted = 0
if used + cost <= limit then
  for i = 1, cost do redis.call('zadd', key, now, ARGV[5] .. ':' .. i) end
  used = used + cost
  admitted = 1
end
redis.call('pexpire', key, window)
local oldest = redis.call('zrange', key, 0, 0, 'WITHSCORES')
local reset = window
if oldest[2] then reset = tonumber(oldest[2]) + window - now end
return {admitted, used, reset}
"""


@dataclass(frozen=True)
class Verdict:
    admitted: bool
    limit: int
    remaining: int
    reset_s: int  # seconds until a slot frees up

    def headers(self) -> dict[str, str]:
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_s),
        }
        if not self.admitted:
            headers["Retry-After"] = str(max(1, self.reset_s))
        return headers


class SlidingWindow:
    def __init__(self, client: redis.Redis, namespace: str):
        self.client = client
        self.namespace = namespace
        self._slide = client.register_script(_SLIDE)
        # Loaded up front, as the broker's scripts are: a first EVALSHA would answer NOSCRIPT, and
        # the embedded fakeredis server closes the connection on an error reply (seen in CI as a
        # 500 from the demo's first request). With Redis down now, it loads on first use.
        with contextlib.suppress(RedisError):
            self._slide.sha = client.script_load(_SLIDE)

    def hit(self, kind: str, subject: str, limit: int, cost: int = 1) -> Verdict:
        now = int(time.time() * 1000)
        admitted, used, reset_ms = self._slide(
            keys=[keys.sliding_window(self.namespace, kind, subject)],
            args=[now, WINDOW_MS, limit, cost, uuid.uuid4().hex],
        )
        return Verdict(bool(admitted), limit, max(0, limit - int(used)), math.ceil(int(reset_ms) / 1000))


def client_ip(peer: str | None, forwarded_for: str | None, trusted: list[str]) -> str:
    """The client's address: the peer, unless the peer is a proxy the operator trusts, in which
    case the right-most ``X-Forwarded-For`` entry that is not itself a trusted proxy."""
    if not peer:
        return "unknown"
    if not trusted or not forwarded_for or not _in(peer, trusted):
        return peer
    for hop in reversed([h.strip() for h in forwarded_for.split(",") if h.strip()]):
        if not _in(hop, trusted):
            return hop
    return peer


def _in(address: str, networks: list[str]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(n, strict=False) for n in networks)
