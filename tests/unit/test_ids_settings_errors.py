"""Small shared pieces: public ids (time-ordered), settings validation, and API error ``param`` paths."""

from __future__ import annotations

import os
import re
import time

import pytest
from pydantic import ValidationError

from api.errors import param_from_loc
from shared.ids import new_id, new_ids
from shared.settings import Settings, parse_window

_ID = re.compile(r"^([a-z]+)_([0-9a-hjkmnp-tv-z]{26})$")


# -- ids ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["batch", "q", "wh", "key"])
def test_id_is_prefix_and_26_crockford_chars(prefix: str) -> None:
    value = new_id(prefix)

    match = _ID.match(value)
    assert match is not None, value
    assert match[1] == prefix
    assert len(value) == len(prefix) + 1 + 26


def test_id_starts_with_its_millisecond_timestamp() -> None:
    assert new_id("q", now_ms=0).startswith("q_0000000000")
    assert new_id("q", now_ms=31).startswith("q_000000000z")
    assert new_id("q", now_ms=32).startswith("q_0000000010")
    assert new_id("q", now_ms=32**10 - 1).startswith("q_zzzzzzzzzz")


def test_ids_sort_by_creation_millisecond() -> None:
    base = 1_767_225_600_000  # 2026-01-01T00:00:00Z
    for step in (1, 31, 32, 1000, 86_400_000):
        for _ in range(200):
            assert new_id("q", now_ms=base) < new_id("q", now_ms=base + step)


def test_ids_created_later_sort_later() -> None:
    earlier = new_id("q")
    later = new_id("q", now_ms=int(time.time() * 1000) + 1)

    assert earlier < later


def test_ids_in_the_same_millisecond_differ() -> None:
    ids = {new_id("q", now_ms=1_767_225_600_000) for _ in range(1000)}

    assert len(ids) == 1000


def test_new_ids_are_sorted_unique_and_share_the_current_timestamp() -> None:
    before = new_id("q", now_ms=int(time.time() * 1000) - 1)

    ids = new_ids("q", 10_000)

    after = new_id("q", now_ms=int(time.time() * 1000) + 1)
    assert len(ids) == 10_000
    assert len(set(ids)) == 10_000
    assert ids == sorted(ids)
    assert all(_ID.match(i) for i in ids)
    assert len({i[:12] for i in ids}) == 1
    assert before < ids[0]
    assert ids[-1] < after


def test_new_ids_of_zero_is_empty() -> None:
    assert new_ids("q", 0) == []


# -- settings -----------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("CONCLAVE_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_default_webhook_retry_schedule_is_specs(clean_env: pytest.MonkeyPatch) -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]

    assert settings.webhook_retry_schedule == [0, 5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0,5,300", [0, 5, 300]),
        (" 1 , 2,3 ", [1, 2, 3]),
        ("60", [60]),
        ("0,5,300,", [0, 5, 300]),
    ],
)
def test_webhook_retry_schedule_from_env(
    clean_env: pytest.MonkeyPatch, value: str, expected: list[int]
) -> None:
    clean_env.setenv("CONCLAVE_WEBHOOK_RETRY_SCHEDULE", value)

    assert Settings(_env_file=None).webhook_retry_schedule == expected  # type: ignore[call-arg]


@pytest.mark.parametrize("value", ["0,-5,300", "-1", "", " , ", "0,five"])
def test_webhook_retry_schedule_rejects_nonsense(clean_env: pytest.MonkeyPatch, value: str) -> None:
    clean_env.setenv("CONCLAVE_WEBHOOK_RETRY_SCHEDULE", value)

    with pytest.raises(ValidationError) as info:
        Settings(_env_file=None)  # type: ignore[call-arg]

    assert "webhook_retry_schedule" in str(info.value)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("24h", 86_400), ("30m", 1800), ("7d", 604_800), ("1m", 60), ("60s", 60), (" 2H ", 7200)],
)
def test_parse_window_accepts(value: str, seconds: int) -> None:
    assert parse_window(value) == seconds


@pytest.mark.parametrize("value", ["8d", "0h", "abc", "59s", "24", "h", "-1h", "1.5h", "24hours", ""])
def test_parse_window_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        parse_window(value)


def test_default_completion_window_is_validated(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CONCLAVE_DEFAULT_COMPLETION_WINDOW", "8d")

    with pytest.raises(ValidationError):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_production_refuses_private_webhooks(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CONCLAVE_ENVIRONMENT", "production")
    clean_env.setenv("CONCLAVE_WEBHOOK_ALLOW_PRIVATE", "true")

    with pytest.raises(ValidationError) as info:
        Settings(_env_file=None)  # type: ignore[call-arg]

    assert "CONCLAVE_WEBHOOK_ALLOW_PRIVATE" in str(info.value)


def test_private_webhooks_allowed_outside_production(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CONCLAVE_WEBHOOK_ALLOW_PRIVATE", "true")

    assert Settings(_env_file=None).webhook_allow_private  # type: ignore[call-arg]
    assert Settings(_env_file=None, environment="test").webhook_allow_private  # type: ignore[call-arg]


def test_production_without_private_webhooks_is_fine(clean_env: pytest.MonkeyPatch) -> None:
    settings = Settings(_env_file=None, environment="production")  # type: ignore[call-arg]

    assert not settings.webhook_allow_private


def test_negative_limits_are_refused(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CONCLAVE_QUERY_RETRY_BUDGET", "-1")

    with pytest.raises(ValidationError):
        Settings(_env_file=None)  # type: ignore[call-arg]


# -- API error params ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loc", "param"),
    [
        (("body", "queries", 3, "custom_id"), "queries[3].custom_id"),
        (("body", "council", "members", 1), "council.members[1]"),
        (("body", "council", "chairman"), "council.chairman"),
        (("body", "queries", 0, "messages", 2, "content"), "queries[0].messages[2].content"),
        (("body", "webhook_url"), "webhook_url"),
        (("query", "limit"), "limit"),
        (("path", "batch_id"), "batch_id"),
        (("header", "idempotency-key"), "idempotency-key"),
        (("body",), None),
        ((), None),
    ],
)
def test_param_from_loc(loc: tuple[str | int, ...], param: str | None) -> None:
    assert param_from_loc(loc) == param


@pytest.mark.parametrize("key", ["path", "query", "body", "header"])
def test_param_from_loc_keeps_body_keys_that_look_like_locations(key: str) -> None:
    # Only the first element says where the value came from; user keys (metadata is a free
    # dict of strings) may be named anything.
    assert param_from_loc(("body", "metadata", key)) == f"metadata.{key}"


def test_bulk_ids_use_the_same_digits_as_single_ones() -> None:
    import base64
    import random

    from shared.ids import _FROM_RFC4648, _encode

    rng = random.Random(7)
    for raw in [bytes(10), b"\xff" * 10, *(rng.randbytes(10) for _ in range(500))]:
        assert base64.b32encode(raw).translate(_FROM_RFC4648).decode() == _encode(
            int.from_bytes(raw, "big"), 16
        )
