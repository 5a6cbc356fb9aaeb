"""The simulated provider (SPEC §4.3) over real HTTP: wire shapes, rankings, faults, control routes."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from shared.sim import SimConfig, SimServer
from shared.sim.answers import review_labels

QUESTION = "What is the capital of France, and why did it become the capital?"
# Shaped like llm-council's stage 2 prompt, whose format example names a label (C) not on offer.
REVIEW_PROMPT = f"""You are evaluating different responses to the following question:

Question: {QUESTION}

Here are the responses from different models (anonymized):

Response A:
Paris, since the Capetians ruled from there.

Response B:
Paris. Response A says much the same.

Response D:
Lyon, obviously.

Evaluate each response, then end with a line "FINAL RANKING:" followed by a numbered list, e.g.

FINAL RANKING:
1. Response C
2. Response A
"""
SYNTHESIS_PROMPT = f"""You are the Chairman of an LLM Council. Original question: {QUESTION}

Response A: Paris.
Review 1 ended with:
FINAL RANKING:
1. Response A
"""
RANKING = re.compile(r"FINAL RANKING:\n((?:\d+\. Response [A-Z]+\n?)+)\s*\Z")

OPENAI_HEADERS = {"Authorization": "Bearer sk-test"}
ANTHROPIC_HEADERS = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}
GEMINI_HEADERS = {"x-goog-api-key": "g-test"}


# --- helpers -------------------------------------------------------------------------------------


def call(
    client: httpx.Client,
    api: str,
    prompt: str,
    model: str = "sim:alpha",
    system: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """One provider call in ``api``'s wire format."""
    if api == "openai":
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": 256}
        return client.post("/v1/chat/completions", json=body, headers=headers or OPENAI_HEADERS)
    if api == "anthropic":
        body = {"model": model, "max_tokens": 256, "messages": [{"role": "user", "content": prompt}]}
        if system:
            body["system"] = system
        return client.post("/v1/messages", json=body, headers=headers or ANTHROPIC_HEADERS)
    body = {
        "contents": [{"role": "user", "parts": [{"text": prompt}]}],
        "generationConfig": {"temperature": 0},
    }
    if system:
        body["systemInstruction"] = {"parts": [{"text": system}]}
    path = f"/v1beta/models/{model}:generateContent"
    return client.post(path, json=body, headers=headers or GEMINI_HEADERS)


def answer_text(api: str, payload: dict[str, Any]) -> str:
    if api == "openai":
        return str(payload["choices"][0]["message"]["content"])
    if api == "anthropic":
        return "".join(block["text"] for block in payload["content"] if block["type"] == "text")
    return "".join(part["text"] for part in payload["candidates"][0]["content"]["parts"])


def usage(api: str, payload: dict[str, Any]) -> tuple[int, int]:
    if api == "openai":
        return payload["usage"]["prompt_tokens"], payload["usage"]["completion_tokens"]
    if api == "anthropic":
        return payload["usage"]["input_tokens"], payload["usage"]["output_tokens"]
    return payload["usageMetadata"]["promptTokenCount"], payload["usageMetadata"]["candidatesTokenCount"]


def ranking_of(text: str) -> list[str]:
    match = RANKING.search(text)
    assert match, text
    return re.findall(r"Response ([A-Z]+)", match.group(1))


def configure(client: httpx.Client, **patch: Any) -> dict[str, Any]:
    response = client.post("/_sim/config", json=patch)
    assert response.status_code == 200, response.text
    return dict(response.json())


def log(client: httpx.Client, since: int = 0) -> list[dict[str, Any]]:
    return list(client.get("/_sim/log", params={"since": since}).json()["data"])


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached before the deadline"


