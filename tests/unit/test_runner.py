"""The runner (stages × providers) against a real ``OpenAIProvider`` over ``httpx.MockTransport``:
retries within the query's budget, fallbacks, the chairman's fallbacks, per-provider caps and the
``CallRecord`` of every attempt. No network; backoff shrunk to milliseconds."""

from __future__ import annotations

import asyncio
import random
import re
from collections import Counter
from typing import Any

import httpx
import orjson
import pytest

import workers.runner
from shared.ledger import CallRecord
from shared.providers.config import Catalog, parse_catalog
from shared.providers.registry import build_providers
from tests.leaks import remember_secret
from workers.council import CouncilResult
from workers.runner import Runner

KEY_ENV = "CONCLAVE_TEST_RUNNER_KEY"
KEY = remember_secret("sk-runner-test-0123456789")
USAGE = {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}
QUESTION = "What is the capital of France?"
_LABEL = re.compile(r"^=== (Response [A-Z]+) ===$", re.MULTILINE)

OVERLOADED_MESSAGE = "The engine is currently overloaded, please try again later."
ERROR_BODIES: dict[int, dict[str, Any]] = {
    400: {
        "message": "This model's maximum context length is 128000 tokens. However, your messages "
        "resulted in 130512 tokens. Please reduce the length of the messages.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    },
    401: {
        "message": "Incorrect API key provided: sk-runn****6789.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    },
    403: {
        "message": "Country, region, or territory not supported",
        "type": "request_forbidden",
        "param": None,
        "code": "unsupported_country_region_territory",
    },
    404: {
        "message": "The model `alpha` does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "param": None,
        "code": "model_not_found",
    },
    429: {
        "message": "Rate limit reached for requests",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    },
    500: {
        "message": "The server had an error while processing your request. Sorry about that!",
        "type": "server_error",
        "param": None,
        "code": None,
    },
    503: {
        "message": OVERLOADED_MESSAGE,
        "type": "server_error",
        "param": None,
        "code": None,
    },
}

# A step is a status code (200 answers, others send OpenAI's error body for it) or a full response.
Step = int | httpx.Response | Exception


def stage_of(prompt: str) -> str:
    if "FINAL RANKING" in prompt:
        return "review"
    if "You are the chairman" in prompt:
        return "synthesis"
    return "answer"


class FakeOpenAI:
    """Answers like the OpenAI API, scripted per (model name, stage); the last step repeats.

    Tracks requests in flight per host, yielding to the event loop inside each call so that
    calls overlap as far as the runner lets them.
    """

    def __init__(
        self,
        script: dict[tuple[str, str], list[Step]] | None = None,
        yields: int = 0,
        honour_max_tokens: bool = False,
    ):
        self.script = {key: list(steps) for key, steps in (script or {}).items()}
        self.yields = yields
        # Like a real provider, stop after max_tokens (a word stands for a token here).
        self.honour_max_tokens = honour_max_tokens
        self.seen: list[tuple[str, str]] = []  # (model name, stage)
        self.bodies: list[tuple[str, str, dict[str, Any]]] = []  # (model name, stage, JSON body)
        self.headers: list[httpx.Headers] = []
        self.in_flight: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        model, prompt = body["model"], body["messages"][-1]["content"]
        stage = stage_of(prompt)
        self.seen.append((model, stage))
        self.bodies.append((model, stage, body))
        self.headers.append(request.headers)
        host = request.url.host
        self.in_flight[host] += 1
        self.peak[host] = max(self.peak[host], self.in_flight[host])
        try:
            for _ in range(self.yields):
                await asyncio.sleep(0)
            return self._respond(request, model, stage, prompt, body.get("max_tokens"))
        finally:
            self.in_flight[host] -= 1

    def _respond(
        self, request: httpx.Request, model: str, stage: str, prompt: str, max_tokens: int | None
    ) -> httpx.Response:
        steps = self.script.get((model, stage))
        step: Step = 200
        if steps:
            step = steps.pop(0) if len(steps) > 1 else steps[0]
        if isinstance(step, Exception):
            raise step
        if isinstance(step, httpx.Response):
            return step
        if step != 200:
            return httpx.Response(step, json={"error": ERROR_BODIES[step]})
        text = answer_text(model, stage, prompt)
        if self.honour_max_tokens and max_tokens is not None and len(text.split(" ")) > max_tokens:
            return httpx.Response(200, json=completion(" ".join(text.split(" ")[:max_tokens]), "length"))
        return httpx.Response(200, json=completion(text))

    def prompts(self, stage: str) -> list[tuple[str, str]]:
        """(model name, last message) of every request of ``stage``."""
        return [(m, b["messages"][-1]["content"]) for m, st, b in self.bodies if st == stage]

    def count(self, model: str, stage: str) -> int:
        return self.seen.count((model, stage))


def answer_text(model: str, stage: str, prompt: str) -> str:
    if stage == "review":
        labels = sorted(set(_LABEL.findall(prompt)))
        ranking = "\n".join(f"{i}. {label}" for i, label in enumerate(labels, start=1))
        return f"All responses are reasonable.\n\nFINAL RANKING:\n{ranking}"
    if stage == "synthesis":
        return f"synthesis by {model}"
    return f"answer from {model}"


def completion(content: str | None, finish_reason: str = "stop") -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1741570283,
        "model": "test-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": USAGE,
    }


def make_catalog(
    members: list[str],
    chairman: str = "acme:chair",
    models: dict[str, dict[str, Any]] | None = None,
    caps: dict[str, int] | None = None,
) -> Catalog:
    caps = caps or {"acme": 16}
    providers = {
        name: {
            "api": "openai",
            "base_url": f"https://{name}.test/v1",
            "api_key_env": KEY_ENV,
            "timeout_s": 5,
            "max_concurrency": cap,
        }
        for name, cap in caps.items()
    }
    return parse_catalog(
        {
            "providers": providers,
            "models": models or {},
            "council": {"members": members, "chairman": chairman},
        }
    )


def run_query(
    catalog: Catalog,
    handler: FakeOpenAI,
    *,
    mode: str | None = None,
    retry_budget: int = 6,
    max_tokens: int | None = None,
    **runner_options: Any,
) -> tuple[CouncilResult, list[CallRecord]]:
    calls: list[CallRecord] = []

    async def go() -> CouncilResult:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            runner = Runner(
                catalog,
                build_providers(catalog),
                client,
                retry_budget=retry_budget,
                rng=random.Random(0),
                **runner_options,
            )
            spec = runner.council_spec({"members": list(catalog.members), "chairman": catalog.chairman}, mode)
            request = {
                "messages": [{"role": "user", "content": QUESTION}],
                "max_tokens": max_tokens,
                "temperature": None,
            }
            return await runner.run("q_01test", request, spec, calls=calls)

    return asyncio.run(go()), calls


def attempts(calls: list[CallRecord], model: str, stage: str) -> list[tuple[int, str, str | None]]:
    return [(c.attempt, c.status, c.error_category) for c in calls if c.model == model and c.stage == stage]


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers.runner, "BACKOFF_BASE_S", 0.001)
    monkeypatch.setattr(workers.runner, "BACKOFF_CAP_S", 0.004)
    monkeypatch.setattr(workers.runner, "MAX_HINT_WAIT_S", 0.01)
    monkeypatch.setenv(KEY_ENV, KEY)


