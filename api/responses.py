"""JSON responses serialised with orjson (datetimes, large lists) without FastAPI's re-validation."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import orjson
from fastapi.responses import Response, StreamingResponse

from api.schemas import ErrorResponse

# Every route documents SPEC's error body for the statuses the API can answer with.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 402, 403, 404, 409, 413, 422, 429, 503)
}


class JSONBytes(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def list_page(rows: list[dict[str, Any]], has_more: bool = False) -> JSONBytes:
    """SPEC's list envelope: ``{"object": "list", "data", "has_more", "first_id", "last_id"}``."""
    return JSONBytes(
        {
            "object": "list",
            "data": rows,
            "has_more": has_more,
            "first_id": rows[0]["id"] if rows and "id" in rows[0] else None,
            "last_id": rows[-1]["id"] if rows and "id" in rows[-1] else None,
        }
    )


def attachment(
    body: Iterator[bytes] | Iterable[bytes], media_type: str, filename: str, size: int | None = None
) -> StreamingResponse:
    """A streamed download the client saves as ``filename`` (``Content-Length`` when known)."""
    headers = {"Content-Disposition": f'attachment; filename="{filename}"'}
    if size is not None:
        headers["Content-Length"] = str(size)
    return StreamingResponse(body, media_type=media_type, headers=headers)
