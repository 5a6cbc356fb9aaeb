"""Guards in front of every route (pure ASGI, no per-request task overhead): a declared body
size over the cap is refused before anything is read (FastAPI's own ``max_body_size`` counts the
bytes of a body that declares no length), the per-IP rate limit, and the RateLimit-* headers.

The per-key limit needs the key, so it runs in ``api/deps.py``; it leaves its verdict in the
request state and this middleware puts the headers on the response either way.
"""

from __future__ import annotations

from typing import Any

import orjson
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.ratelimit import SlidingWindow, Verdict, client_ip
from shared.metrics import MetricsBuffer
from shared.settings import Settings

UNLIMITED_PATHS = ("/healthz", "/readyz", "/metrics")
UPLOAD_PATH = "/v1/files"
UPLOAD_FORM_BYTES = 1024 * 1024


def _error(status: int, type_: str, message: str, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"type": type_, "message": message, "param": param}})


class Guards:
    def __init__(
        self,
        app: ASGIApp,
        settings: Settings,
        limiter: SlidingWindow | None,
        metrics: MetricsBuffer | None = None,
    ):
        self.app = app
        self.settings = settings
        self.limiter = limiter
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        max_bytes = self.settings.max_request_bytes
        if scope.get("path") == UPLOAD_PATH:
            # A file upload is bounded by the file limit, plus room for the form around the file.
            max_bytes = self.settings.max_file_bytes + UPLOAD_FORM_BYTES
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            await self._reply(
                send, 413, _error(413, "request_too_large", f"the body exceeds {max_bytes} bytes")
            )
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        peer = (scope.get("client") or (None,))[0]
        state["client_ip"] = client_ip(peer, headers.get("x-forwarded-for"), self.settings.trusted_proxies)
        verdict: Verdict | None = None
        if self.limiter is not None and scope.get("path", "") not in UNLIMITED_PATHS:
            try:
                verdict = await _run_sync(
                    self.limiter.hit, "ip", state["client_ip"], self.settings.ip_requests_per_minute
                )
            except RedisError:
                verdict = None  # Redis down: serve rather than refuse, as the per-key limit does
        if verdict is not None:
            if not verdict.admitted:
                if self.metrics is not None:
                    self.metrics.inc("rate_limit_rejections", "ip")
                await self._reply(
                    send, 429, _error(429, "rate_limit_error", "too many requests from this address"), verdict
                )
                return
            state.setdefault("ratelimit", verdict)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                verdict = state.get("ratelimit")
                if isinstance(verdict, Verdict):
                    existing = {k.lower() for k, _ in message.get("headers", [])}
                    extra = [
                        (k.lower().encode(), v.encode())
                        for k, v in verdict.headers().items()
                        if k.lower().encode() not in existing
                    ]
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    @staticmethod
    async def _reply(send: Send, status: int, body: bytes, verdict: Verdict | None = None) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if verdict is not None:
            headers += [(k.lower().encode(), v.encode()) for k, v in verdict.headers().items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def _run_sync(fn: Any, *args: Any) -> Verdict:
    from starlette.concurrency import run_in_threadpool

    result: Verdict = await run_in_threadpool(fn, *args)
    return result