PRICES = {
    "acme:alpha": {"input_usd_per_mtok": 1.0, "output_usd_per_mtok": 4.0},
    "acme:chair": {"input_usd_per_mtok": 5.0, "output_usd_per_mtok": 15.0},
}


# -- a full council with retries ----------------------------------------------------------------


def test_council_retries_a_transient_error_and_records_every_attempt() -> None:
    catalog = make_catalog(["acme:alpha", "acme:beta"], models=PRICES)
    fake = FakeOpenAI({("alpha", "answer"): [503, 503, 200]})

    result, calls = run_query(catalog, fake)

    assert result.status == "succeeded"
    assert result.synthesis == "chairman"
    assert result.chairman == "acme:chair"
    assert result.answer == "synthesis by chair"
    assert [(m.model, m.status, m.answer) for m in result.members] == [
        ("acme:alpha", "succeeded", "answer from alpha"),
        ("acme:beta", "succeeded", "answer from beta"),
    ]
    assert [r.status for r in result.reviews] == ["valid", "valid"]
    assert [e.votes for e in result.aggregate_ranking] == [1, 1]

    assert attempts(calls, "acme:alpha", "answer") == [
        (1, "failed", "overloaded"),
        (2, "failed", "overloaded"),
        (3, "succeeded", None),
    ]
    assert attempts(calls, "acme:beta", "answer") == [(1, "succeeded", None)]
    assert attempts(calls, "acme:alpha", "review") == [(1, "succeeded", None)]
    assert attempts(calls, "acme:beta", "review") == [(1, "succeeded", None)]
    assert attempts(calls, "acme:chair", "synthesis") == [(1, "succeeded", None)]
    assert len(calls) == 7 == len(fake.seen)


