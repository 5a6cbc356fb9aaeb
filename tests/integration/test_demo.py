"""``conclave demo`` as a user runs it, and the embedded Redis fallbacks it relies on."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis

from shared.stack import ensure_redis

pytestmark = pytest.mark.integration

UNREACHABLE = "redis://127.0.0.1:1/0"


def test_demo_runs_end_to_end_on_embedded_fakeredis(tmp_path: Path) -> None:
    # No Redis to reach and no redis-server on PATH: the demo must fall back to fakeredis.
    env = {**os.environ, "CONCLAVE_REDIS_URL": UNREACHABLE, "PATH": str(Path(sys.executable).parent)}
    env.pop("CONCLAVE_DATABASE_URL", None)
    result = subprocess.run(
        [sys.executable, "-m", "shared.cli.main", "demo", "--workdir", str(tmp_path), "--latency-ms", "20"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "redis: fakeredis" in out
    assert "batch completed: 8 succeeded, 0 failed of 8" in out
    assert out.count("Council synthesis for:") == 8
    assert "synthesis: chairman" in out
    # Everything it started is gone again: the API it printed no longer answers.
    api_url = re.search(r"api: (http://127\.0\.0\.1:\d+)", out)
    assert api_url
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{api_url.group(1)}/healthz", timeout=2)


def test_ensure_redis_prefers_reachable_then_binary_then_fakeredis(monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("redis-server"):
        embedded = ensure_redis(UNREACHABLE)
        try:
            assert embedded.kind == "redis-server"
            assert redis.Redis.from_url(embedded.url).ping()
        finally:
            embedded.stop()
    monkeypatch.setenv("PATH", "/nonexistent")
    fake = ensure_redis(UNREACHABLE)
    try:
        assert fake.kind == "fakeredis"
        client = redis.Redis.from_url(fake.url)
        assert client.ping()
        client.close()
    finally:
        fake.stop()
