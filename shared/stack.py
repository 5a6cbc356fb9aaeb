"""The local stack: start and stop a whole deployment's processes on one machine.

Used by ``conclave demo``, the integration tests and the benchmarks, so all three run the
same real processes (API under uvicorn, dramatiq workers, scheduler) over real sockets.
Redis comes from ``CONCLAVE_REDIS_URL`` when reachable, else a local ``redis-server`` binary,
else an in-process fakeredis TCP server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_reachable(url: str, timeout: float = 1.0) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


@dataclass
class EmbeddedRedis:
    url: str
    kind: str  # "external" | "redis-server" | "fakeredis"
    _stop: Callable[[], None] = field(default=lambda: None, repr=False)

    def stop(self) -> None:
        self._stop()


def ensure_redis(url: str) -> EmbeddedRedis:
    if redis_reachable(url):
        return EmbeddedRedis(url, "external")
    binary = shutil.which("redis-server")
    if binary:
        port = free_port()
        workdir = tempfile.mkdtemp(prefix="conclave-redis-")
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                workdir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        embedded_url = f"redis://127.0.0.1:{port}/0"
        wait_until(lambda: redis_reachable(embedded_url, 0.2), 15, "redis-server to start")

        def stop_server() -> None:
            terminate([proc])
            shutil.rmtree(workdir, ignore_errors=True)

        return EmbeddedRedis(embedded_url, "redis-server", stop_server)
    from fakeredis import TcpFakeServer

    server = TcpFakeServer(("127.0.0.1", 0), server_type="redis")
    # Connection handler threads must not keep the process alive after shutdown.
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="fakeredis", daemon=True)
    thread.start()
    port = server.server_address[1]

    def stop_fake() -> None:
        server.shutdown()
        server.server_close()

    return EmbeddedRedis(f"redis://127.0.0.1:{port}/0", "fakeredis", stop_fake)


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def terminate(procs: list[subprocess.Popen[bytes]], timeout: float = 20.0) -> None:
    """SIGTERM, wait, then SIGKILL what is left."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class Stack:
    """Processes started with one environment; ``env`` is what each child sees."""

    env: dict[str, str]
    api_url: str | None = None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="conclave-logs-")))

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.procs.append(proc)
        return proc

    def start_api(self, port: int | None = None, workers: int = 1) -> str:
        port = port or free_port()
        self._spawn(
            f"api-{port}",
            [sys.executable, "-m", "shared.cli.main", "api", "--port", str(port), "--workers", str(workers)],
        )
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(f"{url}/healthz"), 60, f"the API on port {port}")
        self.api_url = self.api_url or url
        return url

    def start_workers(
        self,
        *,
        processes: int = 1,
        threads: int = 32,
        queues: tuple[str, ...] = ("high", "normal", "low"),
        name: str = "worker",
    ) -> subprocess.Popen[bytes]:
        # Through `conclave worker`, as an operator runs it: it becomes the dramatiq main process.
        return self._spawn(
            f"{name}-{len(self.procs)}",
            [
                sys.executable,
                "-m",
                "shared.cli.main",
                "worker",
                "--processes",
                str(processes),
                "--threads",
                str(threads),
                "--queues",
                ",".join(queues),
            ],
        )

    def start_scheduler(self) -> subprocess.Popen[bytes]:
        return self._spawn("scheduler", [sys.executable, "-m", "scheduler"])

    def dead(self) -> str | None:
        """Why the stack is broken (a process exited), or None."""
        for proc in self.procs:
            if proc.poll() is not None:
                args = proc.args if isinstance(proc.args, list) else [proc.args]
                what = " ".join(str(a) for a in args[1:4])
                return f"{what} exited with {proc.returncode}; logs in {self.logs}"
        return None

    def log_text(self) -> str:
        return "\n".join(
            f"== {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(self.logs.glob("*.log"))
        )

    def stop(self) -> None:
        terminate(self.procs)
        self.procs.clear()


@contextlib.contextmanager
def running_stack(env: dict[str, str]) -> Iterator[Stack]:
    stack = Stack(env={**os.environ, **env})
    try:
        yield stack
    finally:
        stack.stop()