def test_call_records_carry_tokens_and_cost_from_model_prices() -> None:
    catalog = make_catalog(["acme:alpha", "acme:beta"], models=PRICES)
    fake = FakeOpenAI({("alpha", "answer"): [500, 200]})

    _, calls = run_query(catalog, fake)

    failed, succeeded = (c for c in calls if c.model == "acme:alpha" and c.stage == "answer")
    assert (failed.input_tokens, failed.output_tokens, failed.cost_usd) == (0, 0, 0.0)
    assert failed.error_category == "server"
    assert (succeeded.input_tokens, succeeded.output_tokens) == (100, 20)
    assert succeeded.cost_usd == pytest.approx((100 * 1.0 + 20 * 4.0) / 1e6)
    (chair,) = (c for c in calls if c.stage == "synthesis")
    assert chair.cost_usd == pytest.approx((100 * 5.0 + 20 * 15.0) / 1e6)
    # A model without a price table costs nothing, whatever its tokens.
    beta = [c for c in calls if c.model == "acme:beta"]
    assert all(c.input_tokens == 100 and c.cost_usd == 0 for c in beta)
    for call in calls:
        assert call.latency_ms >= 0
        assert call.created_at > 1_600_000_000


def test_requests_carry_the_key_from_the_configured_environment_variable() -> None:
    catalog = make_catalog(["acme:alpha"])
    fake = FakeOpenAI()

    run_query(catalog, fake, mode="single")

    assert [h["authorization"] for h in fake.headers] == [f"Bearer {KEY}"]


@pytest.mark.parametrize(
    ("step", "category"),
    [
        (500, "server"),
        (503, "overloaded"),
        (429, "rate_limited"),
        (
            httpx.Response(429, json={"error": ERROR_BODIES[429]}, headers={"retry-after-ms": "5"}),
            "rate_limited",
        ),
        (httpx.Response(200, json=completion("")), "bad_response"),
        (httpx.ConnectError("[Errno 111] Connection refused"), "network"),
        (httpx.ReadTimeout("timed out"), "timeout"),
    ],
    ids=["500", "503", "429", "429-hint", "empty", "connect", "read-timeout"],
)
def test_transient_errors_are_retried(step: Step, category: str) -> None:
    catalog = make_catalog(["acme:alpha"])
    fake = FakeOpenAI({("alpha", "answer"): [step, 200]})

    result, calls = run_query(catalog, fake, mode="single")

    assert result.status == "succeeded"
    assert result.synthesis == "single"
    assert result.answer == "answer from alpha"
    assert attempts(calls, "acme:alpha", "answer") == [(1, "failed", category), (2, "succeeded", None)]


