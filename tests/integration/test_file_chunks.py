"""An uploaded file is stored in chunks and read back several chunks per transaction
(``shared.files.store``): with tiny chunks, every byte and every line comes back in order,
lines spanning chunks and transactions included."""

from __future__ import annotations

import io
from typing import Any

import pytest

from shared.files import store
from tests.conftest import new_key

pytestmark = pytest.mark.integration


class Source:
    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)
        self.filename: str | None = "tiny.jsonl"

    def read(self, size: int) -> bytes:
        return self._data.read(size)

    def finish(self) -> dict[str, str]:
        return {"purpose": "batch"}


@pytest.mark.parametrize("size", [0, 1, 6, 7, 8, 20])
def test_chunks_come_back_in_order_across_reads(
    sessions: Any, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    monkeypatch.setattr(store, "CHUNK_BYTES", 5)
    monkeypatch.setattr(store, "READ_CHUNKS", 3)
    lines = [f"line {i} {'x' * (i % 4)}".encode() for i in range(size)]
    data = b"\n".join(lines) + b"\n" if lines else b"\n"
    limits = store.FileLimits(max_bytes=10_000, max_lines=1000, expiry_s=3600)
    _, tenant_id = new_key(sessions)
    stored = store.store_upload(sessions, tenant_id, Source(data), limits=limits)
    chunks = list(store.iter_chunks(sessions, stored.id))
    assert all(len(c) == 5 for c in chunks[:-1])
    assert b"".join(chunks) == data
    assert list(store.iter_lines(iter(chunks))) == (lines or [b""])
