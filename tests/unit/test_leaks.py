"""The secrets-in-logs check itself (tests/leaks.py): it finds what it must, and never prints it."""

from __future__ import annotations

import logging
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.logs import JsonFormatter
from shared.tenants import KEY_PREFIX, new_webhook_secret
from tests.leaks import SECRET_SHAPES, find_leaks, leaks_in_files, report, shown

API_KEY = KEY_PREFIX + secrets.token_urlsafe(32)
WEBHOOK_SECRET = new_webhook_secret()
PROVIDER_KEY = "sk-test-provider-4c1d9e"


def json_line(message: str, *args: object) -> str:
    record = logging.LogRecord("api.test", logging.INFO, __file__, 1, message, args, None)
    return JsonFormatter("conclave-test").format(record)


def test_key_and_webhook_secret_shapes_match_what_tenants_creates() -> None:
    for _ in range(50):
        assert SECRET_SHAPES.fullmatch(KEY_PREFIX + secrets.token_urlsafe(32))
        assert SECRET_SHAPES.fullmatch(new_webhook_secret())
    assert not SECRET_SHAPES.search(API_KEY[:12])  # the listed prefix of a key is not the key


@pytest.fixture
def outside() -> Iterator[Path]:
    """A directory outside pytest's base directory, which the session-end check searches itself."""
    with tempfile.TemporaryDirectory(prefix="leaks-test-") as path:
        yield Path(path)


def test_a_created_secret_in_a_log_file_is_named_by_file_and_line(outside: Path) -> None:
    logs = outside / "logs-ns"
    logs.mkdir()
    (logs / "api-8000.log").write_text(
        json_line("started") + "\n" + json_line("auth for %s", API_KEY) + "\n" + json_line("idle") + "\n"
    )
    (logs / "worker-1.log").write_text(json_line("calling with %s", PROVIDER_KEY) + "\n")
    (outside / "providers.toml").write_text(f'key = "{PROVIDER_KEY}"\n')  # not a log

    leaks = leaks_in_files(outside, {API_KEY, PROVIDER_KEY})

    assert [(Path(leak.where).name, leak.line, leak.secret) for leak in leaks] == [
        ("api-8000.log", 2, API_KEY),
        ("worker-1.log", 1, PROVIDER_KEY),
    ]
    assert all(leak.registered for leak in leaks)


def test_a_key_shaped_secret_nobody_registered_is_found_too() -> None:
    line = json_line("rotated to %s", WEBHOOK_SECRET)

    (leak,) = find_leaks("scheduler.log", [line], set())

    assert (leak.secret, leak.registered) == (WEBHOOK_SECRET, False)
    assert str(leak) == f"scheduler.log:1: unregistered key-shaped secret {WEBHOOK_SECRET[:8]}…"


def test_clean_lines_are_not_leaks() -> None:
    lines = [json_line("key %s revoked", API_KEY[:12]), json_line("batch done"), "cnk_short whsec_short"]

    assert list(find_leaks("api.log", lines, {API_KEY, WEBHOOK_SECRET, PROVIDER_KEY})) == []


@pytest.mark.parametrize("secret", [API_KEY, WEBHOOK_SECRET, PROVIDER_KEY])
def test_the_report_shows_a_prefix_never_the_secret(secret: str) -> None:
    leaks = list(find_leaks("api.log", [f"x {secret} y"], {secret}))

    text = report(leaks)

    assert secret not in text
    assert shown(secret) in text and "api.log:1" in text
    assert len(shown(secret)) <= 9