# -- permanent errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "category"),
    [
        (400, "invalid_request"),
        (401, "auth"),
        (403, "auth"),
        (404, "invalid_request"),
        (
            httpx.Response(
                429,
                json={
                    "error": {
                        "message": "You exceeded your current quota, please check your plan and "
                        "billing details.",
                        "type": "insufficient_quota",
                        "param": None,
                        "code": "insufficient_quota",
                    }
                },
            ),
            "auth",
        ),
        (httpx.Response(200, json=completion(None, finish_reason="content_filter")), "content_filter"),
    ],
    ids=["400", "401", "403", "404", "insufficient-quota", "content-filter"],
)
def test_permanent_errors_are_not_retried(step: Step, category: str) -> None:
    catalog = make_catalog(["acme:alpha", "acme:beta", "acme:gamma"])
    fake = FakeOpenAI({("alpha", "answer"): [step, 200]})

    result, calls = run_query(catalog, fake)

    assert fake.count("alpha", "answer") == 1
    assert attempts(calls, "acme:alpha", "answer") == [(1, "failed", category)]
    alpha = result.members[0]
    assert (alpha.model, alpha.status, alpha.answer) == ("acme:alpha", "failed", None)
    assert alpha.error is not None
    assert alpha.error["type"] == category
    # Two of three answered: the council goes on without the failed member.
    assert result.status == "succeeded"
    assert result.synthesis == "chairman"
    assert sorted(r.reviewer for r in result.reviews) == ["acme:beta", "acme:gamma"]
    assert fake.count("alpha", "review") == 0


def test_context_length_error_keeps_the_providers_message() -> None:
    catalog = make_catalog(["acme:alpha", "acme:beta", "acme:gamma"])
    fake = FakeOpenAI({("alpha", "answer"): [400]})

    result, _ = run_query(catalog, fake)

    error = result.members[0].error
    assert error is not None
    assert error["type"] == "invalid_request"
    assert "maximum context length" in error["message"]


# -- the retry budget ---------------------------------------------------------------------------


def test_retry_budget_is_shared_by_the_querys_calls_and_exhaustion_fails_the_members() -> None:
    catalog = make_catalog(["acme:alpha", "acme:beta", "acme:gamma"])
    fake = FakeOpenAI({("alpha", "answer"): [503], ("beta", "answer"): [503]})

    result, calls = run_query(catalog, fake, retry_budget=3)

    # Three retries in all, not three each: 3 retries + the 2 first attempts that ended each chain.
    failing = [c for c in calls if c.model in ("acme:alpha", "acme:beta")]
    assert len(failing) == 3 + 2
    assert all((c.status, c.error_category) == ("failed", "overloaded") for c in failing)
    assert fake.count("gamma", "answer") == 1

    assert result.status == "failed"
    assert result.answer is None
    assert result.error is not None
    assert result.error["type"] == "insufficient_answers"
    by_model = {m.model: m for m in result.members}
    for model in ("acme:alpha", "acme:beta"):
        assert by_model[model].status == "failed"
        assert by_model[model].error == {"type": "overloaded", "message": "HTTP 503: " + OVERLOADED_MESSAGE}
    assert by_model["acme:gamma"].status == "succeeded"
    assert fake.count("gamma", "review") == 0
    assert fake.count("chair", "synthesis") == 0


def test_retries_spent_in_stage_one_are_gone_for_the_chairman() -> None:
    catalog = make_catalog(["acme:alpha", "acme:beta"])
    fake = FakeOpenAI({("alpha", "answer"): [503, 200], ("chair", "synthesis"): [500, 200]})

    result, calls = run_query(catalog, fake, retry_budget=1)

    assert attempts(calls, "acme:alpha", "answer") == [(1, "failed", "overloaded"), (2, "succeeded", None)]
    assert attempts(calls, "acme:chair", "synthesis") == [(1, "failed", "server")]
    # No chairman answered: the best-ranked stage 1 answer stands, never an error string.
    assert result.status == "succeeded"
    assert result.synthesis == "top_ranked"
    assert result.answer in ("answer from alpha", "answer from beta")
    assert [(a.model, a.status) for a in result.synthesis_attempts] == [("acme:chair", "failed")]


def test_zero_retry_budget_tries_once() -> None:
    catalog = make_catalog(["acme:alpha"])
    fake = FakeOpenAI({("alpha", "answer"): [503, 200]})

    result, calls = run_query(catalog, fake, mode="single", retry_budget=0)

    assert attempts(calls, "acme:alpha", "answer") == [(1, "failed", "overloaded")]
    assert result.status == "failed"
    assert result.error is not None
    assert result.error["type"] == "overloaded"


# -- fallbacks ----------------------------------------------------------------------------------


