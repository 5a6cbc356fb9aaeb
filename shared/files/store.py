"""Uploaded files (SPEC §11): stored in the database in 1 MiB chunks, read back a chunk at a time.

Why the database and not a directory or an object store: it is the one store every API replica
and worker already shares and that already survives restarts (SPEC §1: the source of truth), on
SQLite as on PostgreSQL, so no file can live only on one replica's disk, a file and the batch made
from it commit in the same database, and there is nothing new to deploy, back up or secure.
Chunks keep memory flat: an upload is written a chunk at a time as it arrives, a download reads a
chunk at a time, so neither side ever holds a whole file (up to ``CONCLAVE_MAX_FILE_BYTES``, 200
MB). PostgreSQL ``bytea`` and SQLite BLOBs both take 1 MiB rows without TOAST or overflow-page
trouble worth measuring; ``benchmarks/files.py`` measures upload and download on both.

This module owns the ``files`` and ``file_chunks`` tables. A batch's output and error files are
rows here too, but without chunks: ``shared.files.views`` renders them from the batch's results.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from shared.db import id_page, write_transaction
from shared.errors import InvalidField, NotFound, PayloadTooLarge
from shared.ids import new_id
from shared.lifecycle.statuses import BATCH_TERMINAL
from shared.models import FILE_CHUNKS, FILES, Batch, FileChunk, StoredFile

CHUNK_BYTES = 1024 * 1024
PURPOSES = ("batch",)
VIEW_PURPOSE = "batch_output"
# OpenAI's bounds for ``expires_after.seconds``.
MIN_EXPIRY_S = 3600
MAX_EXPIRY_S = 30 * 86400
PURGE_PAGE = 500


def new_file_id() -> str:
    """``file-<26 chars>``: OpenAI's prefix, time-ordered like every other id (``shared.ids``)."""
    return "file-" + new_id("f")[2:]


@dataclass(frozen=True)
class FileLimits:
    max_bytes: int
    max_lines: int
    expiry_s: int  # when the upload names no expiry


class UploadSource(Protocol):
    """An upload being received: the file's bytes, then the form's other fields."""

    filename: str | None

    def read(self, size: int) -> bytes: ...

    def finish(self) -> dict[str, str]: ...


def store_upload(
    sessions: sessionmaker[Session], tenant_id: str, source: UploadSource, *, limits: FileLimits
) -> StoredFile:
    """Copy the upload into the database a chunk at a time as it arrives; refuse it whole
    (nothing stored) when it is over the size or line limit or its fields are wrong. The form's
    fields are read after the file, since a client may send them in either order."""
    now = int(time.time())
    stored = StoredFile(
        id=new_file_id(), tenant_id=tenant_id, purpose="batch", filename="", bytes=0, created_at=now
    )
    size = lines = 0
    rest = b""
    with write_transaction(sessions) as session:
        session.execute(insert(FILES), [_row(stored)])
        seq = 0
        while chunk := source.read(CHUNK_BYTES):
            size += len(chunk)
            if size > limits.max_bytes:
                raise PayloadTooLarge(f"a file holds at most {limits.max_bytes} bytes", param="file")
            # Lines that are not blank: the requests a batch file holds (the line limit's unit).
            parts = (rest + chunk).split(b"\n")
            rest = parts.pop()
            lines += sum(1 for part in parts if part.strip())
            if lines > limits.max_lines:
                raise PayloadTooLarge(f"a file holds at most {limits.max_lines} lines", param="file")
            session.execute(insert(FILE_CHUNKS), [{"file_id": stored.id, "seq": seq, "data": chunk}])
            seq += 1
        if rest.strip():
            lines += 1  # a last line without its newline
        if lines > limits.max_lines:
            raise PayloadTooLarge(f"a file holds at most {limits.max_lines} lines", param="file")
        if size == 0:
            raise InvalidField("the file is empty", param="file")
        fields = source.finish()
        purpose = fields.get("purpose")
        if purpose not in PURPOSES:
            raise InvalidField(
                f"purpose must be one of {', '.join(PURPOSES)}, got {purpose!r}", param="purpose"
            )
        stored.purpose = purpose
        stored.filename = (source.filename or "upload.jsonl")[:255]
        stored.bytes, stored.lines = size, lines
        stored.expires_at = now + _expiry(fields, limits.expiry_s)
        session.execute(
            update(FILES)
            .where(FILES.c.id == stored.id)
            .values(
                purpose=stored.purpose,
                filename=stored.filename,
                bytes=size,
                lines=lines,
                expires_at=stored.expires_at,
            )
        )
    return stored


def _expiry(fields: dict[str, str], default_s: int) -> int:
    """Seconds to keep the file: OpenAI's ``expires_after[anchor]=created_at`` and
    ``expires_after[seconds]``, or the default."""
    anchor = fields.get("expires_after[anchor]", "created_at")
    if anchor != "created_at":
        raise InvalidField("expires_after.anchor must be 'created_at'", param="expires_after.anchor")
    seconds = fields.get("expires_after[seconds]")
    if seconds is None:
        return default_s
    if not seconds.strip().isdigit() or not MIN_EXPIRY_S <= int(seconds) <= MAX_EXPIRY_S:
        raise InvalidField(
            f"expires_after.seconds must be an integer from {MIN_EXPIRY_S} to {MAX_EXPIRY_S}",
            param="expires_after.seconds",
        )
    return int(seconds)


def _row(stored: StoredFile) -> dict[str, Any]:
    return {c.name: getattr(stored, c.name) for c in FILES.columns}


