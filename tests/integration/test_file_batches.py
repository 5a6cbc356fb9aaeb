"""File batches over HTTP against real API and worker processes with a providers file of their
own (prices and a ``[councils.duo]`` preset): invalid files fail whole and call no provider;
mixed files run each line's own work; an expired batch keeps what finished."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import func, select
from sqlmodel import col

from shared.files.store import purge_expired
from shared.files.views import measure_ended_views
from shared.lifecycle.transitions import expire_batch
from shared.models import FileChunk, StoredFile
from shared.settings import Settings
from shared.sim import SimServer
from shared.stack import Stack
from tests.conftest import new_key, settings_env
from tests.helpers import jsonl, poll, sim_log, wait_for_batch

pytestmark = pytest.mark.integration

PRICES = {"alpha": (1.0, 2.0), "beta": (3.0, 5.0), "gamma": (0.5, 0.5), "chairman": (2.0, 4.0)}


def providers_toml(sim_url: str) -> str:
    models = "\n".join(
        f'[models."sim:{name}"]\ninput_usd_per_mtok = {i}\noutput_usd_per_mtok = {o}\n'
        for name, (i, o) in PRICES.items()
    )
    return f"""
[providers.sim]
api = "openai"
base_url = "{sim_url}/v1"
max_concurrency = 256

{models}
[council]
members = ["sim:alpha", "sim:beta", "sim:gamma"]
chairman = "sim:chairman"