def test_member_fallback_answers_when_the_primary_fails_permanently() -> None:
    models: dict[str, dict[str, Any]] = {
        "acme:alpha": {"fallbacks": ["acme:alpha-backup"]},
        "acme:alpha-backup": {"input_usd_per_mtok": 2.0, "output_usd_per_mtok": 8.0},
    }
    catalog = make_catalog(["acme:alpha", "acme:beta"], models=models)
    fake = FakeOpenAI({("alpha", "answer"): [404]})

    result, calls = run_query(catalog, fake)

    alpha = result.members[0]
    assert (alpha.model, alpha.requested_model, alpha.status, alpha.answer) == (
        "acme:alpha-backup",
        "acme:alpha",
        "succeeded",
        "answer from alpha-backup",
    )
    assert attempts(calls, "acme:alpha", "answer") == [(1, "failed", "invalid_request")]
    assert attempts(calls, "acme:alpha-backup", "answer") == [(1, "succeeded", None)]
    (backup,) = (c for c in calls if c.model == "acme:alpha-backup" and c.stage == "answer")
    assert backup.cost_usd == pytest.approx((100 * 2.0 + 20 * 8.0) / 1e6)
    assert fake.count("alpha", "answer") == 1
    # The model that answered sits in the member's seat for the review too.
    assert (fake.count("alpha", "review"), fake.count("alpha-backup", "review")) == (0, 1)
    assert result.status == "succeeded"
    assert result.synthesis == "chairman"


def test_member_fallback_answers_when_the_primary_exhausts_the_budget() -> None:
    models = {"acme:alpha": {"fallbacks": ["acme:alpha-backup"]}}
    catalog = make_catalog(["acme:alpha", "acme:beta"], models=models)
    fake = FakeOpenAI({("alpha", "answer"): [503]})

    result, calls = run_query(catalog, fake, retry_budget=2)

    assert attempts(calls, "acme:alpha", "answer") == [(n, "failed", "overloaded") for n in (1, 2, 3)]
    assert attempts(calls, "acme:alpha-backup", "answer") == [(1, "succeeded", None)]
    assert result.members[0].answer == "answer from alpha-backup"


def test_member_fails_with_the_last_error_when_every_fallback_fails() -> None:
    models = {"acme:alpha": {"fallbacks": ["acme:alpha-backup"]}}
    catalog = make_catalog(["acme:alpha", "acme:beta", "acme:gamma"], models=models)
    fake = FakeOpenAI({("alpha", "answer"): [404], ("alpha-backup", "answer"): [401]})

    result, calls = run_query(catalog, fake)

    alpha = result.members[0]
    assert alpha.status == "failed"
    assert alpha.error is not None
    assert alpha.error["type"] == "auth"
    assert attempts(calls, "acme:alpha", "answer") == [(1, "failed", "invalid_request")]
    assert attempts(calls, "acme:alpha-backup", "answer") == [(1, "failed", "auth")]
    assert result.status == "succeeded"


def test_chairman_failure_goes_to_chairman_fallbacks() -> None:
    models = {"acme:chair": {"fallbacks": ["acme:chair-2"]}}
    catalog = make_catalog(["acme:alpha", "acme:beta"], models=models)
    fake = FakeOpenAI({("chair", "synthesis"): [403]})

    result, calls = run_query(catalog, fake)

    assert result.status == "succeeded"
    assert result.synthesis == "fallback_chairman"
    assert result.chairman == "acme:chair-2"
    assert result.answered_by == "acme:chair-2"
    assert result.answer == "synthesis by chair-2"
    assert [(a.model, a.status) for a in result.synthesis_attempts] == [
        ("acme:chair", "failed"),
        ("acme:chair-2", "succeeded"),
    ]
    assert result.synthesis_attempts[0].error is not None
    assert result.synthesis_attempts[0].error["type"] == "auth"
    assert attempts(calls, "acme:chair", "synthesis") == [(1, "failed", "auth")]
    assert attempts(calls, "acme:chair-2", "synthesis") == [(1, "succeeded", None)]


