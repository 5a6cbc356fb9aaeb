"""Two real scheduler replicas (``python -m scheduler``) on one database and one Redis namespace:
exactly one leads, each periodic job acts once per period across both, and when the leader is
killed with SIGKILL the other takes over within the lock's lifetime and carries on its work.

Which process did a job's work is observed, not assumed:

- every webhook request is attributed to the process that sent it (the receiver looks up, while
  the request's connection is still open, which process owns the client end of it in ``/proc``);
- a delivery that always answers 500, with a retry schedule of zeros, is attempted once per run
  of the dispatch job, so the gaps between its attempts show how many replicas dispatch;
- the expiry job logs each batch it expires, so its log line shows which replica ran it.

The replicas get a database and a Redis namespace of their own: their jobs scan the whole
database, and nothing of the session's must be touched by them.
"""

from __future__ import annotations

import inspect
import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from scheduler.__main__ import INTERVALS
from scheduler.leader import LeaderLock
from shared.ids import new_id
from shared.models import Batch, Tenant, WebhookDelivery
from shared.settings import Settings
from shared.webhooks.events import emit
from tests.conftest import new_key, settings_env
from tests.helpers import poll
from tests.receivers import Received, WebhookReceiver, verify

pytestmark = [
    pytest.mark.integration,
]

# The scheduler builds its lock with the default TTL.
LOCK_TTL_S = inspect.signature(LeaderLock).parameters["ttl_ms"].default / 1000
TICK_S = 1.0  # how often a replica calls LeaderLock.tick (scheduler/__main__.py)
# Every failed attempt is retried at the next dispatch run, so attempts count runs.
ZERO_SCHEDULE = ",".join(["0"] * 200)


# ---------------------------------------------------------------- a receiver that knows the sender


def _client_socket_inode(client_port: int, server_port: int) -> str | None:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local_port = int(parts[1].rsplit(":", 1)[1], 16)
            remote_port = int(parts[2].rsplit(":", 1)[1], 16)
            if local_port == client_port and remote_port == server_port:
                return parts[9]
    return None


def _pid_holding(inode: str, pids: list[int]) -> int | None:
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # that process is gone
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None


class Receiver(WebhookReceiver):
    """Answers 200, or the status set for a path, and records which process sent each request."""

    def __init__(self) -> None:
        self.pids: list[int] = []
        super().__init__(identify=self._sender)

    def _sender(self, client_port: int) -> int | None:
        # The sender still holds its end of this connection while it waits for the answer.
        inode = _client_socket_inode(client_port, self.port)
        return _pid_holding(inode, self.pids) if inode else None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


# ---------------------------------------------------------------- a private database and namespace


@pytest.fixture
def own_namespace(namespace: str, rclient: redis.Redis) -> Iterator[str]:
    ns = f"{namespace}-repl-{uuid.uuid4().hex[:8]}"
    yield ns
    keys = list(rclient.scan_iter(f"{ns}:*", count=1000))
    for i in range(0, len(keys), 1000):
        rclient.delete(*keys[i : i + 1000])


# ---------------------------------------------------------------- the replicas


