"""The client commands' rate-limit layer (SPEC §6, §18): every request they make passes here.

An ``httpx`` transport, so it serves any request the commands send (a poll, a download, an event
stream) without each command knowing about limits:

- **pace**: each response's ``RateLimit-Remaining`` and ``RateLimit-Reset`` say how many requests
  the key has left and when the window frees the next one; the next request waits its share of
  that time (``reset / (remaining + 1)``), so a long ``submit --wait`` on the free tier (60 a
  minute) settles at about one request a second instead of running into the limit;
- **wait out a 429**: the request is sent again after ``Retry-After`` (seconds or an HTTP date),
  else ``RateLimit-Reset``, else an exponential backoff from 1 s. The API refuses a request with
  429 before doing anything, so sending it again (a POST included) cannot create anything twice.
  A wait longer than ``MAX_WAIT_S`` (a daily quota resets at midnight) is not worth hanging a
  command for: that 429 goes back to the command, which prints the API's error.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from shared.retry_after import parse_retry_after

MAX_WAIT_S = 300.0
_FIRST_BACKOFF_S = 1.0
_MAX_BACKOFF_S = 60.0

OnWait = Callable[[float, str], None]
"""Told each wait for a 429 before it starts: the seconds, and the API's reason."""


class RateLimitTransport(httpx.BaseTransport):
    def __init__(
        self,
        inner: httpx.BaseTransport,
        *,
        on_wait: OnWait | None = None,
        max_wait_s: float = MAX_WAIT_S,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inner = inner
        self._on_wait = on_wait
        self._max_wait_s = max_wait_s
        self._sleep = sleep
        self._clock = clock
        self._next_at = 0.0  # when the next request may go, by the pace of the last answer

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        backoff = _FIRST_BACKOFF_S
        while True:
            ahead = self._next_at - self._clock()
            if ahead > 0:
                self._sleep(ahead)
            response = self._inner.handle_request(request)
            self._learn_pace(response)
            if response.status_code != 429:
                return response
            wait = _hinted_wait(response)
            if wait is None:
                wait, backoff = backoff, min(backoff * 2, _MAX_BACKOFF_S)
            if wait > self._max_wait_s:
                return response
            reason = _reason(response)
            response.close()
            if self._on_wait is not None:
                self._on_wait(wait, reason)
            self._sleep(wait)
            self._next_at = 0.0  # the wait was the pace

    def close(self) -> None:
        self._inner.close()

    def _learn_pace(self, response: httpx.Response) -> None:
        remaining = _number(response.headers.get("ratelimit-remaining"))
        reset = _number(response.headers.get("ratelimit-reset"))
        if remaining is None or reset is None:
            return
        self._next_at = self._clock() + reset / (remaining + 1)


def _hinted_wait(response: httpx.Response) -> float | None:
    wait = parse_retry_after(response.headers.get("retry-after"))
    if wait is None:
        wait = _number(response.headers.get("ratelimit-reset"))
    return wait


def _reason(response: httpx.Response) -> str:
    """The API's error message (SPEC §3 shape), read from the 429's small body."""
    try:
        response.read()
        message = response.json()["error"]["message"]
    except Exception:
        return "HTTP 429"
    return str(message)[:200]


def _number(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and 0 <= number < 1e9 else None
