"""Running the simulated provider: ``SimServer`` in a background thread, ``serve`` in the foreground.

Owns listening sockets, the event loop and clean shutdown; what the server answers is ``app.py``'s.
Both run aiohttp without an access log and with a deep accept backlog, because benchmarks open
hundreds of connections at once and a 128-deep backlog turns a burst into SYN retries that look
like provider latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

from aiohttp import web

from shared.sim.app import create_app
from shared.sim.faults import SimConfig

_BACKLOG = 4096
# A call hung by a ``timeout`` fault must not hold up stopping the server.
_SHUTDOWN_TIMEOUT_S = 0.5
# Cancel a handler when its client goes away, so abandoned hangs free their slot in ``in_flight``.
_RUNNER_OPTIONS: dict[str, Any] = {
    "access_log": None,
    "handler_cancellation": True,
    "shutdown_timeout": _SHUTDOWN_TIMEOUT_S,
}


class SimServer:
    """The simulated provider on its own event loop in a daemon thread, for tests and benchmarks.

    ``with SimServer(SimConfig(latency_ms=50)) as sim: ... sim.url ...``
    """

    def __init__(self, config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0):
        self._config = config or SimConfig()
        self._host = host
        self._port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        if self._thread is None:
            raise RuntimeError("SimServer is not started")
        return f"http://{self._host}:{self._port}"

    def start(self) -> SimServer:
        """Start listening and return once the port accepts connections (port 0 picks a free one)."""
        if self._thread is not None:
            raise RuntimeError("SimServer already started")
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="sim-provider", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise self._error
        return self

    def stop(self) -> None:
        """Stop the server, cancel calls still running and join the thread; safe to call twice."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None and not loop.is_closed():
            # The loop may finish between the check and the call; then there is nothing to stop.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        thread.join()
        self._thread = None

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced by start() when it happens before listening
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()
            else:
                raise

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        await _serve_until(self._config, self._host, self._port, self._stop, self._listening)

    def _listening(self, port: int) -> None:
        self._port = port
        self._ready.set()


def serve(config: SimConfig, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM (``conclave sim-provider``); prints the URL once listening."""
    with contextlib.suppress(KeyboardInterrupt):  # where signal handlers cannot be installed
        asyncio.run(_serve_forever(config, host, port))


async def _serve_forever(config: SimConfig, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows, or not the main thread
            loop.add_signal_handler(signum, stop.set)

    def announce(bound_port: int) -> None:
        print(f"conclave sim-provider listening on http://{host}:{bound_port}", flush=True)

    try:
        await _serve_until(config, host, port, stop, announce)
    finally:
        for signum in signals:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signum)


async def _serve_until(
    config: SimConfig, host: str, port: int, stop: asyncio.Event, on_listening: Callable[[int], None]
) -> None:
    runner = web.AppRunner(create_app(config), **_RUNNER_OPTIONS)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=_BACKLOG)
        await site.start()
        on_listening(_bound_port(runner, port))
        await stop.wait()
    finally:
        await runner.cleanup()


def _bound_port(runner: web.AppRunner, requested: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return requested
