"""``/v1/files`` (SPEC §11): upload (streamed), list, retrieve, content (streamed), delete.

Thin: the bytes go to ``shared.files.store`` as they arrive (``api.multipart``); a batch's
output and error files are rendered by ``shared.files.views``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Literal

import anyio.from_thread
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from api.deps import PrincipalDep, SessionDep, StateDep, WriterDep
from api.multipart import MultipartUpload
from api.responses import ERROR_RESPONSES, JSONBytes, attachment, list_page
from shared.files import store, views

router = APIRouter(prefix="/v1/files", tags=["files"])

# The app's body limit (CONCLAVE_MAX_REQUEST_BYTES) is for JSON bodies; an upload is limited by
# CONCLAVE_MAX_FILE_BYTES, counted as it streams in (store.store_upload), so the route lifts it.
UPLOAD_BODY_CEILING = 1 << 40

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": list(store.PURPOSES)},
                        "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                        "expires_after[seconds]": {"type": "integer"},
                    },
                }
            }
        },
    }
}


def _limits(state: StateDep) -> store.FileLimits:
    settings = state.settings
    return store.FileLimits(
        max_bytes=settings.max_file_bytes,
        max_lines=settings.max_file_lines,
        expiry_s=settings.file_expiry_days * 86400,
    )


@router.post("", responses=ERROR_RESPONSES, openapi_extra=UPLOAD_BODY, max_body_size=UPLOAD_BODY_CEILING)
def upload_file(request: Request, state: StateDep, principal: WriterDep) -> JSONBytes:
    # A sync route runs on a worker thread: it pulls the body from the event loop a piece at a
    # time, so the authentication above happened before any of it was read.
    body: AsyncIterator[bytes] = request.stream()

    async def next_piece() -> bytes | None:
        # The server hands the body over in pieces of ~64 KiB; a thread hop per piece is the
        # upload's largest overhead, so up to a chunk's worth is gathered on the loop first.
        pieces: list[bytes] = []
        size = 0
        while size < store.CHUNK_BYTES:
            try:
                piece = await body.__anext__()
            except StopAsyncIteration:
                break
            pieces.append(piece)
            size += len(piece)
        return b"".join(pieces) or None

    upload = MultipartUpload(request.headers.get("content-type"), lambda: anyio.from_thread.run(next_piece))
    stored = store.store_upload(state.sessions, principal.tenant_id, upload, limits=_limits(state))
    return JSONBytes(store.file_object(stored))


@router.get("", responses=ERROR_RESPONSES)
def list_files(
    session: SessionDep,
    principal: PrincipalDep,
    state: StateDep,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 20,
    after: Annotated[str | None, Query(max_length=64)] = None,
    order: Literal["asc", "desc"] = "desc",
    purpose: Annotated[str | None, Query(max_length=32)] = None,
) -> JSONBytes:
    rows, has_more = store.list_files(
        session, principal.tenant_id, limit=limit, after=after, purpose=purpose, order=order
    )
    return list_page([store.file_object(views.ensure_size(state.sessions, f)) for f in rows], has_more)


@router.get("/{file_id}", responses=ERROR_RESPONSES)
def get_file(file_id: str, session: SessionDep, principal: PrincipalDep, state: StateDep) -> JSONBytes:
    stored = store.get_file(session, principal.tenant_id, file_id)
    return JSONBytes(store.file_object(views.ensure_size(state.sessions, stored)))


@router.get(
    "/{file_id}/content",
    responses={200: {"content": {"application/octet-stream": {}}}, **ERROR_RESPONSES},
    response_class=StreamingResponse,
)
def file_content(
    file_id: str, session: SessionDep, principal: PrincipalDep, state: StateDep
) -> StreamingResponse:
    stored = store.get_file(session, principal.tenant_id, file_id)
    return attachment(
        views.content(state.sessions, stored), "application/octet-stream", stored.filename, stored.bytes
    )


@router.delete("/{file_id}", responses=ERROR_RESPONSES)
def delete_file(file_id: str, state: StateDep, principal: WriterDep) -> JSONBytes:
    store.delete_file(state.sessions, principal.tenant_id, file_id)
    return JSONBytes({"id": file_id, "object": "file", "deleted": True})
