"""The ``anthropic`` wire format (SPEC §4.2) over ``httpx.MockTransport``: request shape, answer
parsing, and every status/header/body mapped into the one error taxonomy. No network."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest

from shared.providers import errors
from shared.providers.anthropic import DEFAULT_MAX_TOKENS, AnthropicProvider, ratelimit_reset_wait
from shared.providers.base import ChatRequest, ChatResult
from shared.providers.config import ProviderConfig
from tests.providerkit import MESSAGES, WireKit, page, reply

KEY = "sk-ant-api03-test-9f8e7d6c5b4a3f2e1d0c"
CONFIG = ProviderConfig(
    name="anthropic",
    api="anthropic",
    base_url="https://api.anthropic.test",
    api_key_env="ANTHROPIC_API_KEY",
    timeout_s=5.0,
)
REQUEST = ChatRequest(model="claude-3-5-haiku-latest", messages=MESSAGES, max_tokens=256, temperature=0.2)


def message(
    *blocks: dict[str, Any],
    stop_reason: str = "end_turn",
    input_tokens: int = 14,
    output_tokens: int = 6,
) -> dict[str, Any]:
    """A Message object as the Anthropic API reference shows it."""
    return {
        "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
        "type": "message",
        "role": "assistant",
        "model": "claude-3-5-haiku-20241022",
        "content": list(blocks) if blocks else [{"type": "text", "text": "Paris."}],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {
            "input_tokens": input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": output_tokens,
        },
    }


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def error_body(type_: str, message_: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"type": type_, "message": message_}
    if details is not None:
        error["details"] = details
    return {"type": "error", "error": error, "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy"}


KIT = WireKit(AnthropicProvider, CONFIG, KEY, REQUEST, message)
call = KIT.call
fail = KIT.fail
sent_bodies = KIT.sent_bodies


def rfc3339(seconds_from_now: float) -> str:
    moment = datetime.now(UTC) + timedelta(seconds=seconds_from_now)
    return moment.isoformat().replace("+00:00", "Z")


# -- requests -----------------------------------------------------------------------------------


def test_request_is_a_keyed_post_to_v1_messages_with_the_documented_body() -> None:
    (request,) = KIT.sent()

    assert request.method == "POST"
    assert str(request.url) == "https://api.anthropic.test/v1/messages"
    assert request.headers["x-api-key"] == KEY
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert request.headers["content-type"] == "application/json"
    assert "authorization" not in request.headers
    assert orjson.loads(request.content) == {
        "model": "claude-3-5-haiku-latest",
        "max_tokens": 256,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0.2,
    }


def test_max_tokens_defaults_and_temperature_is_omitted_when_none() -> None:
    bodies = sent_bodies(ChatRequest(model="claude-3-5-haiku-latest", messages=MESSAGES[1:]))

    assert DEFAULT_MAX_TOKENS == 1024
    assert bodies == [
        {
            "model": "claude-3-5-haiku-latest",
            "max_tokens": 1024,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
        }
    ]


def test_temperature_zero_is_sent_not_dropped() -> None:
    bodies = sent_bodies(ChatRequest(model="claude-3-5-haiku-latest", messages=MESSAGES, temperature=0.0))

    assert bodies[0]["temperature"] == 0.0


def test_system_messages_are_joined_and_same_role_messages_merged_to_alternate() -> None:
    messages = (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Question one."},
        {"role": "system", "content": "Answer in English."},
        {"role": "user", "content": "Question two."},
        {"role": "assistant", "content": "Answer one."},
        {"role": "assistant", "content": "Answer two."},
        {"role": "user", "content": "Thanks; and?"},
    )

    (body,) = sent_bodies(ChatRequest(model="claude-3-5-haiku-latest", messages=messages))

    assert body["system"] == "Be brief.\n\nAnswer in English."
    assert body["messages"] == [
        {"role": "user", "content": "Question one.\n\nQuestion two."},
        {"role": "assistant", "content": "Answer one.\n\nAnswer two."},
        {"role": "user", "content": "Thanks; and?"},
    ]


@pytest.mark.parametrize(
    "messages",
    [
        ({"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hello."}),
        ({"role": "system", "content": "Be brief."},),
        ({"role": "tool", "content": "42"},),
    ],
    ids=["assistant-first", "system-only", "unknown-role"],
)
def test_requests_anthropic_would_refuse_fail_before_any_call(messages: tuple[dict[str, str], ...]) -> None:
    handler, calls = KIT.recorder()

    exc = fail(handler, ChatRequest(model="claude-3-5-haiku-latest", messages=messages))

    assert exc.category == "invalid_request"
    assert not exc.transient
    assert calls == []


def test_no_key_sends_no_x_api_key_header() -> None:
    seen = KIT.sent(key=None)

    assert "x-api-key" not in seen[0].headers
    assert seen[0].headers["anthropic-version"] == "2023-06-01"


# -- answers ------------------------------------------------------------------------------------


def test_success_returns_text_and_usage() -> None:
    result = call(reply(200, message(text("Paris is the capital."), input_tokens=21, output_tokens=7)))

    assert result == ChatResult(text="Paris is the capital.", input_tokens=21, output_tokens=7)


def test_text_blocks_are_concatenated_and_other_blocks_skipped() -> None:
    body = message(
        {"type": "thinking", "thinking": "The user wants a capital.", "signature": "EqQB"},
        text("Paris"),
        {"type": "tool_use", "id": "toolu_01", "name": "lookup", "input": {"q": "France"}},
        text(" is the capital."),
    )

    assert call(reply(200, body)).text == "Paris is the capital."


def test_max_tokens_stop_still_returns_the_truncated_answer() -> None:
    result = call(reply(200, message(text("Paris is the capital of"), stop_reason="max_tokens")))

    assert result.text == "Paris is the capital of"


def test_missing_usage_counts_zero_tokens() -> None:
    body = message()
    del body["usage"]

    assert call(reply(200, body)) == ChatResult(text="Paris.", input_tokens=0, output_tokens=0)


@pytest.mark.parametrize(
    "blocks", [[], [text("I can't help with th")]], ids=["no-content", "partial-content"]
)
def test_stop_reason_refusal_is_content_filter(blocks: list[dict[str, Any]]) -> None:
    body = message(stop_reason="refusal")
    body["content"] = blocks

    exc = fail(reply(200, body))

    assert isinstance(exc, errors.ContentFiltered)
    assert exc.category == "content_filter"
    assert not exc.transient


@pytest.mark.parametrize(
    "blocks",
    [
        [],
        [text("")],
        [text("  \n")],
        [{"type": "tool_use", "id": "toolu_01", "name": "lookup", "input": {}}],
    ],
    ids=["empty", "empty-text", "blank-text", "no-text-block"],
)
def test_answer_without_text_is_bad_response(blocks: list[dict[str, Any]]) -> None:
    body = message()
    body["content"] = blocks

    exc = fail(reply(200, body))

    assert isinstance(exc, errors.BadResponse)
    assert exc.category == "bad_response"
    assert exc.transient


@pytest.mark.parametrize(
    "body",
    [
        {"id": "msg_1", "type": "message", "usage": {"input_tokens": 1}},
        {"id": "msg_1", "type": "message", "content": "Paris."},
        ["not", "an", "object"],
    ],
    ids=["no-content", "content-not-a-list", "array"],
)
def test_malformed_answer_is_bad_response(body: Any) -> None:
    assert fail(reply(200, body)).category == "bad_response"


def test_non_json_200_is_bad_response() -> None:
    exc = fail(page(200, '{"id": "msg_1", "content": [{"type": "te'))

    assert exc.category == "bad_response"
    assert exc.status == 200


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "category", "transient"),
    [
        (
            400,
            error_body("invalid_request_error", "prompt is too long: 201234 tokens > 200000 maximum"),
            "invalid_request",
            False,
        ),
        (401, error_body("authentication_error", "invalid x-api-key"), "auth", False),
        (
            402,
            error_body("billing_error", "Your credit balance is too low to access the API."),
            "auth",
            False,
        ),
        (
            403,
            error_body(
                "permission_error", "Your API key does not have permission to use the specified resource."
            ),
            "auth",
            False,
        ),
        (404, error_body("not_found_error", "model: claude-9-opus"), "invalid_request", False),
        (
            413,
            error_body("request_too_large", "Request exceeds the maximum allowed number of bytes."),
            "invalid_request",
            False,
        ),
        (
            429,
            error_body("rate_limit_error", "This request would exceed your organization's rate limit."),
            "rate_limited",
            True,
        ),
        (500, error_body("api_error", "Internal server error"), "server", True),
        (504, error_body("timeout_error", "Request timed out"), "timeout", True),
        (529, error_body("overloaded_error", "Overloaded"), "overloaded", True),
    ],
    ids=["400", "401", "402", "403", "404", "413", "429", "500", "504", "529"],
)
def test_error_type_maps_to_category(status: int, body: Any, category: str, transient: bool) -> None:
    exc = fail(reply(status, body))

    assert exc.category == category
    assert exc.transient is transient
    assert exc.status == status
    assert exc.message.startswith(f"HTTP {status} {body['error']['type']}: ")
    assert body["error"]["message"][:40] in exc.message


def test_error_type_wins_over_status() -> None:
    # An overload reported through a gateway's 500 is still an overload.
    exc = fail(reply(500, error_body("overloaded_error", "Overloaded")))

    assert exc.category == "overloaded"


@pytest.mark.parametrize(
    ("status", "category"),
    [(413, "invalid_request"), (502, "server"), (503, "overloaded"), (529, "overloaded"), (401, "auth")],
)
def test_error_without_an_anthropic_body_is_mapped_by_status(status: int, category: str) -> None:
    # A Cloudflare or proxy page (Anthropic's 413 comes from Cloudflare), not Anthropic's JSON.
    exc = fail(page(status, f"<html><center><h1>{status}</h1></center></html>"))

    assert exc.category == category
    assert exc.message == f"HTTP {status}"


def test_unknown_error_type_is_mapped_by_status() -> None:
    assert fail(reply(400, error_body("novel_error", "Something new"))).category == "invalid_request"
    assert fail(reply(502, error_body("gateway_error", "Bad gateway"))).category == "server"


def test_spend_limit_429_is_auth_not_transient() -> None:
    body = error_body(
        "rate_limit_error",
        "You have reached your monthly usage limit. Access resumes on the 1st at 00:00 UTC.",
        {"error_code": "enforced_spend_limit_reached"},
    )

    exc = fail(reply(429, body))

    assert isinstance(exc, errors.AuthError)
    assert not exc.transient
    assert exc.status == 429


def test_long_error_messages_are_truncated() -> None:
    exc = fail(reply(400, error_body("invalid_request_error", "x" * 5000)))

    assert len(exc.message) < 400


def test_error_echoing_the_key_does_not_leak_it() -> None:
    exc = fail(reply(401, error_body("authentication_error", f"invalid x-api-key: {KEY}")))

    assert exc.category == "auth"
    assert "[redacted]" in exc.message


# -- wait hints ---------------------------------------------------------------------------------

RATE_LIMIT = error_body(
    "rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit"
)


def test_429_with_retry_after_is_rate_limited_with_hint() -> None:
    exc = fail(reply(429, RATE_LIMIT, {"retry-after": "12"}))

    assert isinstance(exc, errors.RateLimited)
    assert exc.retry_after == 12.0


def test_529_carries_its_retry_after() -> None:
    exc = fail(reply(529, error_body("overloaded_error", "Overloaded"), {"retry-after": "3"}))

    assert exc.category == "overloaded"
    assert exc.retry_after == 3.0


def test_retry_after_wins_over_reset_headers() -> None:
    headers = {"retry-after": "2", "anthropic-ratelimit-tokens-reset": rfc3339(300)}

    assert fail(reply(429, RATE_LIMIT, headers)).retry_after == 2.0


def test_429_without_retry_after_waits_for_the_earliest_reset() -> None:
    headers = {
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-reset": rfc3339(40),
        "anthropic-ratelimit-tokens-limit": "40000",
        "anthropic-ratelimit-tokens-reset": rfc3339(20),
    }

    exc = fail(reply(429, RATE_LIMIT, headers))

    assert exc.category == "rate_limited"
    assert exc.retry_after == pytest.approx(20, abs=2)


def test_reset_in_the_past_waits_zero_not_negative() -> None:
    exc = fail(reply(429, RATE_LIMIT, {"anthropic-ratelimit-requests-reset": rfc3339(-30)}))

    assert exc.retry_after == 0.0


def test_429_without_any_hint_has_none() -> None:
    exc = fail(reply(429, RATE_LIMIT, {"anthropic-ratelimit-requests-reset": "soon"}))

    assert exc.category == "rate_limited"
    assert exc.retry_after is None


def test_permanent_errors_carry_no_wait_hint() -> None:
    exc = fail(reply(401, error_body("authentication_error", "invalid x-api-key"), {"retry-after": "5"}))

    assert exc.retry_after is None


NOW = datetime(2025, 10, 25, 12, 0, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"anthropic-ratelimit-requests-reset": "2025-10-25T12:00:30Z"}, 30.0),
        ({"anthropic-ratelimit-tokens-reset": "2025-10-25T12:00:01.5Z"}, 1.5),
        ({"anthropic-ratelimit-input-tokens-reset": "2025-10-25T14:00:05+02:00"}, 5.0),
        ({"anthropic-ratelimit-output-tokens-reset": "2025-10-25T12:00:07"}, 7.0),
        (
            {
                "anthropic-ratelimit-requests-reset": "2025-10-25T12:00:40Z",
                "anthropic-ratelimit-input-tokens-reset": "2025-10-25T12:00:10Z",
                "anthropic-ratelimit-output-tokens-reset": "2025-10-25T12:00:25Z",
            },
            10.0,
        ),
        (
            # The limits that ran out must all refill; the others are irrelevant.
            {
                "anthropic-ratelimit-requests-remaining": "49",
                "anthropic-ratelimit-requests-reset": "2025-10-25T12:00:01Z",
                "anthropic-ratelimit-input-tokens-remaining": "0",
                "anthropic-ratelimit-input-tokens-reset": "2025-10-25T12:00:12Z",
                "anthropic-ratelimit-output-tokens-remaining": "0",
                "anthropic-ratelimit-output-tokens-reset": "2025-10-25T12:00:18Z",
            },
            18.0,
        ),
        ({"anthropic-ratelimit-requests-reset": "2025-10-25T11:59:00Z"}, 0.0),
        (
            {
                "anthropic-ratelimit-requests-reset": "garbage",
                "anthropic-ratelimit-tokens-reset": "2025-10-25T12:00:09Z",
            },
            9.0,
        ),
    ],
    ids=[
        "requests",
        "fractional",
        "offset",
        "naive-is-utc",
        "earliest",
        "exhausted-latest",
        "past",
        "one-malformed",
    ],
)
def test_ratelimit_reset_wait(headers: dict[str, str], seconds: float) -> None:
    assert ratelimit_reset_wait(httpx.Headers(headers), NOW) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "headers",
    [{}, {"anthropic-ratelimit-requests-reset": "tomorrow"}, {"retry-after": "5"}],
    ids=["none", "malformed", "unrelated"],
)
def test_ratelimit_reset_wait_without_reset_headers_is_none(headers: dict[str, str]) -> None:
    assert ratelimit_reset_wait(httpx.Headers(headers), time.time()) is None
