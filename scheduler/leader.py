"""Leader lock in Redis: several scheduler replicas may run; exactly one acts at a time.

APScheduler 3 cannot share a job store between schedulers, so each replica schedules every
job and a job body runs only on the replica holding the lock. The lock is a key with a TTL,
renewed well before it lapses; when the leader dies the key expires and another replica
takes over within one TTL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid

import redis

log = logging.getLogger("conclave.scheduler")

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class LeaderLock:
    def __init__(self, client: redis.Redis, key: str = "conclave:scheduler:leader", ttl_ms: int = 15_000):
        self.client = client
        self.key = key
        self.ttl_ms = ttl_ms
        self.identity = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self.is_leader = False

    def tick(self) -> bool:
        """Acquire or renew; call every ttl/3. Returns whether this replica leads now."""
        try:
            if self.is_leader and self._renew(keys=[self.key], args=[self.identity, self.ttl_ms]):
                return True
            acquired = bool(self.client.set(self.key, self.identity, nx=True, px=self.ttl_ms))
        except redis.RedisError as exc:
            # Without Redis nobody can prove leadership: stand down rather than risk two leaders.
            log.warning("leader lock unavailable: %s", type(exc).__name__)
            acquired = False
        if acquired != self.is_leader:
            log.info("scheduler %s %s leadership", self.identity, "took" if acquired else "lost")
        self.is_leader = acquired
        return acquired

    def release(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self._release(keys=[self.key], args=[self.identity])
        self.is_leader = False
