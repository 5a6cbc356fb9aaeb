"""Each wire format against the real simulated provider (SPEC §4.3) over real HTTP: a round trip
with the production client, and every fault the simulator injects landing in the right category.

The simulator renders each fault the way the real API does, so these tests check that the provider
modules and ``shared.sim.wire`` agree on the shapes; the unit tests per format check the shapes
against the vendors' documentation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from shared.providers import errors
from shared.providers.anthropic import AnthropicProvider
from shared.providers.base import ChatRequest, ChatResult, Provider
from shared.providers.config import ProviderConfig
from shared.providers.gemini import GeminiProvider
from shared.providers.http import make_client
from shared.providers.openai import OpenAIProvider
from shared.sim import SimConfig, SimServer

FORMATS: dict[str, type[Provider]] = {
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
    "gemini": GeminiProvider,
}
SYSTEM = "Answer in one sentence."
QUESTION = "What is the capital of France?"
REQUEST = ChatRequest(
    model="sim:alpha",
    messages=({"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}),
    max_tokens=128,
    temperature=0.0,
)
RETRY_AFTER_S = 0.25
FAST = {"latency_ms": 0, "latency_jitter_ms": 0, "error_rate": 0, "error_kinds": ["server"], "hang_s": 120}


@pytest.fixture(scope="module")
def sim_server() -> Iterator[SimServer]:
    with SimServer(SimConfig(seed=11, retry_after_s=RETRY_AFTER_S)) as server:
        yield server


@pytest.fixture
def sim(sim_server: SimServer) -> SimServer:
    configure(sim_server, **FAST)
    httpx.delete(f"{sim_server.url}/_sim/log").raise_for_status()
    return sim_server


def configure(sim: SimServer, **patch: object) -> None:
    httpx.post(f"{sim.url}/_sim/config", json=patch).raise_for_status()


def provider(api: str, sim: SimServer, timeout_s: float = 10.0) -> Provider:
    base_url = sim.url + "/v1" if api == "openai" else sim.url
    config = ProviderConfig(name=api, api=api, base_url=base_url, api_key_env=None, timeout_s=timeout_s)
    # ``build_provider`` only invents a key for the provider named "sim"; the simulator wants one.
    return FORMATS[api](config, "sim-test-key")


def complete(target: Provider) -> ChatResult:
    async def go() -> ChatResult:
        client = make_client()
        try:
            return await target.complete(client, REQUEST)
        finally:
            await client.aclose()

    return asyncio.run(go())


def fail(target: Provider) -> errors.ProviderError:
    with pytest.raises(errors.ProviderError) as info:
        complete(target)
    assert "sim-test-key" not in info.value.message
    return info.value


@pytest.mark.parametrize("api", FORMATS)
def test_round_trip(sim: SimServer, api: str) -> None:
    result = complete(provider(api, sim))

    assert result.text == f"[simulated sim:alpha] Answer to: {QUESTION}"
    assert result.input_tokens > 0
    assert result.output_tokens > 0
    (record,) = httpx.get(f"{sim.url}/_sim/log").json()["data"]
    assert (record["api"], record["model"], record["outcome"]) == (api, "sim:alpha", "ok")
    # The system prompt reached the simulator by the format's own route (messages, system, systemInstruction).
    assert record["text"] == f"{SYSTEM}\n\n{QUESTION}"


@pytest.mark.parametrize(
    ("kind", "category"),
    [
        ("rate_limited", "rate_limited"),
        ("overloaded", "overloaded"),
        ("server", "server"),
        ("auth", "auth"),
        ("invalid_request", "invalid_request"),
        ("bad_response", "bad_response"),
        ("content_filter", "content_filter"),
        ("empty", "bad_response"),
    ],
)
@pytest.mark.parametrize("api", FORMATS)
def test_injected_fault_maps_to_its_category(sim: SimServer, api: str, kind: str, category: str) -> None:
    configure(sim, error_rate=1, error_kinds=[kind])

    exc = fail(provider(api, sim))

    assert exc.category == category
    assert exc.transient is errors.CATEGORIES[category].transient
    if kind == "rate_limited":
        assert exc.retry_after == pytest.approx(RETRY_AFTER_S)


@pytest.mark.parametrize("api", FORMATS)
def test_hung_call_is_timeout(sim: SimServer, api: str) -> None:
    configure(sim, error_rate=1, error_kinds=["timeout"], hang_s=2)

    exc = fail(provider(api, sim, timeout_s=0.3))

    assert isinstance(exc, errors.Timeout)
    assert exc.category == "timeout"
    assert exc.transient