def test_every_chairman_failing_returns_the_top_ranked_answer() -> None:
    models = {"acme:chair": {"fallbacks": ["acme:chair-2"]}}
    catalog = make_catalog(["acme:alpha", "acme:beta"], models=models)
    fake = FakeOpenAI({("chair", "synthesis"): [400], ("chair-2", "synthesis"): [404]})

    result, _ = run_query(catalog, fake)

    assert result.status == "succeeded"
    assert result.synthesis == "top_ranked"
    assert result.chairman is None
    assert result.answered_by in ("acme:alpha", "acme:beta")
    assert result.answer == f"answer from {result.answered_by.removeprefix('acme:')}"
    assert [a.status for a in result.synthesis_attempts] == ["failed", "failed"]


def test_council_spec_takes_chairman_fallbacks_from_the_catalog() -> None:
    models = {"acme:chair": {"fallbacks": ["acme:chair-2", "acme:chair-3"]}}
    catalog = make_catalog(["acme:alpha", "acme:beta", "acme:gamma"], models=models)
    runner = Runner(catalog, build_providers(catalog), httpx.AsyncClient(), rng=random.Random(0))

    spec = runner.council_spec({"members": list(catalog.members), "chairman": "acme:chair"})
    single = runner.council_spec({"members": ["acme:alpha"], "chairman": "acme:chair"}, "single")

    assert spec.mode == "council"
    assert spec.chairman_fallbacks == ("acme:chair-2", "acme:chair-3")
    assert spec.required_answers == 2
    assert single.mode == "single"
    assert single.required_answers == 1


# -- a fallback that is itself a member (SPEC §18) ------------------------------------------------


def test_a_member_answered_by_a_fellow_member_never_reviews_its_own_answer() -> None:
    # As in the shipped deploy/providers.toml: a member falls back to another member.
    models = {"acme:alpha": {"fallbacks": ["acme:beta"]}}
    catalog = make_catalog(["acme:alpha", "acme:beta", "acme:gamma"], models=models)
    fake = FakeOpenAI({("alpha", "answer"): [404]})

    result, calls = run_query(catalog, fake)

    for reviewer, prompt in fake.prompts("review"):
        assert f"answer from {reviewer}" not in prompt, f"{reviewer} was shown its own answer"
    answers = [("alpha", "answer"), ("beta", "answer"), ("beta", "answer"), ("gamma", "answer")]
    assert sorted(fake.seen) == sorted(
        [*answers, ("beta", "review"), ("gamma", "review"), ("chair", "synthesis")]
    )
    # Who answered, and for which member; beta's second answer is not reviewed a second time.
    assert [(m.model, m.requested_model, m.status, m.duplicate_of) for m in result.members] == [
        ("acme:beta", "acme:alpha", "succeeded", "acme:beta"),
        ("acme:beta", "acme:beta", "succeeded", None),
        ("acme:gamma", "acme:gamma", "succeeded", None),
    ]
    assert [(r.reviewer, sorted(r.labels.values())) for r in result.reviews] == [
        ("acme:beta", ["acme:gamma"]),
        ("acme:gamma", ["acme:beta"]),
    ]
    assert {(e.model, e.votes) for e in result.aggregate_ranking} == {("acme:beta", 1), ("acme:gamma", 1)}
    assert attempts(calls, "acme:beta", "answer") == [(1, "succeeded", None), (1, "succeeded", None)]


def test_the_ranking_credits_the_fallback_that_answered() -> None:
    models = {"acme:alpha": {"fallbacks": ["acme:alpha-backup"]}}
    catalog = make_catalog(["acme:alpha", "acme:beta", "acme:gamma"], models=models)
    fake = FakeOpenAI({("alpha", "answer"): [404]})

    result, _ = run_query(catalog, fake)

    assert (result.members[0].model, result.members[0].requested_model) == ("acme:alpha-backup", "acme:alpha")
    assert {(e.model, e.votes) for e in result.aggregate_ranking} == {
        ("acme:alpha-backup", 2),
        ("acme:beta", 2),
        ("acme:gamma", 2),
    }
    # The fallback reviews in the member's place, and never sees the answer it wrote.
    assert ("alpha-backup", "review") in fake.seen
    for reviewer, prompt in fake.prompts("review"):
        assert f"answer from {reviewer}" not in prompt


