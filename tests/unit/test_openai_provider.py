"""The ``openai`` wire format (SPEC §4.2) over ``httpx.MockTransport``: request shape, answer
parsing, and every status/header/body mapped into the one error taxonomy. No network."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest

from shared.providers import errors
from shared.providers.base import ChatRequest, ChatResult
from shared.providers.config import ProviderConfig
from shared.providers.openai import OpenAIProvider, _reset_seconds
from tests.providerkit import MESSAGES, WireKit, page, raising, reply

KEY = "sk-test-9f8e7d6c5b4a3f2e1d0c"
CONFIG = ProviderConfig(
    name="openai",
    api="openai",
    base_url="https://api.openai.test/v1",
    api_key_env="OPENAI_API_KEY",
    timeout_s=5.0,
)
REQUEST = ChatRequest(model="gpt-4o-mini", messages=MESSAGES, max_tokens=256, temperature=0.2)


def completion(
    content: str | None = "Paris.",
    *,
    finish_reason: str = "stop",
    prompt_tokens: int = 19,
    completion_tokens: int = 10,
) -> dict[str, Any]:
    """A chat completion object as the OpenAI API reference shows it."""
    return {
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion",
        "created": 1741570283,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_06737a9306",
    }


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


KIT = WireKit(OpenAIProvider, CONFIG, KEY, REQUEST, completion)
call = KIT.call
fail = KIT.fail
sent_bodies = KIT.sent_bodies


# -- requests -----------------------------------------------------------------------------------


def test_request_is_a_bearer_post_to_chat_completions_with_the_documented_body() -> None:
    (request,) = KIT.sent()

    assert request.method == "POST"
    assert str(request.url) == "https://api.openai.test/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"] == "application/json"
    assert orjson.loads(request.content) == {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        "max_tokens": 256,
        "temperature": 0.2,
    }


def test_max_tokens_and_temperature_are_omitted_when_none() -> None:
    seen = sent_bodies(ChatRequest(model="gpt-4o", messages=MESSAGES[1:]))

    assert seen == [{"model": "gpt-4o", "messages": [dict(MESSAGES[1])]}]


def test_temperature_zero_is_sent_not_dropped() -> None:
    seen = sent_bodies(ChatRequest(model="gpt-4o", messages=MESSAGES, max_tokens=None, temperature=0.0))

    assert seen[0]["temperature"] == 0.0
    assert "max_tokens" not in seen[0]


def test_no_key_sends_no_authorization_header() -> None:
    seen = KIT.sent(key=None)

    assert "authorization" not in seen[0].headers


# -- answers ------------------------------------------------------------------------------------


def test_success_returns_text_and_usage() -> None:
    result = call(reply(200, completion("Paris is the capital.", prompt_tokens=21, completion_tokens=7)))

    assert result == ChatResult(text="Paris is the capital.", input_tokens=21, output_tokens=7)


def test_missing_usage_counts_zero_tokens() -> None:
    body = completion("Paris.")
    del body["usage"]

    assert call(reply(200, body)) == ChatResult(text="Paris.", input_tokens=0, output_tokens=0)


def test_finish_reason_content_filter_is_content_filter() -> None:
    exc = fail(reply(200, completion("I can't help with th", finish_reason="content_filter")))

    assert isinstance(exc, errors.ContentFiltered)
    assert exc.category == "content_filter"
    assert not exc.transient


def test_content_filter_error_code_is_content_filter() -> None:
    body = error_body(
        "The response was filtered due to the prompt triggering the content management policy.",
        "invalid_request_error",
        "content_filter",
        "prompt",
    )
    exc = fail(reply(400, body))

    assert exc.category == "content_filter"
    assert exc.status == 400


@pytest.mark.parametrize("content", [None, "", "   \n"], ids=["null", "empty", "blank"])
def test_empty_content_is_bad_response(content: str | None) -> None:
    exc = fail(reply(200, completion(content)))

    assert isinstance(exc, errors.BadResponse)
    assert exc.category == "bad_response"


def test_non_json_200_is_bad_response() -> None:
    exc = fail(page(200, "<html><body>upstream gateway</body></html>"))

    assert exc.category == "bad_response"
    assert exc.status == 200


def test_empty_200_body_is_bad_response() -> None:
    assert fail(page(200)).category == "bad_response"


@pytest.mark.parametrize(
    "body",
    [
        {"id": "chatcmpl-1", "object": "chat.completion", "usage": {"prompt_tokens": 1}},
        {"id": "chatcmpl-1", "object": "chat.completion", "choices": []},
        {"id": "chatcmpl-1", "object": "chat.completion", "choices": [{"index": 0}]},
        ["not", "an", "object"],
    ],
    ids=["no-choices", "empty-choices", "no-message", "array"],
)
def test_missing_choices_is_bad_response(body: Any) -> None:
    assert fail(reply(200, body)).category == "bad_response"


# -- rate limits and wait hints -----------------------------------------------------------------

RATE_LIMIT = error_body(
    "Rate limit reached for gpt-4o-mini in organization org-abc on requests per min (RPM): "
    "Limit 500, Used 500, Requested 1. Please try again in 120ms.",
    "requests",
    "rate_limit_exceeded",
)


def test_429_with_retry_after_is_rate_limited_with_hint() -> None:
    exc = fail(reply(429, RATE_LIMIT, {"retry-after": "20"}))

    assert isinstance(exc, errors.RateLimited)
    assert exc.category == "rate_limited"
    assert exc.transient
    assert exc.status == 429
    assert exc.retry_after == 20.0
    assert "HTTP 429" in exc.message
    assert "Rate limit reached" in exc.message


def test_429_with_retry_after_ms_uses_milliseconds() -> None:
    exc = fail(reply(429, RATE_LIMIT, {"retry-after-ms": "1500"}))

    assert exc.category == "rate_limited"
    assert exc.retry_after == 1.5


def test_retry_after_ms_takes_precedence_over_retry_after() -> None:
    exc = fail(reply(429, RATE_LIMIT, {"retry-after-ms": "250", "retry-after": "1"}))

    assert exc.retry_after == 0.25


def test_429_with_only_openai_reset_headers_waits_for_the_later_reset() -> None:
    headers = {
        "x-ratelimit-limit-requests": "500",
        "x-ratelimit-limit-tokens": "200000",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    exc = fail(reply(429, RATE_LIMIT, headers))

    assert exc.category == "rate_limited"
    assert exc.retry_after == 360.0


def test_429_with_one_reset_header_uses_it() -> None:
    exc = fail(reply(429, RATE_LIMIT, {"x-ratelimit-reset-requests": "20ms"}))

    assert exc.retry_after == pytest.approx(0.02)


def test_retry_after_wins_over_reset_headers() -> None:
    headers = {"retry-after": "2", "x-ratelimit-reset-tokens": "6m0s"}

    assert fail(reply(429, RATE_LIMIT, headers)).retry_after == 2.0


def test_429_without_any_hint_has_none() -> None:
    exc = fail(reply(429, RATE_LIMIT))

    assert exc.category == "rate_limited"
    assert exc.retry_after is None


def test_429_with_a_malformed_reset_header_is_still_rate_limited() -> None:
    headers = {"x-ratelimit-reset-requests": "1.2.3s", "x-ratelimit-reset-tokens": "6m0s"}
    exc = fail(reply(429, RATE_LIMIT, headers))

    assert exc.category == "rate_limited"
    assert exc.retry_after == 360.0


def test_429_insufficient_quota_is_auth_not_transient() -> None:
    body = error_body(
        "You exceeded your current quota, please check your plan and billing details. For more "
        "information on this error, read the docs: "
        "https://platform.openai.com/docs/guides/error-codes/api-errors.",
        "insufficient_quota",
        "insufficient_quota",
    )
    exc = fail(reply(429, body, {"x-ratelimit-reset-requests": "1s"}))

    assert isinstance(exc, errors.AuthError)
    assert exc.category == "auth"
    assert not exc.transient
    assert exc.status == 429


# -- statuses -----------------------------------------------------------------------------------

SERVER_ERROR = error_body(
    "The server had an error while processing your request. Sorry about that!", "server_error", None
)
OVERLOADED = error_body("The engine is currently overloaded, please try again later.", "server_error", None)


@pytest.mark.parametrize(
    ("status", "body", "category", "transient"),
    [
        (500, SERVER_ERROR, "server", True),
        (502, None, "server", True),
        (503, OVERLOADED, "overloaded", True),
        (
            401,
            error_body(
                "Incorrect API key provided: sk-test-****0c. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                "invalid_request_error",
                "invalid_api_key",
            ),
            "auth",
            False,
        ),
        (
            403,
            error_body(
                "Country, region, or territory not supported",
                "request_forbidden",
                "unsupported_country_region_territory",
            ),
            "auth",
            False,
        ),
        (
            400,
            error_body(
                "This model's maximum context length is 128000 tokens. However, your messages "
                "resulted in 130512 tokens. Please reduce the length of the messages.",
                "invalid_request_error",
                "context_length_exceeded",
                "messages",
            ),
            "invalid_request",
            False,
        ),
        (
            404,
            error_body(
                "The model `gpt-5-turbo-max` does not exist or you do not have access to it.",
                "invalid_request_error",
                "model_not_found",
            ),
            "invalid_request",
            False,
        ),
        (
            422,
            error_body("Unprocessable entity", "invalid_request_error", None),
            "invalid_request",
            False,
        ),
    ],
    ids=["500", "502-no-body", "503", "401", "403", "400-context", "404", "422"],
)
def test_status_maps_to_category(status: int, body: Any, category: str, transient: bool) -> None:
    exc = fail(reply(status, body))

    assert exc.category == category
    assert exc.transient is transient
    assert exc.status == status
    assert exc.message.startswith(f"HTTP {status}")
    if body is not None:
        assert body["error"]["message"][:40] in exc.message


def test_503_carries_its_retry_after() -> None:
    exc = fail(reply(503, OVERLOADED, {"retry-after": "3"}))

    assert exc.category == "overloaded"
    assert exc.retry_after == 3.0


def test_non_json_error_page_is_mapped_by_status() -> None:
    exc = fail(page(500, "<html><h1>500 Internal Server Error</h1></html>"))

    assert exc.category == "server"
    assert exc.message == "HTTP 500"


def test_long_error_messages_are_truncated() -> None:
    exc = fail(reply(400, error_body("x" * 5000, "invalid_request_error", None)))

    assert len(exc.message) < 400


def test_error_echoing_the_key_does_not_leak_it() -> None:
    # Some OpenAI-compatible servers echo the rejected key verbatim; SPEC §9: never in errors.
    body = error_body(f"Invalid API key: {KEY}", "invalid_request_error", "invalid_api_key")

    exc = fail(reply(401, body))

    assert exc.category == "auth"


# -- transport ----------------------------------------------------------------------------------


def test_connection_error_is_network() -> None:
    exc = fail(raising(httpx.ConnectError, "[Errno 111] Connection refused"))

    assert isinstance(exc, errors.NetworkError)
    assert exc.category == "network"
    assert exc.transient
    assert "ConnectError" in exc.message


def test_read_error_is_network() -> None:
    assert fail(raising(httpx.ReadError, "connection reset by peer")).category == "network"


def test_transport_timeout_is_timeout() -> None:
    exc = fail(raising(httpx.ReadTimeout, "timed out"))

    assert isinstance(exc, errors.Timeout)
    assert exc.category == "timeout"
    assert exc.transient


def test_answer_slower_than_timeout_s_is_timeout() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(1)
        return httpx.Response(200, json=completion())

    config = ProviderConfig(name="slow", api="openai", base_url="https://slow.test/v1", timeout_s=0.05)
    exc = fail(handler, config=config)

    assert exc.category == "timeout"
    assert "0.05" in exc.message


# -- x-ratelimit-reset-* durations --------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("0.5s", 0.5),
        ("17ms", 0.017),
        ("1m30s", 90.0),
        ("2h", 7200.0),
    ],
)
def test_reset_seconds_parses_go_durations(value: str, seconds: float) -> None:
    assert _reset_seconds(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [None, "", "garbage", "10", "1x", "1s5", "-1s", "1.2.3s", ".s"])
def test_reset_seconds_rejects_garbage(value: str | None) -> None:
    assert _reset_seconds(value) is None