def create_views(session: Session, batch: Batch, *, expires_at: int) -> None:
    """The rows of a new batch's output and error files (ids already on the batch), in the
    caller's transaction. They have no chunks: ``shared.files.views`` renders them."""
    session.execute(
        insert(FILES),
        [
            {
                "id": file_id,
                "tenant_id": batch.tenant_id,
                "purpose": VIEW_PURPOSE,
                "filename": f"{batch.id}_{kind}.jsonl",
                "bytes": None,
                "lines": 0,
                "batch_id": batch.id,
                "kind": kind,
                "created_at": batch.created_at,
                "expires_at": expires_at,
            }
            for file_id, kind in ((batch.output_file_id, "output"), (batch.error_file_id, "error"))
        ],
    )


def drop_views(session: Session, batch_id: str) -> None:
    session.execute(delete(FILES).where(FILES.c.batch_id == batch_id))


def _visible(stmt: Any) -> Any:
    """Only files that exist for the client: uploads, and views of batches that have ended."""
    ended = select(col(Batch.id)).where(col(Batch.status).in_(BATCH_TERMINAL))
    return stmt.where((col(StoredFile.batch_id).is_(None)) | (col(StoredFile.batch_id).in_(ended)))


def get_file(session: Session, tenant_id: str, file_id: str) -> StoredFile:
    found = session.scalars(_visible(select(StoredFile).where(col(StoredFile.id) == file_id))).first()
    # Another tenant's file, an expired one, and a batch's output before the batch ended are all
    # indistinguishable from a missing one.
    if found is None or found.tenant_id != tenant_id or _expired(found, int(time.time())):
        raise NotFound(f"no file {file_id!r}", param="file_id")
    return found


def _expired(stored: StoredFile, now: int) -> bool:
    return stored.expires_at is not None and stored.expires_at <= now


def list_files(
    session: Session,
    tenant_id: str,
    *,
    limit: int,
    after: str | None,
    purpose: str | None,
    order: str = "desc",
) -> tuple[list[StoredFile], bool]:
    stmt = _visible(select(StoredFile).where(col(StoredFile.tenant_id) == tenant_id))
    stmt = stmt.where(
        (col(StoredFile.expires_at).is_(None)) | (col(StoredFile.expires_at) > int(time.time()))
    )
    if purpose:
        stmt = stmt.where(col(StoredFile.purpose) == purpose)
    return id_page(session, stmt, col(StoredFile.id), limit=limit, after=after, newest_first=order != "asc")


# Chunks read per short transaction: 4 MiB at a time, a quarter of the round trips (and of the
# sessions) of one chunk per read, still far from holding a whole file.
READ_CHUNKS = 4


def iter_chunks(sessions: sessionmaker[Session], file_id: str) -> Iterator[bytes]:
    """An uploaded file's bytes, ``READ_CHUNKS`` chunks per short transaction (never the whole
    file at once)."""
    seq = 0
    while True:
        with sessions() as session:
            rows = list(
                session.execute(
                    select(col(FileChunk.seq), col(FileChunk.data))
                    .where(col(FileChunk.file_id) == file_id, col(FileChunk.seq) >= seq)
                    .order_by(col(FileChunk.seq))
                    .limit(READ_CHUNKS)
                )
            )
        for number, data in rows:
            if number != seq:
                return  # a gap: the file ends where its chunks stop following each other
            yield bytes(data)
            seq += 1
        if len(rows) < READ_CHUNKS:
            return


def iter_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The lines of a chunked file without their line ends; a line may span chunks."""
    rest = b""
    for chunk in chunks:
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        for part in parts:
            yield part.rstrip(b"\r")
    if rest:
        yield rest.rstrip(b"\r")


def set_size(sessions: sessionmaker[Session], file_id: str, size: int, lines: int) -> None:
    """Remember a view's measured size (it cannot change once its batch has ended)."""
    with write_transaction(sessions) as session:
        session.execute(
            update(FILES)
            .where(FILES.c.id == file_id, FILES.c.bytes.is_(None))
            .values(bytes=size, lines=lines)
        )


def delete_file(sessions: sessionmaker[Session], tenant_id: str, file_id: str) -> None:
    with write_transaction(sessions) as session:
        get_file(session, tenant_id, file_id)
        session.execute(delete(FILE_CHUNKS).where(FILE_CHUNKS.c.file_id == file_id))
        session.execute(delete(FILES).where(FILES.c.id == file_id))


def purge_expired(sessions: sessionmaker[Session], now: int | None = None) -> int:
    """Delete files past their ``expires_at`` (a scheduler job), a page per transaction so the
    database is never locked for long; returns how many went."""
    now = now or int(time.time())
    purged = 0
    while True:
        with sessions() as session:
            ids = list(
                session.scalars(
                    select(col(StoredFile.id))
                    .where(col(StoredFile.expires_at).is_not(None), col(StoredFile.expires_at) <= now)
                    .limit(PURGE_PAGE)
                )
            )
        if not ids:
            return purged
        for file_id in ids:
            # One file per transaction: a 200 MB file's chunks are a big enough delete on their own.
            with write_transaction(sessions) as session:
                session.execute(delete(FILE_CHUNKS).where(FILE_CHUNKS.c.file_id == file_id))
                session.execute(delete(FILES).where(FILES.c.id == file_id))
        purged += len(ids)


def file_object(stored: StoredFile) -> dict[str, Any]:
    """The OpenAI File object (SPEC §11)."""
    return {
        "id": stored.id,
        "object": "file",
        "bytes": stored.bytes if stored.bytes is not None else 0,
        "created_at": stored.created_at,
        "expires_at": stored.expires_at,
        "filename": stored.filename,
        "purpose": stored.purpose,
        "status": "processed",
        "status_details": None,
    }
