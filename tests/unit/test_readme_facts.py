"""Figures the README states about the code, checked against the code: an operator sizes
timeouts and limits from these sentences, so they must not drift from the constants."""

from __future__ import annotations

import re
from pathlib import Path

from shared.liveness import DEAD_AFTER_S, HEARTBEAT_S
from shared.settings import Settings

README = " ".join((Path(__file__).parents[2] / "README.md").read_text().split())


def stated(pattern: str) -> list[str]:
    found = re.findall(pattern, README)
    assert found, f"the README no longer says {pattern!r}"
    return found


def number(text: str) -> float:
    return float(text.replace(",", ""))


def test_the_heartbeat_interval_and_dead_worker_age_are_the_workers() -> None:
    assert {number(n) for n in stated(r"heartbeat every (\d+(?:\.\d+)?) s")} == {HEARTBEAT_S}
    assert {number(n) for n in stated(r"(?:silent for|heartbeat is) (\d+) s")} == {DEAD_AFTER_S}


def test_the_per_address_limits_are_the_settings_defaults() -> None:
    defaults = Settings.model_fields
    assert (
        number(stated(r"`CONCLAVE_IP_REQUESTS_PER_MINUTE`, default ([\d,]+)")[0])
        == defaults["ip_requests_per_minute"].default
    )
    assert (
        number(stated(r"`CONCLAVE_AUTH_FAILURES_PER_MINUTE`, default ([\d,]+)")[0])
        == defaults["auth_failures_per_minute"].default
    )
    # Failures no longer weigh on the address's general budget; the README must not say they do.
    assert not re.search(r"failure counts as \d+ requests", README)
