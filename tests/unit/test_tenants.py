"""Tiers come from settings (``CONCLAVE_TIERS``), not from a list in the code."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlmodel import col

from shared.db import make_engine, make_sessionmaker, upgrade
from shared.models import Tenant
from shared.settings import DEFAULT_TIERS, Settings, TierLimits, get_settings
from shared.tenants import check_tier, issue_key, tier_names

GOLD = TierLimits(requests_per_minute=100, max_batch_queries=10, max_priority="high")
SILVER = TierLimits(requests_per_minute=10, max_batch_queries=5)


def custom_settings(**env: Any) -> Settings:
    return Settings(tiers={"silver": SILVER, "gold": GOLD}, _env_file=None, **env)  # type: ignore[call-arg]


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[Any]:
    url = f"sqlite:///{tmp_path / 'tenants.db'}"
    upgrade(url)
    engine = make_engine(url, pool_size=1)
    yield make_sessionmaker(engine)
    engine.dispose()


def test_tier_names_are_the_configured_tiers() -> None:
    assert tier_names(custom_settings()) == ("silver", "gold")
    assert tier_names(Settings(_env_file=None)) == tuple(DEFAULT_TIERS)  # type: ignore[call-arg]


def test_check_tier_names_the_configured_tiers() -> None:
    settings = custom_settings()

    assert check_tier(settings, "gold") is None
    assert check_tier(settings, "pro") == "tier must be one of silver, gold, not 'pro'"


def test_issue_key_accepts_a_tier_only_settings_name(sessions: Any) -> None:
    settings = custom_settings()

    with sessions.begin() as session:
        issued = issue_key(session, tenant_name="acme", role="admin", tier="gold", settings=settings)

    with sessions() as session:
        tenant = session.scalars(select(Tenant).where(col(Tenant.id) == issued.tenant_id)).one()
    assert tenant.tier == "gold"


def test_issue_key_refuses_a_tier_settings_do_not_name_and_creates_nothing(sessions: Any) -> None:
    settings = custom_settings()

    with sessions.begin() as session, pytest.raises(ValueError, match="tier must be one of silver, gold"):
        issue_key(session, tenant_name="acme", role="admin", tier="enterprise", settings=settings)

    with sessions() as session:
        assert session.scalars(select(Tenant)).all() == []


def test_issue_key_without_settings_reads_the_tiers_of_the_environment(
    sessions: Any, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    tiers = {name: limits.model_dump() for name, limits in custom_settings().tiers.items()}
    monkeypatch.setenv("CONCLAVE_TIERS", json.dumps(tiers))
    # get_settings() is built once per process: let this test see its own environment, and the
    # tests after it theirs.
    get_settings.cache_clear()
    request.addfinalizer(get_settings.cache_clear)

    with sessions.begin() as session:
        assert issue_key(session, tenant_name="a", role="user", tier="silver").tenant_id
        with pytest.raises(ValueError, match="not 'free'"):
            issue_key(session, tenant_name="b", role="user", tier="free")
