"""The semantic cache (SPEC §14) through the real system: a batch with ``cache: "semantic"``, then
the same questions reworded (pairs of the shipped paraphrase set) are answered from the cache
without a stage 1 call (the simulated provider's log), while a hard negative asked alongside is
called; ``DELETE /v1/cache`` ends the reuse; another tenant asking the reworded questions gets
none of the first tenant's answers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from shared.models import Query
from shared.semantic_cache import load_pairs, similarity
from shared.settings import Settings
from shared.sim import SimServer
from shared.stack import Stack
from tests.conftest import new_key, settings_env
from tests.helpers import jsonl, sim_log, wait_for_batch
from tests.integration.test_cache import MEMBERS, last_seq, providers_toml, user_client

pytestmark = pytest.mark.integration

THRESHOLD = Settings.model_fields["semantic_cache_threshold"].default


@pytest.fixture(scope="module")
def semantic_stack(
    settings: Settings, sim_server: SimServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    cfg: Path = tmp_path_factory.mktemp("semcache-cfg") / "providers.toml"
    cfg.write_text(providers_toml(sim_server.url))
    env = {
        **os.environ,
        **settings_env(settings),
        "CONCLAVE_PROVIDERS_FILE": str(cfg),
        "CONCLAVE_QUEUE_NAMESPACE": f"{settings.queue_namespace}-semcache",
    }
    stack = Stack(env=env, logs=tmp_path_factory.mktemp("semcache-logs"))
    try:
        stack.start_api()
        stack.start_workers(processes=1, threads=16)
        yield stack
    finally:
        stack.stop()
        if stack.dead():
            print(stack.log_text())


def run_batch(client: httpx.Client, questions: list[str]) -> dict[str, Any]:
    body = {
        "queries": [{"custom_id": f"q-{i}", "prompt": q} for i, q in enumerate(questions)],
        "cache": "semantic",
    }
    created = client.post("/v1/batches", json=body)
    assert created.status_code == 202, created.text
    final = wait_for_batch(client, created.json()["id"], timeout=120)
    assert final["status"] == "completed", final
    return final


def asked(sim: SimServer, since: int, questions: list[str]) -> list[tuple[str, str]]:
    """(model, question) of the stage 1 calls among the provider's requests after ``since``: a
    stage 1 prompt is the question itself (reviews and syntheses quote it inside their own)."""
    wanted = set(questions)
    return [(r["model"], r["text"]) for r in sim_log(sim.url) if r["seq"] > since and r["text"] in wanted]


def stored_results(sessions: sessionmaker[Session], batch_id: str) -> dict[str, dict[str, Any]]:
    with sessions() as s:
        rows = s.scalars(select(Query).where(col(Query.batch_id) == batch_id))
        return {q.custom_id: q.result or {} for q in rows}


def test_reworded_questions_are_answered_from_the_cache_and_never_across_tenants(
    semantic_stack: Stack, sim: SimServer, sessions: sessionmaker[Session]
) -> None:
    tag = uuid.uuid4().hex[:6]  # a word of its own in every question: nothing cached before
    pairs = [p for p in load_pairs() if p["label"] == "paraphrase"]
    close = [(f"{p['a']} ({tag})", f"{p['b']} ({tag})") for p in pairs]
    close = [(a, b) for a, b in close if similarity(a, b) >= THRESHOLD][:12]
    assert len(close) == 12
    negative = (f"What is 31+11? ({tag})", f"What is 31+12? ({tag})")
    first = [a for a, _ in close] + [negative[0]]
    second = [b for _, b in close] + [negative[1]]

    with user_client(semantic_stack, new_key(sessions)[0]) as tenant_a:
        mark = last_seq(sim)
        done = run_batch(tenant_a, first)
        assert done["council"]["cache"] == "semantic"
        assert len(asked(sim, mark, first)) == len(first) * len(MEMBERS)

        mark = last_seq(sim)
        again = run_batch(tenant_a, second)
        # The provider saw no member answer of a reworded question; the hard negative it did.
        names = [m.partition(":")[2] for m in MEMBERS]  # the provider's log names its own models
        assert sorted(asked(sim, mark, second)) == sorted((m, negative[1]) for m in names)
        records = {r["custom_id"]: r for r in jsonl(tenant_a.get(f"/v1/batches/{again['id']}/results"))}
        stored = stored_results(sessions, again["id"])
        for i, (a, _) in enumerate(close):
            assert all(m["cached"] == "semantic" for m in records[f"q-{i}"]["members"])
            for member in stored[f"q-{i}"]["members"]:  # the similarity and the question matched
                assert THRESHOLD <= member["similarity"] <= 1 and member["cached_question"] == a
        assert all(m["cached"] is None for m in records[f"q-{len(close)}"]["members"])
        assert again["cache_hits"] >= len(close) * len(MEMBERS)
        assert again["cost_saved_usd"] > 0

        # Invalidation reaches semantic hits: they are the exact cache's entries.
        assert tenant_a.delete("/v1/cache").status_code == 200
        mark = last_seq(sim)
        run_batch(tenant_a, second[:3])
        assert len(asked(sim, mark, second[:3])) == 3 * len(MEMBERS)

    with user_client(semantic_stack, new_key(sessions)[0]) as tenant_b:
        mark = last_seq(sim)
        theirs = run_batch(tenant_b, second)
        assert len(asked(sim, mark, second)) == len(second) * len(MEMBERS)
        their_records = jsonl(tenant_b.get(f"/v1/batches/{theirs['id']}/results"))
        assert all(m["cached"] is None for r in their_records for m in r["members"])
        assert theirs["cache_hits"] == 0
