"""Admission by reservation (shared/budget.py) on fakeredis and a SQLite ledger: what fits is
admitted, what does not waits, settling releases the estimate, a dead worker's hold lapses with
its lease, and a counter Redis lost is rebuilt from the ledger."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import fakeredis
import pytest
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import SQLModel

from shared import keys
from shared.budget import Admission, Budgets
from shared.db import make_engine, make_sessionmaker
from shared.models import ProviderCall, Tenant
from shared.settings import Settings
from shared.usage import month_start

NOW = 1_767_000_000.0  # within one month, whatever the test's wall clock


@pytest.fixture
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}", pool_size=1)
    SQLModel.metadata.create_all(engine)
    made = make_sessionmaker(engine)
    with made.begin() as session:
        session.add(
            Tenant(
                id="tenant_a", name="a", tier="pro", webhook_secret="x", monthly_budget_usd=1.0, created_at=0
            )
        )
    return made


@pytest.fixture
def budgets(sessions: sessionmaker[Session]) -> Iterator[Budgets]:
    found = Budgets(fakeredis.FakeRedis(), "t", sessions, Settings(_env_file=None))  # type: ignore[call-arg]
    yield found
    found.close()


def admit(
    budgets: Budgets, query: str, estimate: float = 0.3, lease: float = 900, now: float = NOW
) -> Admission:
    return budgets.admit("tenant_a", "batch_1", query, estimate, int(now + lease), now)


def test_queries_start_while_their_estimates_fit_and_wait_once_they_do_not(budgets: Budgets) -> None:
    assert [admit(budgets, f"q{i}").admitted for i in range(4)] == [True, True, True, False]
    refused = admit(budgets, "q5")
    assert not refused.admitted and refused.reserved == pytest.approx(0.9)
    assert not refused.newly_waiting  # the batch already waits: said once


def test_settling_turns_the_reservation_into_the_actual_cost_and_resumes_waiting_batches(
    budgets: Budgets,
) -> None:
    first = admit(budgets, "q1")
    assert budgets.settle("tenant_a", "q1", first, 0.1) == pytest.approx((0.0, 0.1))
    assert budgets.settle("tenant_a", "q1", first, 0.1) is None  # settled once only
    # The running average (0.1) is now the estimate, not 0.3: about nine more fit in the 0.9 left.
    admitted = [admit(budgets, f"r{i}") for i in range(10)]
    assert all(a.admitted for a in admitted[:8]) and not admitted[9].admitted
    for i in (0, 1):  # two end having cost nothing
        budgets.settle("tenant_a", f"r{i}", admitted[i], 0.0)
    resumed = admit(budgets, "r9")
    assert resumed.admitted and resumed.resumed_batches == ("batch_1",)


def test_a_hold_whose_lease_ran_out_is_dropped(budgets: Budgets) -> None:
    assert admit(budgets, "dead", estimate=0.9, lease=10).admitted
    assert not admit(budgets, "q2", now=NOW + 5).admitted
    assert admit(budgets, "q2", now=NOW + 11).admitted


def test_a_lost_counter_is_rebuilt_from_the_ledger(budgets: Budgets, sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        session.add(
            ProviderCall(
                query_id="q0",
                batch_id="b0",
                tenant_id="tenant_a",
                model="sim:alpha",
                stage="answer",
                attempt=1,
                status="succeeded",
                latency_ms=1,
                cost_usd=0.8,
                created_at=int(NOW),
            )
        )
    assert admit(budgets, "q1", estimate=0.1).admitted and admit(budgets, "q2", estimate=0.1).admitted
    budgets._client.delete(keys.spend("t", "tenant_a", month_start(int(NOW))))  # Redis lost it
    assert not admit(budgets, "q3", estimate=0.3).admitted  # 0.8 spent per the ledger
    assert admit(budgets, "q4", estimate=0.1).admitted


def test_a_tenant_without_a_budget_touches_no_counter(
    budgets: Budgets, sessions: sessionmaker[Session]
) -> None:
    with sessions.begin() as session:
        session.add(Tenant(id="tenant_b", name="b", tier="enterprise", webhook_secret="x", created_at=0))
    found = budgets.admit("tenant_b", "batch_2", "q1", 100.0, int(time.time()) + 900, time.time())
    assert found.admitted and found.period is None
    assert budgets._client.keys("t:spend:tenant_b*") == []