[councils.duo]
members = ["sim:beta", "sim:gamma"]
chairman = "sim:beta"
"""


@pytest.fixture(scope="module")
def files_stack(
    settings: Settings, sim_server: SimServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    cfg: Path = tmp_path_factory.mktemp("files-cfg") / "providers.toml"
    cfg.write_text(providers_toml(sim_server.url))
    env = {
        **os.environ,
        **settings_env(settings),
        "CONCLAVE_PROVIDERS_FILE": str(cfg),
        # Queues of their own: the session's workers run with another configuration.
        "CONCLAVE_QUEUE_NAMESPACE": f"{settings.queue_namespace}-files",
    }
    stack = Stack(env=env, logs=tmp_path_factory.mktemp("files-logs"))
    try:
        stack.start_api()
        stack.start_workers(processes=1, threads=32)
        yield stack
    finally:
        stack.stop()
        if stack.dead():
            print(stack.log_text())


@pytest.fixture
def api(files_stack: Stack, sessions: Any) -> Iterator[httpx.Client]:
    assert files_stack.api_url
    key = new_key(sessions)[0]
    with httpx.Client(
        base_url=files_stack.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as c:
        yield c


def line(custom_id: str, model: str, question: str, **overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": question}]},
    }
    doc.update(overrides)
    return doc


def upload(api: httpx.Client, raw_lines: list[bytes]) -> str:
    response = api.post(
        "/v1/files", files={"file": ("in.jsonl", b"\n".join(raw_lines) + b"\n")}, data={"purpose": "batch"}
    )
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def create(api: httpx.Client, file_id: str, **extra: Any) -> dict[str, Any]:
    response = api.post(
        "/v1/batches",
        json={
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            **extra,
        },
    )
    assert response.status_code == 202, response.text
    return dict(response.json())


def download(api: httpx.Client, file_id: str) -> list[dict[str, Any]]:
    response = api.get(f"/v1/files/{file_id}/content")
    assert response.status_code == 200, response.text
    return jsonl(response)


def test_an_invalid_file_fails_whole_naming_each_line_and_field(api: httpx.Client, sim: SimServer) -> None:
    raw = [
        orjson.dumps(line("ok-1", "council", "[tag:bad-file-1] fine")),
        b'{"custom_id": "broken", "method": "POST", "url": ',
        orjson.dumps(line("ok-1", "council", "[tag:bad-file-3] reuses ok-1")),
        orjson.dumps(line("ok-4", "gpt-nonexistent", "[tag:bad-file-4] unknown model")),
        orjson.dumps(line("ok-5", "council", "[tag:bad-file-5] wrong url", url="/v1/embeddings")),
        orjson.dumps(line("ok-6", "sim:alpha", "[tag:bad-file-6] fine")),
    ]
    batch = create(api, upload(api, raw))
    assert batch["status"] == "failed" and batch["failed_at"] is not None
    assert batch["endpoint"] == "/v1/chat/completions"
    errors = batch["errors"]
    assert errors["object"] == "list"
    assert [(e["line"], e["code"], e["param"]) for e in errors["data"]] == [
        (2, "invalid_json", None),
        (3, "duplicate_custom_id", "custom_id"),
        (4, "model_not_found", "body.model"),
        (5, "invalid_url", "url"),
    ]
    assert all(e["message"].startswith(f"line {e['line']}") for e in errors["data"])
    assert batch["request_counts"]["total"] == 0 and batch["output_file_id"] is None
    assert api.get(f"/v1/batches/{batch['id']}").json()["status"] == "failed"

    # Nothing was enqueued: a valid batch sent after it runs, and the provider saw only that one.
    good = create(api, upload(api, [orjson.dumps(line("after", "sim:alpha", "[tag:bad-file-after] ok"))]))
    assert wait_for_batch(api, good["id"], 60)["status"] == "completed"
    texts = [r["text"] for r in sim_log(sim.url)]
    assert any("[tag:bad-file-after]" in t for t in texts)
    assert not any("[tag:bad-file-" in t and "[tag:bad-file-after]" not in t for t in texts)


def test_a_bad_line_after_thousands_of_good_ones_still_stores_nothing(
    api: httpx.Client, sim: SimServer
) -> None:
    # Valid lines stream into the insert a page (5,000 rows) at a time; the bad last line must
    # roll back the pages already written.
    good = [orjson.dumps(line(f"g-{i}", "sim:alpha", f"[tag:rollback-{i:05d}] hi")) for i in range(5001)]
    batch = create(api, upload(api, [*good, b"not json"]))
    assert batch["status"] == "failed"
    assert [(e["line"], e["code"]) for e in batch["errors"]["data"]] == [(5002, "invalid_json")]
    assert api.get(f"/v1/batches/{batch['id']}/results").content == b""
    after = create(api, upload(api, [orjson.dumps(line("after", "sim:alpha", "[tag:rollback-after] ok"))]))
    assert wait_for_batch(api, after["id"], 60)["status"] == "completed"
    assert not any("[tag:rollback-0" in r["text"] for r in sim_log(sim.url))


def test_a_bad_request_creates_nothing(api: httpx.Client) -> None:
    missing = api.post("/v1/batches", json={"input_file_id": "file-nope", "endpoint": "/v1/chat/completions"})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "input_file_id"
    file_id = upload(api, [orjson.dumps(line("a", "council", "hi"))])
    wrong = api.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/embeddings"})
    assert wrong.status_code == 422 and wrong.json()["error"]["param"] == "endpoint"
    assert api.get("/v1/batches").json()["data"] == []


def test_a_mixed_file_runs_each_lines_own_work(api: httpx.Client, sim: SimServer) -> None:
    lines = [
        line("council-1", "council", "[tag:mixed-council-1] What is 6 times 7?"),
        line("single-1", "sim:alpha", "[tag:mixed-single-1] Name a prime."),
        line("duo-1", "council:duo", "[tag:mixed-duo-1] Why is ice slippery?"),
        line("single-2", "beta", "[tag:mixed-single-2] Name a river."),  # a bare configured name
        line("single-3", "sim:gamma", "[tag:mixed-single-3] Name a tree."),
        line("duo-2", "council:duo", "[tag:mixed-duo-2] What is a lever?"),
    ]
    batch = create(api, upload(api, [orjson.dumps(x) for x in lines]))
    done = wait_for_batch(api, batch["id"], 120)
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 6
    output = {o["custom_id"]: o for o in download(api, done["output_file_id"])}
    assert list(output) == [x["custom_id"] for x in lines]
    log = sim_log(sim.url)

    def calls(tag: str) -> list[dict[str, Any]]:
        return [r for r in log if f"[tag:{tag}]" in r["text"]]

    results = {r["custom_id"]: r for r in jsonl(api.get(f"/v1/batches/{batch['id']}/results"))}
    for custom_id, model in (("single-1", "alpha"), ("single-2", "beta"), ("single-3", "gamma")):
        made = calls(f"mixed-{custom_id}")
        assert [(r["model"], r["kind"]) for r in made] == [(model, "answer")]
        body = output[custom_id]["response"]["body"]
        assert "council" not in body
        detail = api.get(f"/v1/queries/{results[custom_id]['query_id']}").json()
        assert len(detail["provider_calls"]) == 1
        call = detail["provider_calls"][0]
        price_in, price_out = PRICES[model]
        usage = body["usage"]
        expected = (usage["prompt_tokens"] * price_in + usage["completion_tokens"] * price_out) / 1e6
        assert (call["input_tokens"], call["output_tokens"]) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )
        assert call["cost_usd"] == pytest.approx(expected)
        assert results[custom_id]["cost_usd"] == pytest.approx(expected)

    council = output["council-1"]["response"]["body"]["council"]
    assert [m["model"] for m in council["members"]] == ["sim:alpha", "sim:beta", "sim:gamma"]
    assert council["chairman"] == "sim:chairman"
    # Three answers, three reviews, one synthesis.
    assert len(calls("mixed-council-1")) == 7
    for custom_id in ("duo-1", "duo-2"):
        duo = output[custom_id]["response"]["body"]["council"]
        assert [m["model"] for m in duo["members"]] == ["sim:beta", "sim:gamma"]
        assert duo["chairman"] == "sim:beta"
        assert {r["model"] for r in calls(f"mixed-{custom_id}")} == {"beta", "gamma"}


def test_an_expired_batch_keeps_every_query_that_finished(
    api: httpx.Client, sim: SimServer, sessions: Any
) -> None:
    # The sim holds "gamma" for a minute: those lines are still running when the window passes.
    httpx.post(
        f"{sim.url}/_sim/config", json={"models": {"gamma": {"latency_ms": 60_000}}}
    ).raise_for_status()
    fast = [f"fast-{i}" for i in range(4)]
    slow = [f"slow-{i}" for i in range(3)]
    lines = [line(c, "sim:alpha", f"[tag:expiry-{c}] quick") for c in fast]
    lines[2:2] = [line(c, "sim:gamma", f"[tag:expiry-{c}] slow") for c in slow]
    batch = create(api, upload(api, [orjson.dumps(x) for x in lines]))
    poll(
        lambda: api.get(f"/v1/batches/{batch['id']}").json()["request_counts"]["completed"] == len(fast),
        60,
        what="the fast lines to finish",
    )
    # Only this batch: the session's database holds other tests' running batches too.
    with sessions.begin() as session:
        assert expire_batch(session, batch["id"], batch["expires_at"] + 1)

    done = api.get(f"/v1/batches/{batch['id']}").json()
    assert done["status"] == "expired"
    assert done["request_counts"]["completed"] == 4 and done["request_counts"]["expired"] == 3
    output = download(api, done["output_file_id"])
    assert [o["custom_id"] for o in output] == fast
    assert all(o["response"]["body"]["choices"][0]["message"]["content"] for o in output)
    errors = download(api, done["error_file_id"])
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [(c, "batch_expired") for c in slow]
    info = api.get(f"/v1/files/{done['output_file_id']}").json()
    assert info["bytes"] == len(api.get(f"/v1/files/{done['output_file_id']}/content").content)


def test_uploads_are_refused_whole_over_the_limits(api: httpx.Client) -> None:
    empty = api.post("/v1/files", files={"file": ("e.jsonl", b"")}, data={"purpose": "batch"})
    assert empty.status_code == 422 and empty.json()["error"]["param"] == "file"
    no_file = api.post("/v1/files", files={"other": ("x", b"abc")}, data={"purpose": "batch"})
    assert no_file.status_code == 422 and no_file.json()["error"]["param"] == "file"
    not_form = api.post("/v1/files", content=b"{}", headers={"content-type": "application/json"})
    assert not_form.status_code == 400
    no_purpose = api.post("/v1/files", files={"file": ("a.jsonl", b"{}\n")})
    assert no_purpose.status_code == 422 and no_purpose.json()["error"]["param"] == "purpose"
    anchor = api.post(
        "/v1/files",
        files={"file": ("a.jsonl", b"{}\n")},
        data={"purpose": "batch", "expires_after[anchor]": "last_used"},
    )
    assert anchor.status_code == 422 and anchor.json()["error"]["param"] == "expires_after.anchor"
    kept = api.post(
        "/v1/files",
        files={"file": ("a.jsonl", b"{}\n")},
        data={"purpose": "batch", "expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"},
    ).json()
    assert kept["expires_at"] == kept["created_at"] + 3600
    api.delete(f"/v1/files/{kept['id']}")
    assert api.get("/v1/files").json()["data"] == []


def test_a_file_batch_takes_conclaves_own_fields_too(api: httpx.Client) -> None:
    file_id = upload(api, [orjson.dumps(line("k", "sim:alpha", "Grounded?"))])
    batch = create(api, file_id, priority="high", knowledge={"domain": "healthcare", "top_k": 2})
    assert batch["priority"] == "high"
    assert batch["knowledge"] == {"domain": "healthcare", "top_k": 2}
    assert wait_for_batch(api, batch["id"], 60)["status"] == "completed"
    refused = api.post(
        "/v1/batches",
        json={"input_file_id": file_id, "endpoint": "/v1/chat/completions", "council": {"mode": "single"}},
    )
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "council"


def test_the_scheduler_measures_ended_views_before_anyone_asks(api: httpx.Client, sessions: Any) -> None:
    batch = create(api, upload(api, [orjson.dumps(line("m", "sim:alpha", "Measure me."))]))
    done = wait_for_batch(api, batch["id"], 60)
    with sessions() as session:
        assert session.get(StoredFile, done["output_file_id"]).bytes is None
    while measure_ended_views(sessions, limit=100):
        pass
    with sessions() as session:
        measured = session.get(StoredFile, done["output_file_id"]).bytes
    assert measured == len(api.get(f"/v1/files/{done['output_file_id']}/content").content) > 0


def test_expired_files_are_gone_and_purged_with_their_chunks(api: httpx.Client, sessions: Any) -> None:
    kept = api.post(
        "/v1/files",
        files={"file": ("a.jsonl", b'{"x": 1}\n' * 10)},
        data={"purpose": "batch", "expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"},
    ).json()
    with sessions() as session:
        assert session.scalar(select(func.count()).where(col(FileChunk.file_id) == kept["id"])) == 1
    purge_expired(sessions, now=kept["expires_at"] - 1)
    assert api.get(f"/v1/files/{kept['id']}").status_code == 200
    purge_expired(sessions, now=kept["expires_at"])
    assert api.get(f"/v1/files/{kept['id']}").status_code == 404
    with sessions() as session:
        assert session.scalar(select(func.count()).where(col(FileChunk.file_id) == kept["id"])) == 0
        assert session.get(StoredFile, kept["id"]) is None
