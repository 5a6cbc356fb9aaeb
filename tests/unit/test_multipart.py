"""A malformed multipart body is the client's mistake (400), never a server error.

Found by schemathesis: a part with no headers made python-multipart raise inside the route."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from api.multipart import MultipartUpload
from shared.errors import BadRequest


def pieces(*chunks: bytes) -> Callable[[], bytes | None]:
    queue = list(chunks)
    return lambda: queue.pop(0) if queue else None


def test_a_part_without_headers_is_a_bad_request() -> None:
    boundary = "0d37f771f3609e9baf6be26654101f5f"
    body = f"--{boundary}\r\nTrue--{boundary}--\r\n".encode()
    upload = MultipartUpload(f"multipart/form-data; boundary={boundary}", pieces(body))
    with pytest.raises(BadRequest, match="malformed"):
        upload.read(1024)


def test_a_well_formed_upload_reads_its_file() -> None:
    boundary = "b"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n\r\n'
        f"line\r\n--{boundary}--\r\n"
    ).encode()
    upload = MultipartUpload(f"multipart/form-data; boundary={boundary}", pieces(body[:40], body[40:]))
    assert upload.read(1024) == b"line"
    assert upload.read(1024) == b""
    assert upload.finish()["purpose"] == "batch"
