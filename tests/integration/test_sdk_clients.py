"""The official OpenAI and Anthropic SDKs, unmodified, against the real API and worker processes:
only the base URL and the key change (SPEC §11)."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from shared.sim import SimServer
from shared.stack import Stack
from tests.conftest import new_key
from tests.helpers import TERMINAL, poll

pytestmark = pytest.mark.integration


def openai_client(stack: Stack, key: str) -> openai.OpenAI:
    assert stack.api_url
    return openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key=key, max_retries=0, timeout=60)


def anthropic_client(stack: Stack, key: str) -> anthropic.Anthropic:
    assert stack.api_url
    return anthropic.Anthropic(base_url=stack.api_url, api_key=key, max_retries=0, timeout=60)


def chat_line(custom_id: str, model: str, question: str) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 200},
    }


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE) for line in lines)


def wait_openai(client: openai.OpenAI, batch_id: str, timeout: float = 120) -> Any:
    def ended() -> Any:
        batch = client.batches.retrieve(batch_id)
        return batch if batch.status in TERMINAL else None

    return poll(ended, timeout, interval=0.25, what=f"batch {batch_id} to end")


def content_lines(client: openai.OpenAI, file_id: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in client.files.content(file_id).content.splitlines()]


def test_openai_files_and_batches_round_trip(stack: Stack, sim: SimServer, sessions: Any) -> None:
    client = openai_client(stack, new_key(sessions)[0])
    # Not in sorted order, so "in input order" cannot pass by accident; council and single lines mixed.
    custom_ids = [f"req-{n}" for n in (7, 3, 11, 0, 5, 9)]
    lines = [
        chat_line(cid, "council" if i % 2 == 0 else "sim:alpha", f"[tag:{cid}] What is {i} + {i}?")
        for i, cid in enumerate(custom_ids)
    ]
    data = jsonl(lines)
    uploaded = client.files.create(file=("questions.jsonl", data), purpose="batch")
    assert (uploaded.bytes, uploaded.purpose, uploaded.status) == (len(data), "batch", "processed")
    assert uploaded.id.startswith("file-") and uploaded.filename == "questions.jsonl"
    assert client.files.content(uploaded.id).content == data

    created = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"project": "sdk-test"},
    )
    assert created.endpoint == "/v1/chat/completions"
    assert created.input_file_id == uploaded.id
    assert created.status == "in_progress" and created.output_file_id is None

    done = wait_openai(client, created.id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (6, 6, 0)
    assert done.metadata == {"project": "sdk-test"}
    assert done.output_file_id and done.error_file_id

    output = content_lines(client, done.output_file_id)
    assert [line["custom_id"] for line in output] == custom_ids
    for i, line in enumerate(output):
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["model"] == ("council" if i % 2 == 0 else "sim:alpha")
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["choices"][0]["message"]["content"]
        assert (
            body["usage"]["total_tokens"]
            == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
        )
        if i % 2 == 0:
            assert [m["model"] for m in body["council"]["members"]] == ["sim:alpha", "sim:beta", "sim:gamma"]
            assert body["council"]["synthesis"] == "chairman"
        else:
            assert "council" not in body
    assert client.files.content(done.error_file_id).content == b""

    output_file = client.files.retrieve(done.output_file_id)
    assert output_file.purpose == "batch_output"
    assert output_file.bytes == len(client.files.content(done.output_file_id).content)

    assert created.id in [b.id for b in client.batches.list(limit=10)]
    listed = [f.id for f in client.files.list()]
    assert uploaded.id in listed and done.output_file_id in listed

    deleted = client.files.delete(uploaded.id)
    assert deleted.deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_openai_cancel_keeps_what_finished(stack: Stack, sim: SimServer, sessions: Any) -> None:
    client = openai_client(stack, new_key(sessions)[0])
    httpx.post(f"{sim.url}/_sim/config", json={"latency_ms": 1500}).raise_for_status()
    custom_ids = [f"c-{i}" for i in range(40)]
    data = jsonl([chat_line(cid, "sim:alpha", f"[tag:{cid}] Name a colour.") for cid in custom_ids])
    uploaded = client.files.create(file=("slow.jsonl", data), purpose="batch")
    created = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    cancelling = client.batches.cancel(created.id)
    assert cancelling.status in ("cancelling", "cancelled")

    done = wait_openai(client, created.id)
    assert done.status == "cancelled"
    assert done.output_file_id and done.error_file_id
    output = content_lines(client, done.output_file_id)
    errors = content_lines(client, done.error_file_id)
    assert done.request_counts is not None
    assert len(output) == done.request_counts.completed
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}
    # Every line is in one file or the other, each file in input order.
    assert sorted(line["custom_id"] for line in output + errors) == sorted(custom_ids)
    for lines in (output, errors):
        order = [custom_ids.index(line["custom_id"]) for line in lines]
        assert order == sorted(order)


def anthropic_request(custom_id: str, model: str, question: str) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "params": {
            "model": model,
            "max_tokens": 200,
            "system": "Answer in one sentence.",
            "messages": [{"role": "user", "content": question}],
        },
    }


def test_anthropic_message_batches_round_trip(stack: Stack, sim: SimServer, sessions: Any) -> None:
    key = new_key(sessions)[0]
    client = anthropic_client(stack, key)
    custom_ids = ["b", "a", "c", "e", "d"]
    requests = [
        anthropic_request(
            cid, "sim:beta" if i % 2 else "council", f"[tag:anthropic-{cid}] Why is the sky blue?"
        )
        for i, cid in enumerate(custom_ids)
    ]
    created = client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    assert created.type == "message_batch" and created.processing_status == "in_progress"
    assert created.results_url is None

    def ended() -> Any:
        batch = client.messages.batches.retrieve(created.id)
        return batch if batch.processing_status == "ended" else None

    done = poll(ended, 120, interval=0.25, what="the message batch to end")
    assert done.request_counts.succeeded == 5 and done.request_counts.processing == 0
    assert done.ended_at is not None and done.results_url
    results = list(client.messages.batches.results(created.id))
    assert [r.custom_id for r in results] == custom_ids
    for r in results:
        assert r.result.type == "succeeded"
        assert r.result.message.content[0].type == "text"
        assert r.result.message.content[0].text
        assert r.result.message.usage.input_tokens > 0
    assert created.id in [b.id for b in client.messages.batches.list(limit=20)]

    # The same batch through the OpenAI shape: one batch, two views.
    same = openai_client(stack, key).batches.retrieve(created.id)
    assert same.status == "completed" and same.request_counts is not None
    assert same.request_counts.completed == 5


def test_anthropic_cancel_and_canceled_results(stack: Stack, sim: SimServer, sessions: Any) -> None:
    client = anthropic_client(stack, new_key(sessions)[0])
    httpx.post(f"{sim.url}/_sim/config", json={"latency_ms": 1500}).raise_for_status()
    requests = [anthropic_request(f"x-{i}", "sim:alpha", f"[tag:anthropic-x-{i}] Hi") for i in range(40)]
    created = client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    cancelled = client.messages.batches.cancel(created.id)
    assert cancelled.processing_status in ("canceling", "ended")
    assert cancelled.cancel_initiated_at is not None

    def ended() -> Any:
        batch = client.messages.batches.retrieve(created.id)
        return batch if batch.processing_status == "ended" else None

    done = poll(ended, 120, interval=0.25, what="the message batch to end")
    assert done.request_counts.canceled > 0
    kinds = [r.result.type for r in client.messages.batches.results(created.id)]
    assert len(kinds) == 40 and set(kinds) <= {"succeeded", "canceled"}
    assert kinds.count("canceled") == done.request_counts.canceled


def test_an_openai_batch_reads_as_a_message_batch(stack: Stack, sim: SimServer, sessions: Any) -> None:
    key = new_key(sessions)[0]
    oai = openai_client(stack, key)
    uploaded = oai.files.create(
        file=("one.jsonl", jsonl([chat_line("only", "sim:gamma", "Hello?")])), purpose="batch"
    )
    created = oai.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_openai(oai, created.id)
    view = anthropic_client(stack, key).messages.batches.retrieve(created.id)
    assert view.processing_status == "ended" and view.request_counts.succeeded == 1
    results = list(anthropic_client(stack, key).messages.batches.results(created.id))
    assert [(r.custom_id, r.result.type) for r in results] == [("only", "succeeded")]


def test_anthropic_requests_are_checked_before_anything_is_stored(stack: Stack, sessions: Any) -> None:
    client = anthropic_client(stack, new_key(sessions)[0])
    with pytest.raises(anthropic.UnprocessableEntityError) as raised:
        client.messages.batches.create(
            requests=[anthropic_request("a", "no-such-model", "Hi")]  # type: ignore[list-item]
        )
    error = raised.value.body["error"]  # type: ignore[index]
    assert error["param"] == "requests[0].params.model"
    assert list(client.messages.batches.list()) == []


def test_a_bad_key_is_refused_in_either_header(stack: Stack) -> None:
    with pytest.raises(anthropic.AuthenticationError):
        anthropic_client(stack, "cnk_not-a-key").messages.batches.list()
    with pytest.raises(openai.AuthenticationError):
        openai_client(stack, "cnk_not-a-key").files.list()


def test_an_inline_batch_has_output_files_too(stack: Stack, sim: SimServer, sessions: Any) -> None:
    key = new_key(sessions)[0]
    assert stack.api_url
    created = httpx.post(
        f"{stack.api_url}/v1/batches",
        headers={"Authorization": f"Bearer {key}"},
        json={"queries": [{"custom_id": "p", "prompt": "Hi?"}, {"custom_id": "o", "prompt": "Ho?"}]},
    ).json()
    client = openai_client(stack, key)
    done = wait_openai(client, created["id"])
    assert done.endpoint == "/v1/council" and done.output_file_id
    output = content_lines(client, done.output_file_id)
    assert [line["custom_id"] for line in output] == ["p", "o"]
    assert all(line["response"]["body"]["model"] == "council" for line in output)
    assert all("council" in line["response"]["body"] for line in output)
