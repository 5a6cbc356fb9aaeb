"""Connection failures through the real aiohttp transport are ``network``, not ``timeout``:
httpx-aiohttp reports them all as ``ConnectTimeout``, and the provider boundary undoes that."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from shared.providers import errors
from shared.providers.base import ChatRequest
from shared.providers.config import ProviderConfig
from shared.providers.http import make_client
from shared.providers.openai import OpenAIProvider

REQUEST = ChatRequest("m", ({"role": "user", "content": "hi"},))


def call(base_url: str, timeout_s: float = 5.0) -> errors.ProviderError:
    async def go() -> errors.ProviderError:
        client = make_client()
        provider = OpenAIProvider(ProviderConfig("p", "openai", base_url, timeout_s=timeout_s), "sk-test")
        try:
            with pytest.raises(errors.ProviderError) as info:
                await provider.complete(client, REQUEST)
            return info.value
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_connection_refused_is_network() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert call(f"http://127.0.0.1:{port}/v1").category == "network"


def test_connection_reset_is_network() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]

    def reset_everything() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            conn.close()

    threading.Thread(target=reset_everything, daemon=True).start()
    try:
        assert call(f"http://127.0.0.1:{port}/v1").category == "network"
    finally:
        listener.close()


def test_a_server_that_never_answers_is_timeout() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    try:
        assert call(f"http://127.0.0.1:{port}/v1", timeout_s=0.3).category == "timeout"
    finally:
        listener.close()
