"""Real HTTP peers on 127.0.0.1 for the tests: a webhook receiver, and the server under it.

``LoopbackServer`` is a threaded ``http.server`` on a free port of 127.0.0.1 for any handler
class (the knowledge tests' feed publisher is one). ``WebhookReceiver`` is the one webhook
receiver of the suite: it keeps every request it is sent and answers each as its ``answer``
says (by default from ``script``, then ``status`` per path, then 200). It is threaded, not async,
so the same receiver serves in-process delivery code, the scheduler's dispatcher and other
processes alike.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import standardwebhooks


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that keeps the test output free of one access-log line per request."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-answer (a timeout, a response body it will not read) is a
        # case the tests provoke on purpose, not an error of the server; anything else is printed.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class LoopbackServer:
    """``handler`` served on 127.0.0.1 at a free port; ``listening=False`` binds the port but
    refuses connections until ``start()``."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], *, listening: bool = True) -> None:
        self.server = _Server(("127.0.0.1", 0), handler, bind_and_activate=False)
        self.server.server_bind()
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None
        if listening:
            self.start()

    def at(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        """The URL of ``path`` here, under another host name if the test's resolver maps it here."""
        return f"http://{host}:{self.port}{path}"

    def start(self) -> None:
        self.server.server_activate()
        # A short poll, so that closing a server does not wait half a second for its loop.
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


@dataclass(frozen=True)
class Received:
    """One request as the receiver saw it."""

    path: str  # without the query string
    query: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    at: float  # time.monotonic()
    client_port: int
    status: int = 0  # what the receiver answered (0: it never answered)
    sender: Any = None  # what ``identify`` said of the client, if the receiver has one


@dataclass(frozen=True)
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"


# What a receiver answers a request with; None keeps the request hanging until the receiver closes.
Answering = Callable[[Received], Answer | None]


class WebhookReceiver(LoopbackServer):
    """A webhook receiver on 127.0.0.1 that keeps each request and answers it as ``answer`` says.

    Without ``answer``: the next status of ``script`` if any is left, else ``status[path]``, else
    200; a 302 points elsewhere on the receiver. ``identify`` is called with the client's port while
    its connection is open (to tell which process sent a request) and its result kept as ``sender``.
    """

    def __init__(
        self,
        answer: Answering | None = None,
        *,
        identify: Callable[[int], Any] | None = None,
        listening: bool = True,
    ) -> None:
        self.requests: list[Received] = []
        self.script: list[int] = []
        self.status: dict[str, int] = {}
        self._answer = answer or self.scripted
        self._identify = identify
        self._lock = threading.Lock()
        self._closed = threading.Event()
        super().__init__(self._handler(), listening=listening)

    def scripted(self, request: Received) -> Answer:
        with self._lock:
            status = self.script.pop(0) if self.script else self.status.get(request.path, 200)
        headers = {"Location": f"{self.url}/elsewhere"} if status == 302 else {}
        return Answer(status, headers)

    def on(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def under(self, prefix: str) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if r.path.startswith(prefix)]

    def close(self) -> None:
        self._closed.set()  # hanging requests end now
        super().close()

    def _receive(self, handler: BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers.get("content-length", 0)))
        target = urlsplit(handler.path)
        client_port = int(handler.client_address[1])
        request = Received(
            path=target.path,
            query=target.query,
            headers={k.lower(): v for k, v in handler.headers.items()},
            body=body,
            at=time.monotonic(),
            client_port=client_port,
            sender=self._identify(client_port) if self._identify else None,
        )
        answer = self._answer(request)
        with self._lock:
            self.requests.append(replace(request, status=answer.status if answer else 0))
        if answer is None:
            self._closed.wait()
            return
        handler.send_response(answer.status)
        for name, value in answer.headers.items():
            handler.send_header(name, value)
        handler.send_header("content-length", str(len(answer.body)))
        handler.end_headers()
        handler.wfile.write(answer.body)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                receiver._receive(self)

            do_PUT = do_GET = do_POST

        return Handler


def verify(secret: str, request: Received) -> dict[str, Any]:
    """The event of a signed webhook request, checked by ``standardwebhooks`` with ``secret``."""
    event: dict[str, Any] = standardwebhooks.Webhook(secret).verify(request.body, request.headers)
    return event
