"""Browser fixtures: Debian's Chromium driven by Playwright (no browser download), a deployment
of its own (own Redis namespace) for the dashboard, and screenshots into ``test-artifacts/``.

Every page a test opens records each request it makes; ``Browse.assert_same_origin`` checks
that none left the API's origin (SPEC §12: no CDN, no network beyond the API).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from shared.settings import Settings
from shared.stack import Stack
from shared.tenants import issue_key
from tests.conftest import new_key, require, settings_env
from tests.leaks import remember_secret

playwright_sync = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path(os.environ.get("CONCLAVE_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"


# The simulated provider with prices, so that cost moves on the pages.
PROVIDERS_TOML = """
[providers.sim]
api = "openai"
base_url = "{sim_url}/v1"
api_key_env = "SIM_API_KEY"

[council]
members = ["sim:alpha", "sim:beta", "sim:gamma"]
chairman = "sim:chairman"

[models."sim:alpha"]
input_usd_per_mtok = 0.15
output_usd_per_mtok = 0.60

[models."sim:beta"]
input_usd_per_mtok = 0.80
output_usd_per_mtok = 4.00

[models."sim:gamma"]
input_usd_per_mtok = 0.10
output_usd_per_mtok = 0.40

[models."sim:chairman"]
input_usd_per_mtok = 2.50
output_usd_per_mtok = 10.00
"""


# Module scope, not session: Playwright's sync API keeps an event loop running in the main thread
# while it is open, and every later test that calls asyncio.run() there would fail with
# "asyncio.run() cannot be called from a running event loop".
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require(CHROMIUM.exists(), f"Chromium at {CHROMIUM}")
    with playwright_sync.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@dataclass
class Deployment:
    stack: Stack
    url: str
    settings: Settings
    redis: redis.Redis
    sessions: Any

    def key(self, role: str = "admin", tenant: str | None = None, operator: bool = False) -> tuple[str, str]:
        if not operator:
            return new_key(self.sessions, tenant, role)
        with self.sessions.begin() as session:
            issued = issue_key(
                session,
                tenant_name=tenant or f"op-{uuid.uuid4().hex[:8]}",
                role=role,
                tier="enterprise",
                operator=True,
            )
        return issued.api_key, issued.tenant_id

    def api(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


@pytest.fixture(scope="module")
def deployment(
    settings: Settings, sessions: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """An API and two worker processes in a Redis namespace of their own, so that queue depths
    and circuit states are this module's alone."""
    ns = f"cbrowser-{uuid.uuid4().hex[:8]}"
    providers = tmp_path_factory.mktemp("browser-cfg") / "providers.toml"
    providers.write_text(PROVIDERS_TOML.format(sim_url=settings.sim_provider_url))
    own = settings.model_copy(update={"queue_namespace": ns, "providers_file": providers})
    env = {**os.environ, **settings_env(own), "SIM_API_KEY": remember_secret("sk-sim-browser")}
    logs = ARTIFACTS / "logs" / ns
    logs.mkdir(parents=True, exist_ok=True)
    stack = Stack(env=env, logs=logs)
    client = redis.Redis.from_url(own.redis_url)
    try:
        url = stack.start_api()
        yield Deployment(stack, url, own, client, sessions)
    finally:
        stack.stop()
        keys = list(client.scan_iter(f"{ns}:*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i : i + 1000])
        client.close()


@dataclass
class Browse:
    """One browser context (its own cookies) and page, recording every request it makes."""

    page: Any
    context: Any
    origin: str
    requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    def sign_in(self, key: str) -> None:
        self.page.goto(f"{self.origin}/dashboard")
        self.page.fill("#api_key", key)
        self.page.click("#signin")
        self.page.wait_for_url(f"{self.origin}/dashboard/batches")

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def assert_same_origin(self) -> None:
        foreign = [u for u in self.requests if not (u.startswith(self.origin + "/") or u.startswith("data:"))]
        assert not foreign, f"requests left the origin: {foreign}"
        assert not self.console_errors, self.console_errors


@pytest.fixture
def browse(browser: Any, deployment: Deployment) -> Iterator[Any]:
    opened: list[Browse] = []

    def open_browser() -> Browse:
        # bypass_csp: Playwright evaluates its wait predicates as strings, which the pages' CSP forbids.
        context = browser.new_context(
            accept_downloads=True, viewport={"width": 1320, "height": 900}, bypass_csp=True
        )
        page = context.new_page()
        b = Browse(page, context, deployment.url)
        page.on("request", lambda r: b.requests.append(r.url))
        page.on("console", lambda m: b.console_errors.append(m.text) if m.type == "error" else None)
        opened.append(b)
        return b

    yield open_browser
    for b in opened:
        b.context.close()