def test_a_reviewers_fallback_is_never_a_model_whose_answer_it_would_judge() -> None:
    models = {"acme:beta": {"fallbacks": ["acme:gamma", "acme:delta"]}}
    catalog = make_catalog(["acme:alpha", "acme:beta", "acme:gamma"], models=models)
    fake = FakeOpenAI({("beta", "review"): [404]})

    result, _ = run_query(catalog, fake)

    for reviewer, prompt in fake.prompts("review"):
        assert f"answer from {reviewer}" not in prompt, f"{reviewer} was shown its own answer"
    assert fake.count("gamma", "review") == 1  # its own review only
    beta = next(r for r in result.reviews if r.requested_reviewer == "acme:beta")
    assert (beta.reviewer, beta.status) == ("acme:delta", "valid")
    assert sorted(beta.labels.values()) == ["acme:alpha", "acme:gamma"]


def test_a_two_member_council_answered_by_one_model_has_too_few_answers() -> None:
    models = {"acme:alpha": {"fallbacks": ["acme:beta"]}}
    catalog = make_catalog(["acme:alpha", "acme:beta"], models=models)
    fake = FakeOpenAI({("alpha", "answer"): [404]})

    result, _ = run_query(catalog, fake)

    assert fake.count("beta", "review") == 0
    assert result.status == "failed"
    assert result.error is not None and result.error["type"] == "insufficient_answers"
    assert "by 1 distinct model" in result.error["message"]


# -- token budgets of stages 2 and 3 (SPEC §18) ---------------------------------------------------


def test_a_small_max_tokens_does_not_truncate_reviews_or_the_synthesis() -> None:
    catalog = make_catalog(["acme:alpha", "acme:beta", "acme:gamma"])
    fake = FakeOpenAI(honour_max_tokens=True)

    result, _ = run_query(catalog, fake, max_tokens=5)

    assert [r.status for r in result.reviews] == ["valid"] * 3, [r.error for r in result.reviews]
    assert result.answer == "synthesis by chair"
    assert {b.get("max_tokens") for _, stage, b in fake.bodies if stage == "answer"} == {5}


def test_review_and_synthesis_budgets_come_from_the_runner() -> None:
    catalog = make_catalog(["acme:alpha", "acme:beta"])
    fake = FakeOpenAI()

    run_query(catalog, fake, max_tokens=5, review_max_tokens=700, synthesis_max_tokens=900)

    budgets = {(stage, b.get("max_tokens")) for _, stage, b in fake.bodies}
    assert budgets == {("answer", 5), ("review", 700), ("synthesis", 900)}


# -- concurrency --------------------------------------------------------------------------------


def test_per_provider_concurrency_cap_is_respected() -> None:
    members = ["acme:a1", "acme:a2", "acme:a3", "acme:a4", "zeta:z1", "zeta:z2"]
    catalog = make_catalog(members, caps={"acme": 2, "zeta": 1})
    fake = FakeOpenAI(yields=10)

    result, calls = run_query(catalog, fake)

    assert result.status == "succeeded"
    assert len(calls) == 6 + 6 + 1
    assert fake.peak["acme.test"] == 2
    assert fake.peak["zeta.test"] == 1


# -- backoff ------------------------------------------------------------------------------------


def test_backoff_is_full_jitter_under_an_exponential_cap_and_honours_the_hint() -> None:
    catalog = make_catalog(["acme:alpha"])
    runner = Runner(catalog, build_providers(catalog), httpx.AsyncClient(), rng=random.Random(0))

    for attempt in range(1, 8):
        delay = runner._backoff(attempt, None)
        assert 0 <= delay <= min(0.004, 0.001 * 2 ** (attempt - 1))
    # A hint longer than our own backoff (and within the cap on hints) is waited out in full.
    assert runner._backoff(1, 0.008) == 0.008
    assert runner._backoff(1, 0.0) <= 0.001


def test_backoff_is_reproducible_from_the_seed() -> None:
    catalog = make_catalog(["acme:alpha"])
    delays = []
    for _ in range(2):
        runner = Runner(catalog, build_providers(catalog), httpx.AsyncClient(), rng=random.Random(0))
        delays.append([runner._backoff(n, None) for n in range(1, 6)])

    assert delays[0] == delays[1]
