"""Worker hosts for multi-host tests: Linux network namespaces, each joined to this machine by a
veth pair, and TCP forwarders that make this machine's 127.0.0.1 services reachable from them.

A ``Host`` is a namespace ``cc<run><i>`` whose interface has ``10.231.X.(4i+2)/30`` and whose
peer on this side has ``.(4i+1)``; processes started with ``host.argv(...)`` (``ip netns exec``)
see only that link. Redis, PostgreSQL and the simulated provider listen on 127.0.0.1, which a
namespace cannot reach, so a ``Forwarder`` listens on the host-side address and relays each
connection to the real port; ``cut`` takes this side of the link down (the namespace sees
silence, as when a switch port or a cable goes, and its TCP connections stay open, retransmitting)
and ``restore`` brings it back, after which those connections carry on.

TCP backs off exponentially while a link is down (retransmissions 0.2, 0.4, 0.8 … s apart), so
after a 35 s cut a connection can sit idle for another 20 s before its next retransmission finds
the link up again. Where the kernel allows it (Linux 6.15+: ``tcp_rto_max_ms``), both ends of
every connection over a link retransmit at least once a second (the namespace's sysctl, the
forwarder's socket option) and give up much later than the default, so a reconnected host
carries on within a second and no connection dies of the cut itself.

Names carry a random run id (interface names are at most 15 characters), every namespace and
link is deleted by ``hosts()`` on the way out, and ``namespaces_available()`` says whether this
machine lets us create them at all (root, iproute2).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

# Linux's TCP_RTO_MAX_MS socket option (include/uapi/linux/tcp.h); Python does not name it yet.
TCP_RTO_MAX_MS = 44
RTO_MAX_MS = 1000
# How long a connection over a cut link may go unanswered before TCP gives up on it.
GIVE_UP_S = 300


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def namespaces_available() -> str | None:
    """None if network namespaces and veth pairs can be created here, else why not."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    name = f"ccprobe{uuid.uuid4().hex[:6]}"
    try:
        made = ip("netns", "add", name, check=False)
        if made.returncode != 0:
            return f"`ip netns add` failed: {made.stderr.strip()}"
        veth = ip(
            "link", "add", f"{name[:9]}h", "type", "veth", "peer", "name", "p0", "netns", name, check=False
        )
        if veth.returncode != 0:
            return f"`ip link add … type veth` failed: {veth.stderr.strip()}"
        return None
    finally:
        ip("link", "del", f"{name[:9]}h", check=False)
        ip("netns", "del", name, check=False)


@dataclass
class Host:
    """One worker host: a namespace and its link to this machine."""

    name: str  # the namespace
    link: str  # the veth on this side
    address: str  # this machine's address on the link (what the host's processes connect to)
    peer: str  # the host's own address

    def argv(self, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *command]

    def cut(self) -> None:
        ip("link", "set", self.link, "down")

    def restore(self) -> None:
        ip("link", "set", self.link, "up")


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 under 10.231.0.0/16 that no interface of this machine is on."""
    used = ip("-o", "-4", "addr").stdout
    for _ in range(100):
        net = ipaddress.IPv4Network(f"10.231.{random.randrange(256)}.0/24")
        if f" {'.'.join(str(net.network_address).split('.')[:3])}." not in used:
            return net
    raise RuntimeError("no free 10.231.X.0/24 subnet")


@contextlib.contextmanager
def hosts(count: int) -> Iterator[list[Host]]:
    """``count`` namespaces joined to this machine; all deleted on the way out."""
    run = uuid.uuid4().hex[:6]
    base = int(_free_subnet().network_address)
    made: list[Host] = []
    try:
        for i in range(count):
            ns, link = f"cc{run}{i}", f"cc{run}{i}h"
            here = str(ipaddress.IPv4Address(base + 4 * i + 1))
            there = str(ipaddress.IPv4Address(base + 4 * i + 2))
            ip("netns", "add", ns)
            made.append(Host(ns, link, here, there))
            ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("addr", "add", f"{here}/30", "dev", link)
            ip("link", "set", link, "up")
            ip("-n", ns, "addr", "add", f"{there}/30", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
            # Best effort (older kernels have no tcp_rto_max_ms): only slower to recover without.
            # At one retransmission a second, the default 15 retries would give up after 14 s.
            for setting in (f"net.ipv4.tcp_rto_max_ms={RTO_MAX_MS}", f"net.ipv4.tcp_retries2={GIVE_UP_S}"):
                subprocess.run(made[-1].argv("sysctl", "-qw", setting), capture_output=True, check=False)
        yield made
    finally:
        for host in made:
            ip("link", "del", host.link, check=False)
            ip("netns", "del", host.name, check=False)


@dataclass
class Forwarder:
    """TCP relays from (listen address, port) to ``127.0.0.1:<port>``, on one event loop thread.

    ``add(address, port)`` starts one and returns the port it listens on (chosen by the kernel).
    Connections that stop moving (a cut link) just wait: the relay never times them out.
    """

    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _servers: list[asyncio.Server] = field(default_factory=list)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _thread: threading.Thread | None = None
    connections: int = 0  # accepted so far (for the test's figures)

    def start(self) -> Forwarder:
        self._thread = threading.Thread(target=self._loop.run_forever, name="netns-forwarder", daemon=True)
        self._thread.start()
        return self

    def add(self, address: str, upstream_port: int) -> int:
        async def listen() -> int:
            server = await asyncio.start_server(
                lambda r, w: self._relay(r, w, upstream_port), address, 0, reuse_address=True
            )
            self._servers.append(server)
            return int(server.sockets[0].getsockname()[1])

        return asyncio.run_coroutine_threadsafe(listen(), self._loop).result(10)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                writer.close()
                return
            self._writers.add(up_writer)
            for w in (writer, up_writer):
                sock = w.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link_side = writer.get_extra_info("socket")
            if link_side is not None:
                link_side.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, GIVE_UP_S * 1000)
                with contextlib.suppress(OSError):
                    link_side.setsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS, RTO_MAX_MS)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
            self._writers.discard(up_writer)
        finally:
            self._writers.discard(writer)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            # Either side closing closes the pair, as a direct connection would end.
            writer.close()

    def stop(self) -> None:
        async def close() -> None:
            for server in self._servers:
                server.close()
            # Reset every connection: each relay's reads then end and it returns by itself.
            for w in list(self._writers):
                w.transport.abort()
            for _ in range(100):
                if not self._writers:
                    break
                await asyncio.sleep(0.01)

        if self._thread is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()
