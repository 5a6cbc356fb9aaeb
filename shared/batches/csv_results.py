"""Result records as CSV rows (SPEC §3.1, §18): which columns, and cells safe in a spreadsheet.

A spreadsheet evaluates a cell that starts with ``=``, ``+``, ``-`` or ``@`` (and some do after a
leading tab or carriage return) as a formula, so an answer or a ``custom_id`` could run one on
the machine of whoever opens the file ("CSV injection"). Such a cell gets a leading ``'``, as
OWASP recommends: shown as text, the value otherwise intact. Numbers and JSON cells are never
affected (JSON starts with ``[`` or ``{``). JSONL results are not rendered here and keep every
value unchanged.

Pure: no I/O; the route streams what ``csv_lines`` yields.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from typing import Any

import orjson

CSV_FIELDS = (
    "custom_id",
    "query_id",
    "status",
    "answer",
    "error_type",
    "error_message",
    "synthesis",
    "members",
    "aggregate_ranking",
    "citations",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "latency_ms",
)

_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(text: str) -> str:
    """``text`` as a spreadsheet shows it literally: a leading ``'`` when it could start a formula."""
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def csv_row(record: dict[str, Any]) -> list[str | int | float]:
    """One result record (``shared.batches.results.result_record``) as the cells of ``CSV_FIELDS``."""
    error = record.get("error") or {}
    usage = record["usage"]
    return [
        safe_cell(record["custom_id"]),
        record["query_id"],
        record["status"],
        safe_cell(record.get("answer") or ""),
        safe_cell(error.get("type", "")),
        safe_cell(error.get("message", "")),
        safe_cell(record.get("synthesis") or ""),
        orjson.dumps(record["members"]).decode(),
        orjson.dumps(record["aggregate_ranking"]).decode(),
        orjson.dumps(record["citations"]).decode(),
        usage["input_tokens"],
        usage["output_tokens"],
        record["cost_usd"],
        record.get("latency_ms") if record.get("latency_ms") is not None else "",
    ]


def csv_lines(records: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    """The header, then one encoded CSV line (RFC 4180 quoting) per record, lazily."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_FIELDS)
    for record in records:
        writer.writerow(csv_row(record))
        yield out.getvalue().encode()
        out.seek(0)
        out.truncate()
    if out.tell():
        yield out.getvalue().encode()
