"""OpenAI batch lines in and out, Anthropic's shapes: pure parsing, validation and rendering."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from shared.files import anthropic, output
from shared.files.lines import FileCheck, InvalidFile, LineRules, parse_line, resolve_work, validate_file
from shared.files.store import iter_lines
from shared.providers.config import parse_catalog

CATALOG = parse_catalog(
    {
        "providers": {
            "sim": {"api": "openai", "base_url": "http://127.0.0.1:1/v1"},
            "other": {"api": "anthropic", "base_url": "http://127.0.0.1:2"},
        },
        "models": {"sim:alpha": {"input_usd_per_mtok": 1.0}, "other:claude-x": {}},
        "council": {"members": ["sim:alpha", "sim:beta"], "chairman": "sim:chair"},
        "councils": {"duo": {"members": ["sim:beta", "other:claude-x"], "chairman": "sim:beta"}},
    }
)
RULES = LineRules(max_prompt_chars=1000)


def line(custom_id: str = "q-1", model: str = "council", **overrides: Any) -> bytes:
    doc: dict[str, Any] = {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": "What is 2+2?"}]},
    }
    doc.update(overrides)
    return orjson.dumps(doc)


def test_model_picks_the_work_of_each_line() -> None:
    assert resolve_work("council", CATALOG) == {
        "mode": "council",
        "members": ["sim:alpha", "sim:beta"],
        "chairman": "sim:chair",
    }
    assert resolve_work("council:duo", CATALOG) == {
        "mode": "council",
        "members": ["sim:beta", "other:claude-x"],
        "chairman": "sim:beta",
    }
    # A full id of a configured provider, and a bare name the configuration names once.
    assert resolve_work("sim:gamma", CATALOG) == {
        "mode": "single",
        "members": ["sim:gamma"],
        "chairman": "sim:gamma",
    }
    assert resolve_work("claude-x", CATALOG)["members"] == ["other:claude-x"]  # type: ignore[index]
    assert "names no council preset 'trio'" in str(resolve_work("council:trio", CATALOG))
    assert "is unknown" in str(resolve_work("gpt-nonexistent", CATALOG))
    assert "is unknown" in str(resolve_work("nowhere:model", CATALOG))


def test_a_valid_line_becomes_a_request_doc() -> None:
    raw = line(
        "q-7",
        "sim:alpha",
        body={
            "model": "sim:alpha",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}],
                },
            ],
            "max_completion_tokens": 50,
            "temperature": 0.5,
            "top_p": 0.9,  # accepted and ignored, as OpenAI's other parameters are
        },
    )
    parsed, errors = parse_line(3, raw, CATALOG, RULES)
    assert errors == []
    assert parsed is not None and parsed.custom_id == "q-7" and parsed.line == 3
    assert parsed.request == {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"}],
        "max_tokens": 50,
        "temperature": 0.5,
        "model": "sim:alpha",
        "council": {"mode": "single", "members": ["sim:alpha"], "chairman": "sim:alpha"},
    }


def test_every_bad_line_is_reported_with_its_line_and_field() -> None:
    lines = [
        line("a"),
        b'{"custom_id": "b", "method": "POST", ',  # bad JSON
        line("a"),  # duplicate custom_id
        line("c", "gpt-nonexistent"),  # unknown model
        line("d", url="/v1/embeddings"),  # wrong url
        b"",  # blank lines are skipped but counted
        line("e"),
    ]
    report = validate_file(lines, CATALOG, RULES, max_requests=100)
    got = [(e["line"], e["code"], e["param"]) for e in report.errors]
    assert got == [
        (2, "invalid_json", None),
        (3, "duplicate_custom_id", "custom_id"),
        (4, "model_not_found", "body.model"),
        (5, "invalid_url", "url"),
    ]
    assert report.requests == 6
    assert "used by line 1" in report.errors[1]["message"]
    assert "'gpt-nonexistent' is unknown" in report.errors[2]["message"]
    assert report.errors_object()["object"] == "list"


def test_a_line_with_several_problems_reports_each() -> None:
    raw = orjson.dumps(
        {
            "custom_id": "x" * 65,
            "method": "GET",
            "url": "/v1/chat/completions",
            "body": {"model": "council", "messages": [{"role": "robot", "content": "hi"}], "temperature": 3},
        }
    )
    _, errors = parse_line(1, raw, CATALOG, RULES)
    assert [e["param"] for e in errors] == [
        "custom_id",
        "method",
        "body.messages[0].role",
        "body.temperature",
    ]


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "body.messages"),
        ([{"role": "system", "content": "only a system prompt"}], "body.messages"),
        ([{"role": "user", "content": ""}], "body.messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "body.messages[0].content"),
        ([{"role": "user", "content": "x" * 1001}], "body.messages"),
    ],
)
def test_messages_must_be_well_formed(messages: list[Any], param: str) -> None:
    raw = orjson.dumps(
        {
            "custom_id": "a",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "council", "messages": messages},
        }
    )
    _, errors = parse_line(1, raw, CATALOG, RULES)
    assert [e["param"] for e in errors] == [param]


def test_too_many_requests_and_empty_files_fail_whole() -> None:
    report = validate_file([line("a"), line("b")], CATALOG, RULES, max_requests=1)
    assert [e["code"] for e in report.errors] == ["too_many_requests"]
    assert [e["code"] for e in validate_file([b"", b"  "], CATALOG, RULES, max_requests=1).errors] == [
        "empty_file"
    ]


def test_error_list_is_capped_with_a_count_of_the_rest() -> None:
    report = validate_file([b"nope"] * 1005, CATALOG, RULES, max_requests=5000)
    data = report.errors_object()["data"]
    assert len(data) == 1001
    assert data[-1]["code"] == "too_many_errors" and "5 more" in data[-1]["message"]


def test_a_valid_file_yields_its_rows_in_file_order() -> None:
    parsed = list(FileCheck(CATALOG, RULES).rows([line("b"), b"", line("a", "council:duo")]))
    assert [(p.line, p.custom_id, p.request["model"]) for p in parsed] == [
        (1, "b", "council"),
        (3, "a", "council:duo"),
    ]


def test_rows_stop_at_the_first_bad_line_and_the_whole_file_is_still_checked() -> None:
    check = FileCheck(CATALOG, RULES)
    got = []
    with pytest.raises(InvalidFile) as raised:
        for parsed in check.rows([line("a"), b"{", line("b"), line("a"), line("c", "nope")]):
            got.append(parsed.custom_id)
    assert got == ["a"]
    assert [(e["line"], e["code"]) for e in raised.value.report.errors] == [
        (2, "invalid_json"),
        (4, "duplicate_custom_id"),
        (5, "model_not_found"),
    ]


def test_lines_span_chunks_and_lose_their_line_ends() -> None:
    chunks = iter([b'{"a":1}\r\n{"b"', b":2}\n\n", b'{"c":3}'])
    assert list(iter_lines(chunks)) == [b'{"a":1}', b'{"b":2}', b"", b'{"c":3}']


def row(status: str, model: str = "sim:alpha", **overrides: Any) -> SimpleNamespace:
    base: dict[str, Any] = {
        "id": "query_01abc",
        "custom_id": "q-1",
        "status": status,
        "result": {
            "answer": "4",
            "synthesis": "single",
            "members": [{"model": "sim:alpha", "status": "succeeded", "error": None, "latency_ms": 3}],
            "aggregate_ranking": [],
            "citations": [],
        },
        "error": None,
        "input_tokens": 10,
        "output_tokens": 2,
        "finished_at": 1700000000,
        "model": model,
    }
    base.update(overrides)
    return SimpleNamespace(**base)


def test_a_succeeded_single_model_line_is_a_chat_completion() -> None:
    rendered = output.openai_line(row("succeeded"))
    assert rendered == {
        "id": "batch_req_01abc",
        "custom_id": "q-1",
        "response": {
            "status_code": 200,
            "request_id": "req_01abc",
            "body": {
                "id": "chatcmpl-01abc",
                "object": "chat.completion",
                "created": 1700000000,
                "model": "sim:alpha",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "4", "refusal": None},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
            },
        },
        "error": None,
    }
    # Deterministic: the same row renders to the same bytes (output files are views).
    assert orjson.dumps(output.openai_line(row("succeeded"))) == orjson.dumps(rendered)


def test_council_lines_carry_the_council() -> None:
    body = output.openai_line(row("succeeded", model="council:duo"))["response"]["body"]
    assert body["council"]["synthesis"] == "single"
    assert body["council"]["members"] == [
        {"model": "sim:alpha", "status": "succeeded", "error": None, "latency_ms": 3}
    ]
    assert set(body["council"]) == {"members", "aggregate_ranking", "synthesis", "chairman", "citations"}


def test_error_lines_say_what_happened() -> None:
    failed = output.openai_line(row("failed", error={"type": "rate_limited", "message": "slow down"}))
    assert failed["response"]["status_code"] == 429
    assert failed["response"]["body"]["error"]["message"] == "slow down"
    expired = output.openai_line(row("expired", error={"type": "expired", "message": "window passed"}))
    assert expired["response"] is None and expired["error"] == {
        "code": "batch_expired",
        "message": "window passed",
    }
    assert output.openai_line(row("cancelled"))["error"]["code"] == "batch_cancelled"


def test_anthropic_results_by_status() -> None:
    succeeded = output.anthropic_result(row("succeeded"))["result"]
    assert succeeded["type"] == "succeeded"
    assert succeeded["message"]["content"] == [{"type": "text", "text": "4"}]
    assert succeeded["message"]["usage"] == {"input_tokens": 10, "output_tokens": 2}
    errored = output.anthropic_result(row("failed", error={"type": "auth", "message": "bad key"}))["result"]
    assert errored == {
        "type": "errored",
        "error": {"type": "error", "error": {"type": "authentication_error", "message": "bad key"}},
    }
    assert output.anthropic_result(row("cancelled"))["result"] == {"type": "canceled"}
    assert output.anthropic_result(row("expired"))["result"] == {"type": "expired"}


def test_anthropic_requests_use_the_same_checks() -> None:
    parsed, problems = anthropic.parse_requests(
        [
            {
                "custom_id": "a",
                "params": {
                    "model": "council:duo",
                    "max_tokens": 10,
                    "system": "Be brief.",
                    "messages": [{"role": "user", "content": "Hi"}],
                },
            },
            {
                "custom_id": "a",
                "params": {"model": "gpt-nonexistent", "messages": [{"role": "user", "content": "Hi"}]},
            },
        ],
        CATALOG,
        RULES,
    )
    assert [p.custom_id for p in parsed] == ["a"]
    assert parsed[0].request["messages"][0] == {"role": "system", "content": "Be brief."}
    assert [p for p, _ in problems] == [
        "requests[1].custom_id",
        "requests[1].params.max_tokens",
        "requests[1].params.model",
    ]


def test_a_message_batch_is_a_view_of_a_batch() -> None:
    batch = {
        "id": "batch_1",
        "status": "cancelling",
        "request_counts": {
            "total": 5,
            "completed": 1,
            "failed": 1,
            "queued": 1,
            "running": 1,
            "cancelled": 1,
            "expired": 0,
        },
        "created_at": 1700000000,
        "expires_at": 1700086400,
        "cancelling_at": 1700000100,
    }
    view = anthropic.message_batch(batch, "http://x/v1/messages/batches/batch_1/results")
    assert view["processing_status"] == "canceling"
    assert view["request_counts"] == {
        "processing": 2,
        "succeeded": 1,
        "errored": 1,
        "canceled": 1,
        "expired": 0,
    }
    assert view["created_at"] == "2023-11-14T22:13:20Z"
    assert view["results_url"] is None and view["ended_at"] is None
    ended = anthropic.message_batch({**batch, "status": "cancelled", "cancelled_at": 1700000200}, "u")
    assert ended["processing_status"] == "ended" and ended["results_url"] == "u"
    assert ended["ended_at"] == "2023-11-14T22:16:40Z"


def test_text_that_cannot_be_stored_is_refused_not_crashed_on() -> None:
    # A JSON body parsed by the standard library may carry lone surrogates; no driver stores them.
    _, problems = anthropic.parse_requests(
        [
            {
                "custom_id": "a\udc00",
                "params": {
                    "model": "council",
                    "max_tokens": 5,
                    "messages": [{"role": "user", "content": "hi \ud800"}],
                },
            }
        ],
        CATALOG,
        RULES,
    )
    assert [p for p, _ in problems] == ["requests[0].custom_id", "requests[0].params"]


def test_an_idempotency_fingerprint_takes_any_json() -> None:
    from shared.files.intake import _fingerprint
    from shared.schemas import MessageBatchCreate

    odd = MessageBatchCreate(requests=[{"custom_id": "a", "params": {"n": 2**70, "s": "\udc00"}}])
    assert _fingerprint(odd) == _fingerprint(odd.model_copy()) and len(_fingerprint(odd)) == 64