@dataclass
class Replica:
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def start_replicas(
    settings: Settings, own_database_url: str, own_namespace: str, tmp_path: Path
) -> Iterator[Callable[[int], list[Replica]]]:
    env = {
        **os.environ,
        **settings_env(settings),
        "CONCLAVE_DATABASE_URL": own_database_url,
        "CONCLAVE_QUEUE_NAMESPACE": own_namespace,
        "CONCLAVE_WEBHOOK_ALLOW_PRIVATE": "true",
        "CONCLAVE_WEBHOOK_RETRY_SCHEDULE": ZERO_SCHEDULE,
        # INFO: leadership changes and expired batches are logged, and are part of what is checked.
        "CONCLAVE_LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    started: list[Replica] = []

    def start(n: int) -> list[Replica]:
        new = []
        for _ in range(n):
            path = tmp_path / f"scheduler-{len(started)}.log"
            log_file = path.open("wb")
            proc = subprocess.Popen(
                [sys.executable, "-m", "scheduler"],
                env=env,
                cwd=tmp_path,  # no stray .env or ./conclave.db
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
            replica = Replica(proc, path, log_file)
            started.append(replica)
            new.append(replica)
        return new

    try:
        yield start
    finally:
        for replica in started:
            if replica.proc.poll() is None:
                replica.proc.terminate()
        for replica in started:
            try:
                replica.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                replica.proc.kill()
                replica.proc.wait(timeout=10)
            replica.log_file.close()
            print(f"--- scheduler pid {replica.pid} (exit {replica.proc.returncode}) ---")
            lines = [line for line in replica.log().splitlines() if "apscheduler" not in line]
            print("\n".join(lines[-40:]))


def holder(rclient: redis.Redis, ns: str) -> str | None:
    value = rclient.get(f"{ns}:scheduler:leader")
    return value.decode() if isinstance(value, bytes) else None


def holder_pid(identity: str | None) -> int | None:
    # The identity is "host:pid:random".
    return int(identity.rsplit(":", 2)[1]) if identity else None


def wait_for_leader(rclient: redis.Redis, ns: str, replicas: list[Replica]) -> tuple[Replica, Replica, str]:
    """Both replicas up; returns (leader, follower, the leader's identity)."""
    poll(
        lambda: all(" started (leader: " in r.log() for r in replicas),
        timeout=60,
        what="both schedulers to start",
    )
    for r in replicas:
        assert r.proc.poll() is None, r.log()
    identity = poll(lambda: holder(rclient, ns), timeout=10, what="a leader")
    pid = holder_pid(identity)
    assert pid in {r.pid for r in replicas}, f"the lock is held by {identity}, not by one of the replicas"
    leader = next(r for r in replicas if r.pid == pid)
    follower = next(r for r in replicas if r.pid != pid)
    return leader, follower, identity


def new_tenant(sessions: sessionmaker[Session]) -> tuple[str, str]:
    _, tenant_id = new_key(sessions, role="user")
    with sessions() as session:
        tenant = session.get(Tenant, tenant_id)
        assert tenant is not None
        return tenant_id, tenant.webhook_secret


def queue_events(sessions: sessionmaker[Session], tenant_id: str, urls: list[str]) -> list[str]:
    ids: list[str] = []
    with sessions.begin() as session:
        for url in urls:
            ids += emit(
                session,
                tenant_id,
                "batch.completed",
                {"id": f"batch_{uuid.uuid4().hex[:8]}", "url": url},
                batch_webhook_url=url,
            )
    return ids


# ---------------------------------------------------------------- tests


def test_one_replica_leads_and_each_job_acts_once_per_period(
    start_replicas: Callable[[int], list[Replica]],
    own_sessions: sessionmaker[Session],
    own_namespace: str,
    rclient: redis.Redis,
    receiver: Receiver,
) -> None:
    # Started one after the other, so that their job timers are out of phase: two dispatchers
    # running at the same instant would race for each delivery and one would always lose, which
    # looks just like one dispatcher.
    first = start_replicas(1)
    poll(lambda: " started (leader: " in first[0].log(), timeout=60, what="the first scheduler")
    replicas = first + start_replicas(1)
    receiver.pids = [r.pid for r in replicas]
    leader, follower, identity = wait_for_leader(rclient, own_namespace, replicas)
    assert f"scheduler {identity} started (leader: True)" in leader.log()
    assert "started (leader: False)" in follower.log()
    assert "took leadership" not in follower.log()

    tenant_id, secret = new_tenant(own_sessions)
    n = 12
    delivery_ids = queue_events(own_sessions, tenant_id, [f"{receiver.url}/d/{i}" for i in range(n)])
    # A receiver that always fails: with a schedule of zeros each dispatch run attempts it once more.
    receiver.status["/tick"] = 500
    queue_events(own_sessions, tenant_id, [f"{receiver.url}/tick"])
    # A batch already past its window, for the expiry job.
    now = int(time.time())
    batch_id = new_id("batch")
    with own_sessions.begin() as session:
        session.add(
            Batch(
                id=batch_id,
                tenant_id=tenant_id,
                status="in_progress",
                priority="normal",
                completion_window="1m",
                total=0,
                created_at=now - 120,
                in_progress_at=now - 120,
                expires_at=now - 60,
            )
        )

    # Every delivery arrives exactly once, sent by the leader and signed.
    poll(lambda: len({h.path for h in receiver.under("/d/")}) == n, timeout=30, what="all deliveries")
    attempts = 8

    def first_ticks() -> list[Received] | None:
        hits = receiver.on("/tick")
        return hits[:attempts] if len(hits) >= attempts else None

    ticks = poll(
        first_ticks,
        timeout=attempts * INTERVALS["webhooks"] * 3 + 10,
        what=f"{attempts} attempts at the failing receiver",
    )

    def expired() -> bool:
        with own_sessions() as session:
            return session.scalar(select(col(Batch.status)).where(col(Batch.id) == batch_id)) == "expired"

    poll(expired, timeout=INTERVALS["expiry"] * 2 + 10, what="the expiry job")
    receiver.status["/tick"] = 200

    hits = receiver.under("/d/")
    assert sorted(h.path for h in hits) == sorted(f"/d/{i}" for i in range(n)), "a delivery was sent twice"
    assert sorted(h.headers["webhook-id"] for h in hits) == sorted(delivery_ids)
    for hit in hits:
        assert verify(secret, hit)["type"] == "batch.completed"
    with own_sessions() as session:
        statuses = session.execute(
            select(col(WebhookDelivery.id), col(WebhookDelivery.status), col(WebhookDelivery.attempts)).where(
                col(WebhookDelivery.id).in_(delivery_ids)
            )
        ).all()
    assert {(s, a) for _, s, a in statuses} == {("delivered", 1)}

    # Only the leader sends: each request came from the leader's process.
    senders = {h.sender for h in receiver.requests}
    assert senders == {leader.pid}, (
        f"requests sent by {senders}; leader {leader.pid}, follower {follower.pid}"
    )

    # One dispatch run per period across both replicas: a second dispatcher out of phase with the
    # first would put two attempts in (nearly) every period.
    gaps = [b.at - a.at for a, b in itertools.pairwise(ticks)]
    period = INTERVALS["webhooks"]
    print(f"gaps between dispatch runs: {[round(g, 2) for g in gaps]} s")
    assert 0.8 * period < sum(gaps) / len(gaps) < 1.5 * period, gaps
    assert sum(gap < 0.6 * period for gap in gaps) <= 1, gaps
    assert len({h.headers["webhook-id"] for h in ticks}) == 1

    # The expiry job ran on the leader only.
    poll(lambda: f"batch {batch_id} expired" in leader.log(), timeout=10, what="the leader's expiry log")
    assert f"batch {batch_id} expired" not in follower.log()

    # Leadership did not move, and both replicas are still running.
    assert holder(rclient, own_namespace) == identity
    assert leader.proc.poll() is None and follower.proc.poll() is None


def test_the_follower_takes_over_when_the_leader_is_killed(
    start_replicas: Callable[[int], list[Replica]],
    own_sessions: sessionmaker[Session],
    own_namespace: str,
    rclient: redis.Redis,
    receiver: Receiver,
) -> None:
    replicas = start_replicas(2)
    receiver.pids = [r.pid for r in replicas]
    leader, follower, _ = wait_for_leader(rclient, own_namespace, replicas)
    tenant_id, secret = new_tenant(own_sessions)

    # The leader is working.
    queue_events(own_sessions, tenant_id, [f"{receiver.url}/before"])
    poll(lambda: receiver.on("/before"), timeout=20, what="the leader to deliver")
    assert [h.sender for h in receiver.on("/before")] == [leader.pid]

    key = f"{own_namespace}:scheduler:leader"
    lock_left_s = int(rclient.pttl(key)) / 1000
    killed_at = time.monotonic()
    os.kill(leader.pid, signal.SIGKILL)
    leader.proc.wait(timeout=10)
    assert leader.proc.returncode == -signal.SIGKILL

    # Work queued while nobody leads must be done by the new leader.
    n = 5
    after_ids = queue_events(own_sessions, tenant_id, [f"{receiver.url}/after/{i}" for i in range(n)])

    poll(
        lambda: holder_pid(holder(rclient, own_namespace)) == follower.pid,
        timeout=LOCK_TTL_S + TICK_S + 15,
        interval=0.05,
        what="the follower to take the lock",
    )
    took_over_at = time.monotonic()
    handover = took_over_at - killed_at
    print(
        f"handover after SIGKILL: {handover:.2f} s "
        f"(lock had {lock_left_s:.2f} s left; bound {LOCK_TTL_S + TICK_S:.0f} s)"
    )
    # Not before the dead leader's lock lapsed (it was valid), and within its lifetime plus one tick.
    assert handover >= lock_left_s - 0.5
    assert handover <= lock_left_s + TICK_S + 1.0
    assert handover <= LOCK_TTL_S + TICK_S + 1.0
    poll(lambda: "took leadership" in follower.log(), timeout=10, what="the follower's log line")

    poll(lambda: len(receiver.under("/after/")) >= n, timeout=20, what="the new leader to deliver")
    after = receiver.under("/after/")
    assert sorted(h.path for h in after) == sorted(f"/after/{i}" for i in range(n))
    assert sorted(h.headers["webhook-id"] for h in after) == sorted(after_ids)
    assert {h.sender for h in after} == {follower.pid}
    # Nothing was sent while nobody led.
    assert min(h.at for h in after) >= took_over_at - 0.5
    for hit in after:
        assert verify(secret, hit)["type"] == "batch.completed"
    assert follower.proc.poll() is None
