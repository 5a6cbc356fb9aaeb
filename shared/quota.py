"""The daily query quota per tenant, reserved atomically in Redis.

Reading the day's total from the database and then inserting would let concurrent batches all
pass the check; instead each batch reserves its queries with one Lua call (check and add
together) before it is stored, and gives them back if storing fails. The counter starts each
day (or after Redis lost it) from the database's own count, so the database stays the truth.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from shared import keys
from shared.errors import RateLimited
from shared.models import Batch

# KEYS[1] = the day's counter. ARGV: used_in_db, n, quota, ttl_s. Returns the new total, or -1.
_RESERVE = """
if redis.call('exists', KEYS[1]) == 0 then
  redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[4])
end
local used = tonumber(redis.call('get', KEYS[1]))
if used + tonumber(ARGV[2]) > tonumber(ARGV[3]) then return -1 end
return redis.call('incrby', KEYS[1], ARGV[2])
"""


@dataclass
class Reservation:
    client: redis.Redis
    key: str
    n: int

    def release(self) -> None:
        # Without Redis the counter cannot be corrected; it is rebuilt from the database once it expires.
        with contextlib.suppress(redis.RedisError):
            self.client.decrby(self.key, self.n)


def reserve_daily_quota(
    client: redis.Redis, namespace: str, sessions: sessionmaker[Session], tenant_id: str, n: int, quota: int
) -> Reservation | None:
    """Reserve ``n`` queries of today's ``quota`` or raise 429 ``quota_exceeded``.
    Returns None when Redis is unavailable (the database check alone then applies)."""
    now = int(time.time())
    day_start = now - now % 86400
    with sessions() as session:
        used = int(
            session.scalar(
                select(func.coalesce(func.sum(col(Batch.total)), 0)).where(
                    col(Batch.tenant_id) == tenant_id, col(Batch.created_at) >= day_start
                )
            )
            or 0
        )
    key = keys.daily_quota(namespace, tenant_id, day_start)
    try:
        total = client.eval(_RESERVE, 1, key, used, n, quota, 2 * 86400)
    except redis.RedisError:
        total = None if used + n <= quota else -1
        if total is None:
            return None
    if int(total) < 0:
        left = max(0, quota - used)
        raise RateLimited(
            f"your tier allows {quota} queries a day; about {left} left today",
            retry_after=day_start + 86400 - now,
            param="queries",
            type_="quota_exceeded",
        )
    return Reservation(client, key, n)
