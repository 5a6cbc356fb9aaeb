"""The ``gemini`` wire format (SPEC §4.2) over ``httpx.MockTransport``: request shape, answer
parsing, safety blocks, and every status/header/body mapped into the one error taxonomy. No network."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from shared.providers import errors
from shared.providers.base import ChatRequest, ChatResult
from shared.providers.config import ProviderConfig
from shared.providers.gemini import GeminiProvider, retry_info_delay
from tests.providerkit import MESSAGES, WireKit, page, reply

KEY = "AIzaSyTest-9f8e7d6c5b4a3f2e1d0c"
CONFIG = ProviderConfig(
    name="google",
    api="gemini",
    base_url="https://generativelanguage.googleapis.test",
    api_key_env="GEMINI_API_KEY",
    timeout_s=5.0,
)
REQUEST = ChatRequest(model="gemini-2.0-flash", messages=MESSAGES, max_tokens=256, temperature=0.2)


def response(
    *parts: dict[str, Any],
    finish_reason: str = "STOP",
    prompt_tokens: int = 10,
    candidates_tokens: int | None = 4,
) -> dict[str, Any]:
    """A GenerateContentResponse as the Gemini API reference shows it."""
    usage: dict[str, Any] = {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens}
    if candidates_tokens is not None:
        usage["candidatesTokenCount"] = candidates_tokens
        usage["totalTokenCount"] += candidates_tokens
    return {
        "candidates": [
            {
                "content": {"parts": list(parts) if parts else [{"text": "Paris."}], "role": "model"},
                "finishReason": finish_reason,
                "avgLogprobs": -0.0123,
            }
        ],
        "usageMetadata": usage,
        "modelVersion": "gemini-2.0-flash",
        "responseId": "ZJ2hZ-mHNqSlmNAPzJ2n-Qo",
    }


def error_body(code: int, status: str, message: str, *details: dict[str, Any]) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = list(details)
    return {"error": error}


def retry_info(delay: str) -> dict[str, Any]:
    return {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}


def error_info(reason: str) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": reason,
        "domain": "googleapis.com",
        "metadata": {"service": "generativelanguage.googleapis.com"},
    }


QUOTA_FAILURE = {
    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
    "violations": [
        {
            "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
            "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
            "quotaValue": "15",
        }
    ],
}
HELP = {
    "@type": "type.googleapis.com/google.rpc.Help",
    "links": [{"description": "Learn more about Gemini API quotas", "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}],
}  # fmt: skip
RATE_LIMIT = error_body(
    429,
    "RESOURCE_EXHAUSTED",
    "You exceeded your current quota, please check your plan and billing details.",
    QUOTA_FAILURE,
    HELP,
    retry_info("7s"),
)


KIT = WireKit(GeminiProvider, CONFIG, KEY, REQUEST, response)
call = KIT.call
fail = KIT.fail
sent_bodies = KIT.sent_bodies


# -- requests -----------------------------------------------------------------------------------


def test_request_is_a_keyed_post_to_generate_content_with_the_documented_body() -> None:
    (request,) = KIT.sent()

    assert request.method == "POST"
    assert str(request.url) == (
        "https://generativelanguage.googleapis.test/v1beta/models/gemini-2.0-flash:generateContent"
    )
    assert request.headers["x-goog-api-key"] == KEY
    assert request.headers["content-type"] == "application/json"
    assert "authorization" not in request.headers
    # The key travels in the header only, never in the URL where logs would keep it.
    assert KEY not in str(request.url)
    assert orjson.loads(request.content) == {
        "contents": [{"role": "user", "parts": [{"text": "What is the capital of France?"}]}],
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "generationConfig": {"maxOutputTokens": 256, "temperature": 0.2},
    }


def test_generation_config_and_system_instruction_are_omitted_when_unset() -> None:
    bodies = sent_bodies(ChatRequest(model="gemini-2.0-flash", messages=MESSAGES[1:]))

    assert bodies == [{"contents": [{"role": "user", "parts": [{"text": "What is the capital of France?"}]}]}]


def test_temperature_zero_is_sent_not_dropped() -> None:
    bodies = sent_bodies(ChatRequest(model="gemini-2.0-flash", messages=MESSAGES, temperature=0.0))

    assert bodies[0]["generationConfig"] == {"temperature": 0.0}


def test_assistant_becomes_model_systems_are_joined_and_same_role_messages_merged() -> None:
    messages = (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Question one."},
        {"role": "user", "content": "Question two."},
        {"role": "assistant", "content": "Answer one."},
        {"role": "system", "content": "Answer in English."},
        {"role": "assistant", "content": "Answer two."},
        {"role": "user", "content": "Thanks; and?"},
    )

    (body,) = sent_bodies(ChatRequest(model="gemini-2.0-flash", messages=messages))

    assert body["systemInstruction"] == {"parts": [{"text": "Be brief.\n\nAnswer in English."}]}
    assert body["contents"] == [
        {"role": "user", "parts": [{"text": "Question one.\n\nQuestion two."}]},
        {"role": "model", "parts": [{"text": "Answer one.\n\nAnswer two."}]},
        {"role": "user", "parts": [{"text": "Thanks; and?"}]},
    ]


def test_model_name_is_escaped_as_a_path_segment() -> None:
    seen = KIT.sent(ChatRequest(model="tuned/odd name?", messages=MESSAGES))

    assert seen[0].url.raw_path == b"/v1beta/models/tuned%2Fodd%20name%3F:generateContent"


@pytest.mark.parametrize(
    "messages",
    [({"role": "system", "content": "Be brief."},), ({"role": "tool", "content": "42"},)],
    ids=["system-only", "unknown-role"],
)
def test_requests_gemini_would_refuse_fail_before_any_call(messages: tuple[dict[str, str], ...]) -> None:
    handler, calls = KIT.recorder()

    exc = fail(handler, ChatRequest(model="gemini-2.0-flash", messages=messages))

    assert exc.category == "invalid_request"
    assert calls == []


def test_no_key_sends_no_key_header() -> None:
    seen = KIT.sent(key=None)

    assert "x-goog-api-key" not in seen[0].headers


# -- answers ------------------------------------------------------------------------------------


def test_success_returns_text_and_usage() -> None:
    result = call(
        reply(200, response({"text": "Paris is the capital."}, prompt_tokens=21, candidates_tokens=7))
    )

    assert result == ChatResult(text="Paris is the capital.", input_tokens=21, output_tokens=7)


def test_parts_are_concatenated_and_thoughts_skipped() -> None:
    body = response(
        {"text": "The user wants a capital.", "thought": True},
        {"text": "Paris"},
        {"text": " is the capital."},
    )

    assert call(reply(200, body)).text == "Paris is the capital."


def test_max_tokens_finish_still_returns_the_truncated_answer() -> None:
    assert call(reply(200, response({"text": "Paris is"}, finish_reason="MAX_TOKENS"))).text == "Paris is"


def test_missing_usage_counts_zero_tokens() -> None:
    body = response(candidates_tokens=None)
    assert call(reply(200, body)) == ChatResult(text="Paris.", input_tokens=10, output_tokens=0)

    del body["usageMetadata"]
    assert call(reply(200, body)) == ChatResult(text="Paris.", input_tokens=0, output_tokens=0)


@pytest.mark.parametrize("reason", ["SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII"])
def test_filtered_finish_reason_is_content_filter(reason: str) -> None:
    # A blocked candidate has no content, only the reason (and the ratings that tripped it).
    body = {
        "candidates": [
            {
                "finishReason": reason,
                "index": 0,
                "safetyRatings": [
                    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}
                ],
            }
        ],
        "usageMetadata": {"promptTokenCount": 12, "totalTokenCount": 12},
    }

    exc = fail(reply(200, body))

    assert isinstance(exc, errors.ContentFiltered)
    assert exc.category == "content_filter"
    assert not exc.transient
    assert reason in exc.message


def test_filtered_finish_reason_with_partial_text_is_still_content_filter() -> None:
    assert (
        fail(reply(200, response({"text": "Here is how"}, finish_reason="SAFETY"))).category
        == "content_filter"
    )


@pytest.mark.parametrize("reason", ["SAFETY", "PROHIBITED_CONTENT", "OTHER"])
def test_blocked_prompt_is_content_filter(reason: str) -> None:
    body = {
        "promptFeedback": {"blockReason": reason},
        "usageMetadata": {"promptTokenCount": 12559, "totalTokenCount": 12559},
        "modelVersion": "gemini-1.5-flash-002",
    }

    exc = fail(reply(200, body))

    assert exc.category == "content_filter"
    assert reason in exc.message


@pytest.mark.parametrize(
    "body",
    [
        {"usageMetadata": {"promptTokenCount": 3}},
        {"candidates": []},
        {"candidates": [{"finishReason": "STOP", "index": 0}]},
        {"candidates": [{"content": {"role": "model", "parts": []}, "finishReason": "MAX_TOKENS"}]},
        {"candidates": [{"content": {"role": "model", "parts": [{"text": ""}]}, "finishReason": "STOP"}]},
        {"candidates": [{"content": {"role": "model", "parts": [{"text": " \n"}]}, "finishReason": "STOP"}]},
        {"candidates": ["Paris."]},
        {"promptFeedback": {"blockReason": "BLOCK_REASON_UNSPECIFIED"}},
        ["not", "an", "object"],
    ],
    ids=[
        "no-candidates",
        "empty-candidates",
        "no-content",
        "no-parts",
        "empty-text",
        "blank-text",
        "candidate-not-object",
        "unspecified-block",
        "array",
    ],
)
def test_empty_or_malformed_answer_is_bad_response(body: Any) -> None:
    exc = fail(reply(200, body))

    assert isinstance(exc, errors.BadResponse)
    assert exc.category == "bad_response"
    assert exc.transient


def test_non_json_200_is_bad_response() -> None:
    exc = fail(page(200, '{"candidates": [{"content": {"parts": [{"text": "Par'))

    assert exc.category == "bad_response"
    assert exc.status == 200


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "category", "transient"),
    [
        (429, RATE_LIMIT, "rate_limited", True),
        (
            503,
            error_body(503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
            "overloaded",
            True,
        ),
        (
            500,
            error_body(
                500,
                "INTERNAL",
                "An internal error has occurred. Please retry or report in "
                "https://developers.generativeai.google/guide/troubleshooting",
            ),
            "server",
            True,
        ),
        (
            504,
            error_body(504, "DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
            "timeout",
            True,
        ),
        (
            401,
            error_body(401, "UNAUTHENTICATED", "Request had invalid authentication credentials."),
            "auth",
            False,
        ),
        (
            403,
            error_body(
                403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers. Please use an API key."
            ),
            "auth",
            False,
        ),
        (
            400,
            error_body(
                400,
                "INVALID_ARGUMENT",
                "The input token count (1048577) exceeds the maximum number of tokens allowed (1048576).",
            ),
            "invalid_request",
            False,
        ),
        (
            400,
            error_body(400, "FAILED_PRECONDITION", "User location is not supported for the API use."),
            "invalid_request",
            False,
        ),
        (
            404,
            error_body(404, "NOT_FOUND", "models/gemini-9.0-ultra is not found for API version v1beta."),
            "invalid_request",
            False,
        ),
    ],
    ids=["429", "503", "500", "504", "401", "403", "400-invalid", "400-precondition", "404"],
)
def test_error_status_maps_to_category(status: int, body: Any, category: str, transient: bool) -> None:
    exc = fail(reply(status, body))

    assert exc.category == category
    assert exc.transient is transient
    assert exc.status == status
    assert exc.message.startswith(f"HTTP {status} {body['error']['status']}: ")
    assert body["error"]["message"][:40] in exc.message


def test_invalid_key_reported_as_invalid_argument_is_auth() -> None:
    body = error_body(
        400,
        "INVALID_ARGUMENT",
        "API key not valid. Please pass a valid API key.",
        error_info("API_KEY_INVALID"),
        {
            "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
            "locale": "en-US",
            "message": "API key not valid.",
        },
    )

    exc = fail(reply(400, body))

    assert isinstance(exc, errors.AuthError)
    assert not exc.transient
    assert exc.status == 400


def test_grpc_status_wins_over_http_status() -> None:
    assert fail(reply(500, error_body(500, "UNAVAILABLE", "Try again."))).category == "overloaded"


@pytest.mark.parametrize(
    ("status", "category"), [(502, "server"), (503, "overloaded"), (413, "invalid_request")]
)
def test_error_without_a_google_body_is_mapped_by_status(status: int, category: str) -> None:
    exc = fail(page(status, "<html><title>Error</title></html>"))

    assert exc.category == category
    assert exc.message == f"HTTP {status}"


def test_long_error_messages_are_truncated() -> None:
    exc = fail(reply(400, error_body(400, "INVALID_ARGUMENT", "x" * 5000)))

    assert len(exc.message) < 400


def test_error_echoing_the_key_does_not_leak_it() -> None:
    body = error_body(400, "INVALID_ARGUMENT", f"API key {KEY} not valid.", error_info("API_KEY_INVALID"))

    exc = fail(reply(400, body))

    assert exc.category == "auth"
    assert "[redacted]" in exc.message


# -- wait hints ---------------------------------------------------------------------------------


def test_429_uses_the_retry_info_delay() -> None:
    exc = fail(reply(429, RATE_LIMIT))

    assert isinstance(exc, errors.RateLimited)
    assert exc.retry_after == 7.0


def test_retry_after_header_wins_over_retry_info() -> None:
    assert fail(reply(429, RATE_LIMIT, {"retry-after": "2"})).retry_after == 2.0


def test_429_without_any_hint_has_none() -> None:
    exc = fail(
        reply(429, error_body(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."))
    )

    assert exc.category == "rate_limited"
    assert exc.retry_after is None


def test_503_carries_its_hint() -> None:
    body = error_body(503, "UNAVAILABLE", "The model is overloaded.", retry_info("1.5s"))

    exc = fail(reply(503, body))

    assert exc.category == "overloaded"
    assert exc.retry_after == 1.5


def test_permanent_errors_carry_no_wait_hint() -> None:
    body = error_body(400, "INVALID_ARGUMENT", "Bad request.", retry_info("5s"))

    assert fail(reply(400, body)).retry_after is None


@pytest.mark.parametrize(
    ("delay", "seconds"),
    [("7s", 7.0), ("1.5s", 1.5), ("57.238747106s", 57.238747106), ("0s", 0.0), ("0.250s", 0.25)],
)
def test_retry_info_delay_parses_durations(delay: str, seconds: float) -> None:
    assert retry_info_delay([HELP, retry_info(delay)]) == pytest.approx(seconds)


@pytest.mark.parametrize("delay", [None, "", "7", "20ms", "-1s", "nans", "infs", "soons", 7])
def test_retry_info_delay_rejects_garbage(delay: Any) -> None:
    assert retry_info_delay([retry_info(delay)]) is None


def test_retry_info_delay_without_retry_info_is_none() -> None:
    assert retry_info_delay([QUOTA_FAILURE, HELP, "junk"]) is None
