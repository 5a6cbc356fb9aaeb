"""The three wire formats as the real APIs speak them (SPEC §4.2), one class per format.

Each ``WireFormat`` owns, for its API: the header checks, reading a request body into a
``Prompt``, and rendering a success, a refusal, or an error kind with the real status, body shape
and wait headers, so the provider modules under test meet exactly what production sends.
Which outcome a request gets is decided elsewhere (``faults.py``); routes live in ``app.py``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from shared.sim.answers import estimate_tokens

JsonDict = dict[str, Any]
ErrorReply = tuple[int, JsonDict, dict[str, str]]


@dataclass(frozen=True, slots=True)
class Prompt:
    """What a request asked: ``text`` is system + every message, ``last_user`` the final user turn."""

    model: str
    text: str
    last_user: str


class Rejected(Exception):
    """The request itself is wrong (missing key, malformed body); answered at once, never faulted."""

    def __init__(self, kind: str, message: str, model: str = "", reply: ErrorReply | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.model = model
        # Set when the real API answers this rejection unlike the fault of the same kind.
        self.reply = reply


class WireFormat:
    api: ClassVar[str]

    def authenticate(self, headers: Mapping[str, str], query: Mapping[str, str]) -> None:
        raise NotImplementedError

    def parse(self, body: Any, path_model: str | None) -> Prompt:
        raise NotImplementedError

    def answer(self, prompt: Prompt, text: str, call_id: int) -> JsonDict:
        raise NotImplementedError

    def refusal(self, prompt: Prompt, call_id: int) -> JsonDict:
        raise NotImplementedError

    def error(self, kind: str, prompt: Prompt | None, retry_after_s: float, message: str = "") -> ErrorReply:
        raise NotImplementedError


class OpenAIFormat(WireFormat):
    api = "openai"

    def authenticate(self, headers: Mapping[str, str], query: Mapping[str, str]) -> None:
        scheme, _, token = headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Rejected(
                "auth",
                "You didn't provide an API key. You need to provide your API key in an Authorization "
                "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )

    def parse(self, body: Any, path_model: str | None) -> Prompt:
        model = _require_str(body, "model", "you must provide a model parameter")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise Rejected("invalid_request", "'messages' must be a non-empty array", model)
        texts, last_user = [], ""
        for message in messages:
            if not isinstance(message, dict):
                raise Rejected("invalid_request", "each message must be an object", model)
            text = _content_text(message.get("content"))
            texts.append(text)
            if message.get("role") == "user":
                last_user = text
        return Prompt(model=model, text=_join(texts), last_user=last_user)

    def answer(self, prompt: Prompt, text: str, call_id: int) -> JsonDict:
        return self._completion(prompt, call_id, {"role": "assistant", "content": text}, "stop", text)

    def refusal(self, prompt: Prompt, call_id: int) -> JsonDict:
        message = {"role": "assistant", "content": None, "refusal": None}
        return self._completion(prompt, call_id, message, "content_filter", "")

    def _completion(
        self, prompt: Prompt, call_id: int, message: JsonDict, finish_reason: str, text: str
    ) -> JsonDict:
        prompt_tokens, completion_tokens = estimate_tokens(prompt.text), estimate_tokens(text)
        return {
            "id": f"chatcmpl-sim{call_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": prompt.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def error(self, kind: str, prompt: Prompt | None, retry_after_s: float, message: str = "") -> ErrorReply:
        model = prompt.model if prompt else "the model"
        headers: dict[str, str] = {}
        if kind == "rate_limited":
            status, type_, param, code = 429, "requests", None, "rate_limit_exceeded"
            default = (
                f"Rate limit reached for {model} in organization org-sim on requests per min (RPM): "
                f"Limit 500, Used 500, Requested 1. Please try again in {_go_duration(retry_after_s)}."
            )
            headers = {
                **_retry_headers(retry_after_s),
                "x-ratelimit-limit-requests": "500",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": _go_duration(retry_after_s),
            }
        elif kind == "overloaded":
            status, type_, param, code = 503, "server_error", None, None
            default = "The engine is currently overloaded, please try again later."
        elif kind == "auth":
            status, type_, param, code = 401, "invalid_request_error", None, "invalid_api_key"
            default = "Incorrect API key provided: sk-sim***. You can find your API key at the dashboard."
        elif kind == "invalid_request":
            status, type_, param, code = 400, "invalid_request_error", "messages", "context_length_exceeded"
            tokens = estimate_tokens(prompt.text) if prompt else 0
            default = (
                f"This model's maximum context length is 128000 tokens. However, your messages resulted "
                f"in {128000 + tokens} tokens. Please reduce the length of the messages."
            )
            if message:  # a malformed request, not a context overflow
                param, code = None, None
        else:
            status, type_, param, code = 500, "server_error", None, None
            default = "The server had an error while processing your request. Sorry about that!"
        body = {"error": {"message": message or default, "type": type_, "param": param, "code": code}}
        return status, body, headers


class AnthropicFormat(WireFormat):
    api = "anthropic"
    _ERRORS: ClassVar[dict[str, tuple[int, str, str]]] = {
        "rate_limited": (
            429,
            "rate_limit_error",
            "This request would exceed your organization's rate limit of 50 requests per minute. "
            "Please try again later.",
        ),
        "overloaded": (529, "overloaded_error", "Overloaded"),
        "server": (500, "api_error", "Internal server error"),
        "auth": (401, "authentication_error", "invalid x-api-key"),
        "invalid_request": (
            400,
            "invalid_request_error",
            "prompt is too long: {tokens} tokens > 200000 maximum",
        ),
    }

    def authenticate(self, headers: Mapping[str, str], query: Mapping[str, str]) -> None:
        if not headers.get("x-api-key", "").strip():
            raise Rejected("auth", "x-api-key header is required")
        if not headers.get("anthropic-version", "").strip():
            raise Rejected("invalid_request", "anthropic-version: header is required")

    def parse(self, body: Any, path_model: str | None) -> Prompt:
        model = _require_str(body, "model", "model: Field required")
        if not isinstance(body.get("max_tokens"), int) or isinstance(body.get("max_tokens"), bool):
            raise Rejected("invalid_request", "max_tokens: Field required", model)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise Rejected("invalid_request", "messages: at least one message is required", model)
        texts, last_user = [_content_text(body.get("system"))], ""
        for message in messages:
            if not isinstance(message, dict):
                raise Rejected("invalid_request", "messages: each message must be an object", model)
            text = _content_text(message.get("content"))
            texts.append(text)
            if message.get("role") == "user":
                last_user = text
        return Prompt(model=model, text=_join(texts), last_user=last_user)

    def answer(self, prompt: Prompt, text: str, call_id: int) -> JsonDict:
        return self._message(prompt, call_id, [{"type": "text", "text": text}], "end_turn", text)

    def refusal(self, prompt: Prompt, call_id: int) -> JsonDict:
        return self._message(prompt, call_id, [], "refusal", "")

    def _message(
        self, prompt: Prompt, call_id: int, content: list[JsonDict], stop_reason: str, text: str
    ) -> JsonDict:
        return {
            "id": f"msg_sim{call_id}",
            "type": "message",
            "role": "assistant",
            "model": prompt.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {"input_tokens": estimate_tokens(prompt.text), "output_tokens": estimate_tokens(text)},
        }

    def error(self, kind: str, prompt: Prompt | None, retry_after_s: float, message: str = "") -> ErrorReply:
        status, type_, default = self._ERRORS.get(kind, self._ERRORS["server"])
        default = default.format(tokens=200000 + (estimate_tokens(prompt.text) if prompt else 0))
        headers = _retry_headers(retry_after_s) if kind == "rate_limited" else {}
        return status, {"type": "error", "error": {"type": type_, "message": message or default}}, headers


class GeminiFormat(WireFormat):
    api = "gemini"
    _ERRORS: ClassVar[dict[str, tuple[int, str, str]]] = {
        "rate_limited": (
            429,
            "RESOURCE_EXHAUSTED",
            "You exceeded your current quota, please check your plan and billing details.",
        ),
        "overloaded": (503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
        "server": (500, "INTERNAL", "An internal error has occurred. Please retry or report the issue."),
        "auth": (401, "UNAUTHENTICATED", "API key not valid. Please pass a valid API key."),
        "invalid_request": (
            400,
            "INVALID_ARGUMENT",
            "The input token count ({tokens}) exceeds the maximum number of tokens allowed (1048576).",
        ),
    }

    def authenticate(self, headers: Mapping[str, str], query: Mapping[str, str]) -> None:
        if not headers.get("x-goog-api-key", "").strip() and not query.get("key", "").strip():
            # Real Gemini refuses a key-less call as an unregistered caller, not as a bad key.
            message = "Method doesn't allow unregistered callers. Please use an API key."
            error = {"code": 403, "message": message, "status": "PERMISSION_DENIED"}
            raise Rejected("auth", message, reply=(403, {"error": error}, {}))

    def parse(self, body: Any, path_model: str | None) -> Prompt:
        model = path_model or ""
        if not isinstance(body, dict):
            raise Rejected("invalid_request", "Invalid JSON payload received.", model)
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            raise Rejected(
                "invalid_request", "* GenerateContentRequest.contents: contents is not specified", model
            )
        system = body.get("systemInstruction")
        texts = [_parts_text(system.get("parts")) if isinstance(system, dict) else ""]
        last_user = ""
        for content in contents:
            if not isinstance(content, dict):
                raise Rejected(
                    "invalid_request", "Invalid JSON payload received: contents[] must be objects", model
                )
            text = _parts_text(content.get("parts"))
            texts.append(text)
            if content.get("role", "user") == "user":
                last_user = text
        return Prompt(model=model, text=_join(texts), last_user=last_user)

    def answer(self, prompt: Prompt, text: str, call_id: int) -> JsonDict:
        candidate = {
            "content": {"role": "model", "parts": [{"text": text}]},
            "finishReason": "STOP",
            "index": 0,
        }
        return self._response(prompt, call_id, candidate, estimate_tokens(text))

    def refusal(self, prompt: Prompt, call_id: int) -> JsonDict:
        # A blocked candidate has no content at all, only the reason and the ratings that tripped.
        candidate = {
            "finishReason": "SAFETY",
            "index": 0,
            "safetyRatings": [
                {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}
            ],
        }
        return self._response(prompt, call_id, candidate, 0)

    def _response(self, prompt: Prompt, call_id: int, candidate: JsonDict, output_tokens: int) -> JsonDict:
        prompt_tokens = estimate_tokens(prompt.text)
        usage = {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens + output_tokens}
        if output_tokens:
            usage["candidatesTokenCount"] = output_tokens
        return {
            "candidates": [candidate],
            "usageMetadata": usage,
            "modelVersion": prompt.model,
            "responseId": f"sim{call_id}",
        }

    def error(self, kind: str, prompt: Prompt | None, retry_after_s: float, message: str = "") -> ErrorReply:
        status, grpc_status, default = self._ERRORS.get(kind, self._ERRORS["server"])
        default = default.format(tokens=1048576 + (estimate_tokens(prompt.text) if prompt else 0))
        error: JsonDict = {"code": status, "message": message or default, "status": grpc_status}
        headers: dict[str, str] = {}
        if kind == "rate_limited":
            headers = _retry_headers(retry_after_s)
            # Gemini's own wait hint travels in the body as a google.rpc.RetryInfo detail.
            error["details"] = [
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry_after_s:g}s"}
            ]
        return status, {"error": error}, headers


WIRE_FORMATS: dict[str, WireFormat] = {f.api: f for f in (OpenAIFormat(), AnthropicFormat(), GeminiFormat())}


def _require_str(body: Any, key: str, message: str) -> str:
    if not isinstance(body, dict):
        raise Rejected("invalid_request", "the request body must be a JSON object")
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise Rejected("invalid_request", message)
    return value


def _content_text(content: Any) -> str:
    """Text of an OpenAI/Anthropic content field: a string or a list of ``{"type": "text"}`` blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            block["text"]
            for block in content
            if isinstance(block, dict) and isinstance(block.get("text"), str)
        )
    return ""


def _parts_text(parts: Any) -> str:
    if not isinstance(parts, list):
        return ""
    return "\n".join(
        part["text"] for part in parts if isinstance(part, dict) and isinstance(part.get("text"), str)
    )


def _join(texts: list[str]) -> str:
    return "\n\n".join(text for text in texts if text)


def _retry_headers(retry_after_s: float) -> dict[str, str]:
    # retry-after is whole seconds by HTTP's rules, so the precise value goes in retry-after-ms.
    return {"retry-after": str(math.ceil(retry_after_s)), "retry-after-ms": str(round(retry_after_s * 1000))}


def _go_duration(seconds: float) -> str:
    """OpenAI writes its reset hints as Go durations: "1s", "250ms", "1m30s"."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:g}s" if minutes else f"{rest:g}s"
