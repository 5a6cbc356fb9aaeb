"""A batch's output and error files, served as views of its results rather than stored copies.

Why a view: the results read model (the ``queries`` rows) already holds every line's content, in
input order (``seq``), so an output file needs no copy. It is ready the moment the batch ends — a
batch that ends ``completed``, ``cancelled`` or ``expired`` shows its files at once, with whatever
finished, and nothing at finalisation can fail or lag (OpenAI's users wait in ``finalizing`` long
after 100%). Materialising instead would write the whole file (about 100 MB for 50,000 lines)
inside or after the finalising transaction, on whichever process finalised (a worker, a cancel,
the expiry job). The price of a view is rendering on download; ``benchmarks/files.py`` measures
it. A view's size is measured once, the first time it is asked for after the batch ended, and
kept: a finished batch's rows no longer change and rendering is deterministic
(``shared.files.output``), so the size holds.

Output file: succeeded queries. Error file: failed, cancelled and expired ones (OpenAI puts
requests a batch never ran in the error file as ``batch_expired``/``batch_cancelled``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import orjson
from sqlalchemy import func, literal, select
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from shared.batches.results import OUTCOME_COLUMNS, iter_rows_in_order
from shared.files import output
from shared.files.store import iter_chunks, set_size
from shared.lifecycle.statuses import BATCH_TERMINAL, QUERY_TERMINAL, QueryStatus
from shared.models import Batch, Query, StoredFile

PAGE = 1000
STATUSES = {
    "output": (QueryStatus.SUCCEEDED,),
    "error": (QueryStatus.FAILED, QueryStatus.CANCELLED, QueryStatus.EXPIRED),
}


def default_model(council: dict[str, Any]) -> str:
    """What an inline batch's queries asked for, as an output line's ``model``."""
    if council.get("mode") == "single" and council.get("members"):
        return str(council["members"][0])
    return output.COUNCIL


def iter_rows(
    sessions: sessionmaker[Session], batch_id: str, statuses: tuple[str, ...] = QUERY_TERMINAL
) -> Iterator[Any]:
    """Finished queries of a batch in input order, a page per short transaction."""
    with sessions() as session:
        council = session.scalar(select(col(Batch.council)).where(col(Batch.id) == batch_id)) or {}
    model = func.coalesce(col(Query.request)["model"].as_string(), literal(default_model(council)))
    columns = (*OUTCOME_COLUMNS, col(Query.finished_at), model.label("model"))
    yield from iter_rows_in_order(sessions, batch_id, columns, statuses, PAGE)


def _lines(rows: Iterator[Any], render: Callable[[Any], dict[str, Any]]) -> Iterator[bytes]:
    for row in rows:
        yield orjson.dumps(render(row), option=orjson.OPT_APPEND_NEWLINE)


def view_lines(sessions: sessionmaker[Session], stored: StoredFile) -> Iterator[bytes]:
    assert stored.batch_id is not None and stored.kind in STATUSES
    return _lines(iter_rows(sessions, stored.batch_id, STATUSES[stored.kind]), output.openai_line)


def anthropic_results(sessions: sessionmaker[Session], batch_id: str) -> Iterator[bytes]:
    return _lines(iter_rows(sessions, batch_id), output.anthropic_result)


def content(sessions: sessionmaker[Session], stored: StoredFile, size: int = 64 * 1024) -> Iterator[bytes]:
    """A file's bytes in pieces of about ``size``: an upload's chunks, or a view rendered now
    (whose size is recorded when it was not known yet)."""
    if stored.batch_id is None:
        yield from iter_chunks(sessions, stored.id)
        return
    buf: list[bytes] = []
    pending = total = lines = 0
    for line in view_lines(sessions, stored):
        buf.append(line)
        pending += len(line)
        total += len(line)
        lines += 1
        if pending >= size:
            yield b"".join(buf)
            buf, pending = [], 0
    if buf:
        yield b"".join(buf)
    if stored.bytes is None:
        set_size(sessions, stored.id, total, lines)


def ensure_size(sessions: sessionmaker[Session], stored: StoredFile) -> StoredFile:
    """A view's ``bytes``, measured by rendering it once if it never was."""
    if stored.bytes is None and stored.batch_id is not None:
        total = lines = 0
        for line in view_lines(sessions, stored):
            total += len(line)
            lines += 1
        set_size(sessions, stored.id, total, lines)
        stored.bytes, stored.lines = total, lines
    return stored


def measure_ended_views(sessions: sessionmaker[Session], limit: int = 20) -> int:
    """Measure views of batches that have ended and were never asked for (a scheduler job), so a
    file list seldom has to render one; returns how many it measured."""
    ended = select(col(Batch.id)).where(col(Batch.status).in_(BATCH_TERMINAL))
    with sessions() as session:
        pending = list(
            session.scalars(
                select(StoredFile)
                .where(col(StoredFile.bytes).is_(None), col(StoredFile.batch_id).in_(ended))
                .limit(limit)
            )
        )
    for stored in pending:
        ensure_size(sessions, stored)
    return len(pending)