def estimate(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


@pytest.fixture
def sim() -> Iterator[SimServer]:
    with SimServer(SimConfig(seed=7)) as server:
        yield server


@pytest.fixture
def client(sim: SimServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.url, timeout=10) as http:
        yield http


APIS = ["openai", "anthropic", "gemini"]


# --- success shapes ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat/completions"])
def test_openai_answer_has_the_chat_completion_shape(client: httpx.Client, path: str) -> None:
    body = {"model": "sim:alpha", "messages": [{"role": "user", "content": QUESTION}], "temperature": 0}
    response = client.post(path, json=body, headers=OPENAI_HEADERS)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    payload = response.json()
    assert payload["id"].startswith("chatcmpl-")
    assert payload["object"] == "chat.completion"
    assert isinstance(payload["created"], int)
    assert payload["model"] == "sim:alpha"
    [choice] = payload["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == f"[simulated sim:alpha] Answer to: {QUESTION}"
    text = choice["message"]["content"]
    assert payload["usage"] == {
        "prompt_tokens": estimate(QUESTION),
        "completion_tokens": estimate(text),
        "total_tokens": estimate(QUESTION) + estimate(text),
    }


def test_anthropic_answer_has_the_message_shape(client: httpx.Client) -> None:
    response = call(client, "anthropic", QUESTION, model="claude-3-5-haiku-latest", system="Be brief.")

    assert response.status_code == 200
    payload = response.json()
    assert payload["id"].startswith("msg_")
    assert (payload["type"], payload["role"], payload["stop_reason"]) == ("message", "assistant", "end_turn")
    assert payload["model"] == "claude-3-5-haiku-latest"
    [block] = payload["content"]
    assert block["type"] == "text"
    assert block["text"].startswith("[simulated claude-3-5-haiku-latest] ")
    assert payload["usage"] == {
        "input_tokens": estimate(f"Be brief.\n\n{QUESTION}"),
        "output_tokens": estimate(block["text"]),
    }


def test_gemini_answer_has_the_generate_content_shape(client: httpx.Client) -> None:
    response = call(client, "gemini", QUESTION, model="gemini-2.0-flash", system="Be brief.")

    assert response.status_code == 200
    payload = response.json()
    [candidate] = payload["candidates"]
    assert candidate["finishReason"] == "STOP"
    assert candidate["index"] == 0
    assert candidate["content"]["role"] == "model"
    [part] = candidate["content"]["parts"]
    assert part["text"].startswith("[simulated gemini-2.0-flash] ")
    prompt_tokens, output_tokens = estimate(f"Be brief.\n\n{QUESTION}"), estimate(part["text"])
    assert payload["usageMetadata"] == {
        "promptTokenCount": prompt_tokens,
        "candidatesTokenCount": output_tokens,
        "totalTokenCount": prompt_tokens + output_tokens,
    }
    assert payload["modelVersion"] == "gemini-2.0-flash"


def test_gemini_model_names_may_contain_colons(client: httpx.Client) -> None:
    response = call(client, "gemini", QUESTION, model="sim:beta")

    assert response.status_code == 200
    assert answer_text("gemini", response.json()).startswith("[simulated sim:beta] ")


# --- what it says --------------------------------------------------------------------------------


@pytest.mark.parametrize("api", APIS)
def test_answers_say_they_are_simulated_and_quote_the_question(client: httpx.Client, api: str) -> None:
    long_question = QUESTION + " Please explain in detail. " * 20
    text = answer_text(api, call(client, api, long_question).json())

    assert text.startswith("[simulated sim:alpha] ")
    assert long_question[:200] in text
    assert long_question[:201] not in text
    assert "FINAL RANKING" not in text


@pytest.mark.parametrize("api", APIS)
def test_review_ends_with_a_ranking_of_exactly_the_offered_labels(client: httpx.Client, api: str) -> None:
    first = answer_text(api, call(client, api, REVIEW_PROMPT).json())
    again = answer_text(api, call(client, api, REVIEW_PROMPT).json())

    assert first.startswith("[simulated sim:alpha] ")
    ranking = ranking_of(first)
    assert sorted(ranking) == ["A", "B", "D"]
    assert ranking_of(again) == ranking
    assert [record["kind"] for record in log(client)] == ["review", "review"]


def test_review_order_depends_on_model_and_prompt() -> None:
    # Deterministic per (model, prompt) but not one fixed order for everyone: across a few models
    # at least two distinct permutations of six labels must appear.
    prompt = "\n".join(f"Response {label}:\n..." for label in "ABCDEF") + "\nFINAL RANKING:"
    with SimServer() as server, httpx.Client(base_url=server.url) as http:
        orders = {
            tuple(ranking_of(answer_text("openai", call(http, "openai", prompt, f"m{i}").json())))
            for i in range(6)
        }
    assert len(orders) > 1
    assert all(sorted(order) == list("ABCDEF") for order in orders)


def test_review_labels_ignore_the_format_example() -> None:
    assert review_labels(REVIEW_PROMPT) == ["A", "B", "D"]
    labels = [chr(ord("A") + i) for i in range(26)] + ["AA", "AB"]
    assert review_labels(" ".join(f"Response {label}" for label in reversed(labels))) == labels


@pytest.mark.parametrize("api", APIS)
def test_chairman_prompt_is_answered_not_ranked(client: httpx.Client, api: str) -> None:
    text = answer_text(api, call(client, api, SYNTHESIS_PROMPT).json())

    assert text.startswith("[simulated sim:alpha] Answer to: You are the Chairman")
    assert "FINAL RANKING" not in text
    assert log(client)[-1]["kind"] == "answer"


def test_messy_rankings_are_broken_on_purpose(client: httpx.Client) -> None:
    configure(client, messy_ranking_rate=1)
    broken = set()
    for i in range(30):
        text = answer_text("openai", call(client, "openai", REVIEW_PROMPT, model=f"m{i}").json())
        match = RANKING.search(text)
        if match is None:
            broken.add("no_ranking")
            continue
        ranking = ranking_of(text)
        assert sorted(ranking) != ["A", "B", "D"]
        broken.add("duplicate" if len(set(ranking)) < len(ranking) else "missing")

    assert broken == {"no_ranking", "duplicate", "missing"}
    assert {record["messy"] for record in log(client)} == broken
    # Stage 1 answers are never made messy.
    assert "FINAL RANKING" not in answer_text("openai", call(client, "openai", QUESTION).json())


# --- faults --------------------------------------------------------------------------------------

ERRORS: dict[str, dict[str, tuple[int, str | None]]] = {
    # kind: {api: (status, OpenAI code | Anthropic error type | Gemini status)}
    "rate_limited": {
        "openai": (429, "rate_limit_exceeded"),
        "anthropic": (429, "rate_limit_error"),
        "gemini": (429, "RESOURCE_EXHAUSTED"),
    },
    "overloaded": {
        "openai": (503, None),
        "anthropic": (529, "overloaded_error"),
        "gemini": (503, "UNAVAILABLE"),
    },
    "server": {"openai": (500, None), "anthropic": (500, "api_error"), "gemini": (500, "INTERNAL")},
    "auth": {
        "openai": (401, "invalid_api_key"),
        "anthropic": (401, "authentication_error"),
        "gemini": (401, "UNAUTHENTICATED"),
    },
    "invalid_request": {
        "openai": (400, "context_length_exceeded"),
        "anthropic": (400, "invalid_request_error"),
        "gemini": (400, "INVALID_ARGUMENT"),
    },
}


def assert_error_shape(api: str, payload: dict[str, Any], status: int, code: str | None) -> None:
    if api == "openai":
        error = payload["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["message"]
        assert error["code"] == code
    elif api == "anthropic":
        assert payload["type"] == "error"
        assert set(payload["error"]) == {"type", "message"}
        assert payload["error"]["type"] == code
        assert payload["error"]["message"]
    else:
        error = payload["error"]
        assert error["code"] == status
        assert error["status"] == code
        assert error["message"]


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("kind", sorted(ERRORS))
def test_error_kinds_use_the_real_status_and_body(client: httpx.Client, api: str, kind: str) -> None:
    configure(client, error_rate=1, error_kinds=[kind], retry_after_s=2.5)
    status, code = ERRORS[kind][api]

    response = call(client, api, QUESTION)

    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    assert_error_shape(api, response.json(), status, code)
    if kind == "rate_limited":
        assert response.headers["retry-after"] == "3"
        assert response.headers["retry-after-ms"] == "2500"
        if api == "openai":
            assert response.headers["x-ratelimit-reset-requests"] == "2.5s"
        if api == "gemini":
            assert response.json()["error"]["details"][0]["retryDelay"] == "2.5s"
    assert log(client)[-1]["outcome"] == kind


def test_openai_rate_limit_reset_header_defaults_to_one_second(client: httpx.Client) -> None:
    configure(client, error_rate=1, error_kinds=["rate_limited"])
    response = call(client, "openai", QUESTION)

    assert response.headers["x-ratelimit-reset-requests"] == "1s"
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["type"] == "requests"


@pytest.mark.parametrize("api", APIS)
def test_bad_response_is_a_200_with_truncated_json(client: httpx.Client, api: str) -> None:
    configure(client, error_rate=1, error_kinds=["bad_response"])
    response = call(client, api, QUESTION)

    assert response.status_code == 200
    assert response.content
    with pytest.raises(json.JSONDecodeError):
        response.json()


@pytest.mark.parametrize("api", APIS)
def test_empty_is_a_200_with_empty_text(client: httpx.Client, api: str) -> None:
    configure(client, error_rate=1, error_kinds=["empty"])
    response = call(client, api, QUESTION)

    assert response.status_code == 200
    assert answer_text(api, response.json()) == ""


def test_content_filter_uses_each_format_s_refusal(client: httpx.Client) -> None:
    configure(client, error_rate=1, error_kinds=["content_filter"])

    openai = call(client, "openai", QUESTION).json()
    assert openai["choices"][0]["finish_reason"] == "content_filter"
    assert openai["choices"][0]["message"]["content"] is None
    anthropic = call(client, "anthropic", QUESTION).json()
    assert anthropic["stop_reason"] == "refusal"
    assert not [block for block in anthropic["content"] if block["type"] == "text"]
    gemini = call(client, "gemini", QUESTION)
    assert gemini.status_code == 200
    [candidate] = gemini.json()["candidates"]
    assert candidate["finishReason"] == "SAFETY"
    assert not candidate.get("content", {}).get("parts")


def test_timeout_hangs_and_frees_its_slot_when_the_client_gives_up(client: httpx.Client) -> None:
    configure(client, error_rate=1, error_kinds=["timeout"], hang_s=60)

    with httpx.Client(base_url=client.base_url, timeout=0.3) as impatient, pytest.raises(httpx.ReadTimeout):
        call(impatient, "openai", QUESTION)

    [record] = log(client)
    assert record["outcome"] == "timeout"
    assert record["delay_ms"] == 60_000
    wait_until(lambda: client.get("/_sim/stats").json()["in_flight"] == 0)


def test_stop_does_not_wait_for_hung_calls() -> None:
    server = SimServer(SimConfig(error_rate=1, error_kinds=["timeout"], hang_s=60)).start()
    with httpx.Client(base_url=server.url, timeout=0.3) as http, pytest.raises(httpx.ReadTimeout):
        call(http, "anthropic", QUESTION)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 10
    server.stop()  # idempotent


def test_a_model_override_makes_only_that_model_fail(client: httpx.Client) -> None:
    configure(client, models={"sim:flaky": {"error_rate": 1, "error_kinds": ["overloaded"]}})

    assert call(client, "anthropic", QUESTION, model="sim:flaky").status_code == 529
    assert call(client, "anthropic", QUESTION, model="sim:steady").status_code == 200
    stats = client.get("/_sim/stats").json()
    assert stats["by_model"] == {"sim:flaky": {"overloaded": 1}, "sim:steady": {"ok": 1}}


def test_faults_follow_the_seed() -> None:
    def outcomes() -> list[str]:
        config = SimConfig(seed=42, error_rate=0.5, error_kinds=["server", "overloaded"])
        with SimServer(config) as server, httpx.Client(base_url=server.url) as http:
            for _ in range(20):
                call(http, "gemini", QUESTION)
            return [record["outcome"] for record in log(http)]

    first = outcomes()
    assert first == outcomes()
    assert {"ok", "server", "overloaded"} == set(first)


# --- requests the real APIs refuse ---------------------------------------------------------------


def test_missing_or_malformed_credentials_are_refused(client: httpx.Client) -> None:
    openai = call(client, "openai", QUESTION, headers={"Authorization": "Basic abc"})
    assert openai.status_code == 401
    assert_error_shape("openai", openai.json(), 401, "invalid_api_key")

    no_key = call(client, "anthropic", QUESTION, headers={"anthropic-version": "2023-06-01"})
    assert no_key.status_code == 401
    assert no_key.json()["error"]["type"] == "authentication_error"
    no_version = call(client, "anthropic", QUESTION, headers={"x-api-key": "k"})
    assert no_version.status_code == 400
    assert no_version.json()["error"]["type"] == "invalid_request_error"

    gemini = call(client, "gemini", QUESTION, headers={"content-type": "application/json"})
    assert gemini.status_code == 403
    assert gemini.json()["error"]["status"] == "PERMISSION_DENIED"
    with_query_key = client.post(
        "/v1beta/models/g:generateContent",
        params={"key": "g-test"},
        json={"contents": [{"parts": [{"text": QUESTION}]}]},
    )
    assert with_query_key.status_code == 200

    assert [r["outcome"] for r in log(client)] == ["auth", "auth", "invalid_request", "auth", "ok"]


def test_anthropic_requires_max_tokens(client: httpx.Client) -> None:
    body = {"model": "claude", "messages": [{"role": "user", "content": QUESTION}]}
    response = client.post("/v1/messages", json=body, headers=ANTHROPIC_HEADERS)

    assert response.status_code == 400
    assert response.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
    }


def test_malformed_bodies_are_invalid_requests(client: httpx.Client) -> None:
    response = client.post("/v1/chat/completions", content=b"{not json", headers=OPENAI_HEADERS)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"

    response = client.post("/v1/chat/completions", json={"model": "m"}, headers=OPENAI_HEADERS)
    assert response.status_code == 400

    response = client.post("/v1beta/models/g:generateContent", json={"contents": []}, headers=GEMINI_HEADERS)
    assert response.status_code == 400
    assert response.json()["error"]["status"] == "INVALID_ARGUMENT"


# --- control routes ------------------------------------------------------------------------------


def test_config_can_be_read_and_changed_at_runtime(client: httpx.Client) -> None:
    config = client.get("/_sim/config").json()
    assert config["latency_ms"] == 0
    assert config["error_kinds"] == ["server"]
    assert config["seed"] == 7

    changed = configure(client, error_rate=1, error_kinds=["auth"])
    assert (changed["error_rate"], changed["error_kinds"], changed["seed"]) == (1, ["auth"], 7)
    assert client.get("/_sim/config").json() == changed
    assert call(client, "openai", QUESTION).status_code == 401

    configure(client, error_rate=0)
    assert call(client, "openai", QUESTION).status_code == 200


@pytest.mark.parametrize(
    "patch",
    [
        {"error_rate": 2},
        {"error_kinds": ["meteor"]},
        {"error_kinds": []},
        {"latency_ms": -1},
        {"no_such_field": 1},
        {"models": {"m": {"seed": 1}}},
        {"models": {"m": {"error_rate": "often"}}},
        [1, 2],
    ],
)
def test_nonsense_config_is_refused_and_changes_nothing(client: httpx.Client, patch: Any) -> None:
    before = client.get("/_sim/config").json()

    response = client.post("/_sim/config", json=patch)

    assert response.status_code == 400
    assert response.json()["error"]
    assert client.get("/_sim/config").json() == before


def test_config_is_validated_in_python_too() -> None:
    with pytest.raises(ValueError, match="error_rate"):
        SimConfig(error_rate=1.5)
    with pytest.raises(ValueError, match="unknown error kinds"):
        SimConfig(error_kinds=["server", "gremlins"])


def test_log_records_every_call_and_pages_with_since(client: httpx.Client) -> None:
    call(client, "openai", QUESTION, system="System rules.")
    call(client, "anthropic", REVIEW_PROMPT, model="claude")
    call(client, "gemini", "third")

    first = log(client)
    assert [r["seq"] for r in first] == [1, 2, 3]
    assert [(r["api"], r["model"], r["kind"], r["outcome"]) for r in first] == [
        ("openai", "sim:alpha", "answer", "ok"),
        ("anthropic", "claude", "review", "ok"),
        ("gemini", "sim:alpha", "answer", "ok"),
    ]
    assert first[0]["text"] == f"System rules.\n\n{QUESTION}"
    assert first[0]["ts"] <= first[1]["ts"] <= first[2]["ts"] <= time.time()

    page = client.get("/_sim/log", params={"since": 0, "limit": 2}).json()
    assert [r["seq"] for r in page["data"]] == [1, 2]
    page = client.get("/_sim/log", params={"since": page["next"]}).json()
    assert [r["seq"] for r in page["data"]] == [3]
    assert client.get("/_sim/log", params={"since": page["next"]}).json() == {"data": [], "next": 3}

    assert client.delete("/_sim/log").status_code == 200
    assert log(client) == []
    call(client, "openai", "after clearing")
    # Seqs never restart, so a cursor taken before the clear still works.
    assert [r["seq"] for r in log(client, since=3)] == [4]


def test_log_keeps_only_the_newest_records(tmp_path: Path) -> None:
    path = tmp_path / "sim.jsonl"
    with (
        SimServer(SimConfig(log_limit=3, log_file=str(path))) as server,
        httpx.Client(base_url=server.url) as http,
    ):
        for i in range(5):
            call(http, "openai", f"question {i}")
        assert [r["seq"] for r in log(http)] == [3, 4, 5]
        configure(http, log_limit=10)
        call(http, "openai", "question 5")
        assert [r["seq"] for r in log(http)] == [3, 4, 5, 6]
    lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert [line["text"] for line in lines] == [f"question {i}" for i in range(6)]


def test_latency_is_applied(client: httpx.Client) -> None:
    configure(client, latency_ms=100)
    started = time.monotonic()
    assert call(client, "openai", QUESTION).status_code == 200
    assert time.monotonic() - started >= 0.09

    configure(client, latency_ms=100, latency_jitter_ms=60)
    for _ in range(10):
        call(client, "gemini", QUESTION)
    delays = [record["delay_ms"] for record in log(client)]
    assert delays[0] == 100
    assert all(40 <= delay <= 160 for delay in delays[1:])
    assert len(set(delays[1:])) > 1


def test_stats_count_calls_and_track_concurrency(client: httpx.Client, sim: SimServer) -> None:
    configure(client, latency_ms=400)

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=sim.url, timeout=10) as http:
            body = {"model": "sim:alpha", "messages": [{"role": "user", "content": QUESTION}]}
            calls = [
                asyncio.ensure_future(http.post("/v1/chat/completions", json=body, headers=OPENAI_HEADERS))
                for _ in range(6)
            ]
            deadline = time.monotonic() + 5
            while (await http.get("/_sim/stats")).json()["in_flight"] < 6:
                assert time.monotonic() < deadline, "the burst never ran concurrently"
            return [response.status_code for response in await asyncio.gather(*calls)]

    assert asyncio.run(burst()) == [200] * 6
    stats = client.get("/_sim/stats").json()
    assert stats["in_flight"] == 0
    assert stats["max_in_flight"] == 6
    assert stats["requests"] == 6
    assert stats["by_api"] == {"openai": {"ok": 6}}
    assert stats["by_outcome"] == {"ok": 6}

    reset = client.delete("/_sim/stats").json()
    assert (reset["requests"], reset["max_in_flight"], reset["by_api"]) == (0, 0, {})


def test_healthz(client: httpx.Client) -> None:
    assert client.get("/healthz").status_code == 200


# --- running it ----------------------------------------------------------------------------------


def test_server_can_be_restarted() -> None:
    server = SimServer()
    for _ in range(2):
        with server, httpx.Client(base_url=server.url) as http:
            assert http.get("/healthz").status_code == 200


def test_server_reports_a_busy_port() -> None:
    with SimServer() as first, pytest.raises(OSError):
        SimServer(port=first.port).start()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM is POSIX")
def test_serve_runs_in_the_foreground_until_sigterm() -> None:
    script = "from shared.sim import SimConfig, serve; serve(SimConfig(), '127.0.0.1', 0)"
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        url = line.strip().rsplit(" ", 1)[-1]
        assert url.startswith("http://127.0.0.1:"), line
        with httpx.Client(base_url=url) as http:
            assert call(http, "openai", QUESTION).status_code == 200
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
        assert process.returncode == 0, stderr.decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
