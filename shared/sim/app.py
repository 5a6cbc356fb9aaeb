"""The simulated provider's aiohttp application: provider routes, control routes, per-request flow.

Provider routes (the paths the real APIs use, all on one port):

    POST /v1/chat/completions, /chat/completions      openai
    POST /v1/messages                                 anthropic
    POST /v1beta/models/{model}:generateContent       gemini

Control routes (for tests and benchmarks): ``GET|POST /_sim/config``, ``GET|DELETE /_sim/log``
(``?since=SEQ&limit=N``), ``GET|DELETE /_sim/stats``, ``GET /healthz``.

A provider call is: check headers and body (a bad request is refused at once, never faulted),
draw its plan (``faults.plan_call``), log it on arrival (so hung calls show up immediately),
wait the planned delay, then answer with ``answers`` in the format's shape (``wire``). Latency
applies to every outcome; a ``timeout`` fault waits ``hang_s`` instead. Running the app in a
thread or as a process is ``server.py``'s business.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from shared.sim import answers
from shared.sim.faults import CallPlan, SimConfig, plan_call
from shared.sim.log import CallStats, RequestLog
from shared.sim.wire import WIRE_FORMATS, Prompt, Rejected, WireFormat

# Benchmarks send prompts carrying every stage 1 answer and knowledge context; the default 1 MiB is tight.
_MAX_BODY_BYTES = 64 * 2**20


@dataclass
class SimState:
    """Everything the routes share; replaced piecemeal by ``POST /_sim/config``."""

    config: SimConfig
    rng: random.Random
    log: RequestLog
    stats: CallStats

    def reconfigure(self, patch: dict[str, Any]) -> None:
        config = self.config.merged(patch)
        self.log.resize(config.log_limit)
        self.log.mirror_to(config.log_file)
        if "seed" in patch:
            self.rng.seed(config.seed)
        self.config = config


STATE = web.AppKey("sim_state", SimState)


def create_app(config: SimConfig) -> web.Application:
    """The simulated provider as an aiohttp app, working on a validated copy of ``config``."""
    config = config.merged({})
    app = web.Application(client_max_size=_MAX_BODY_BYTES)
    app[STATE] = SimState(
        config=config,
        rng=random.Random(config.seed),
        log=RequestLog(config.log_limit, config.log_file),
        stats=CallStats(),
    )
    openai, anthropic, gemini = WIRE_FORMATS["openai"], WIRE_FORMATS["anthropic"], WIRE_FORMATS["gemini"]
    app.router.add_post("/v1/chat/completions", _provider_route(openai))
    app.router.add_post("/chat/completions", _provider_route(openai))
    app.router.add_post("/v1/messages", _provider_route(anthropic))
    app.router.add_post("/v1beta/models/{model}:generateContent", _provider_route(gemini))
    app.router.add_get("/_sim/config", _get_config)
    app.router.add_post("/_sim/config", _post_config)
    app.router.add_get("/_sim/log", _get_log)
    app.router.add_delete("/_sim/log", _delete_log)
    app.router.add_get("/_sim/stats", _get_stats)
    app.router.add_delete("/_sim/stats", _delete_stats)
    app.router.add_get("/healthz", _healthz)
    app.on_cleanup.append(_close_log)
    return app


def _provider_route(wire: WireFormat) -> Any:
    async def handle(request: web.Request) -> web.Response:
        stats = request.app[STATE].stats
        stats.enter()
        try:
            return await _provider_call(request, wire)
        finally:
            stats.leave()

    return handle


async def _provider_call(request: web.Request, wire: WireFormat) -> web.Response:
    state = request.app[STATE]
    path_model = request.match_info.get("model")
    raw = await request.read()
    # Taken once, after the body arrived, so a config change mid-call cannot mix two configs.
    config = state.config
    try:
        body: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    try:
        # The real APIs check the key before they look at the body.
        wire.authenticate(request.headers, request.query)
        if body is None:
            raise Rejected("invalid_request", "We could not parse the JSON body of your request.")
        prompt = wire.parse(body, path_model)
    except Rejected as exc:
        model = exc.model or path_model or _model_hint(body)
        _record(state, wire.api, model, False, "", exc.kind, 0.0, None)
        status, error_body, headers = exc.reply or wire.error(
            exc.kind, None, config.retry_after_s, exc.message
        )
        return _json(status, error_body, headers)

    review = answers.is_review(prompt.last_user, prompt.text)
    plan = plan_call(config.for_model(prompt.model), state.rng, review=review)
    seq = _record(state, wire.api, prompt.model, review, prompt.text, plan.outcome, plan.delay_s, plan.messy)
    if plan.delay_s > 0:
        await asyncio.sleep(plan.delay_s)
    return _reply(wire, prompt, plan, review, seq, config)


def _reply(
    wire: WireFormat, prompt: Prompt, plan: CallPlan, review: bool, seq: int, config: SimConfig
) -> web.Response:
    outcome = plan.outcome
    retry_after_s = config.retry_after_s
    if outcome in ("ok", "timeout", "bad_response", "empty"):
        if outcome == "empty":
            text = ""
        elif review:
            text = answers.review_answer(
                prompt.model,
                prompt.last_user,
                plan.messy,
                config.preferred_models,
                config.for_model(prompt.model).first_position_bias,
            )
        else:
            text = answers.plain_answer(prompt.model, prompt.last_user)
        body = orjson.dumps(wire.answer(prompt, text, seq))
        if outcome == "bad_response":
            body = body[: len(body) // 2]  # a connection cut mid-body: status 200, JSON that never closes
        return web.Response(body=body, content_type="application/json")
    if outcome == "content_filter":
        return _json(200, wire.refusal(prompt, seq))
    status, error_body, headers = wire.error(outcome, prompt, retry_after_s)
    return _json(status, error_body, headers)


def _record(
    state: SimState,
    api: str,
    model: str,
    review: bool,
    text: str,
    outcome: str,
    delay_s: float,
    messy: str | None,
) -> int:
    seq = state.log.next_seq()
    state.log.append(
        {
            "seq": seq,
            "ts": time.time(),
            "api": api,
            "model": model,
            "kind": "review" if review else "answer",
            "text": text,
            "outcome": outcome,
            "delay_ms": round(delay_s * 1000, 3),
            "messy": messy,
        }
    )
    state.stats.count(api, model, outcome)
    return seq


def _model_hint(body: Any) -> str:
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else ""


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), headers=headers, content_type="application/json"
    )


async def _get_config(request: web.Request) -> web.Response:
    return _json(200, request.app[STATE].config.to_dict())


async def _post_config(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        patch = orjson.loads(await request.read())
        if not isinstance(patch, dict):
            raise ValueError("the config patch must be a JSON object")
        state.reconfigure(patch)
    except (ValueError, TypeError, OSError) as exc:  # orjson.JSONDecodeError is a ValueError
        return _json(400, {"error": str(exc)})
    return _json(200, state.config.to_dict())


async def _get_log(request: web.Request) -> web.Response:
    log = request.app[STATE].log
    try:
        since = int(request.query.get("since", "0"))
        limit = int(request.query["limit"]) if "limit" in request.query else None
    except ValueError:
        return _json(400, {"error": "since and limit must be integers"})
    if limit is not None and limit < 0:
        return _json(400, {"error": "limit must be >= 0"})
    records = log.since(since, limit)
    # ``next`` is the cursor for the following call: the last seq returned, or ``since`` if none.
    return _json(200, {"data": records, "next": records[-1]["seq"] if records else since})


async def _delete_log(request: web.Request) -> web.Response:
    request.app[STATE].log.clear()
    return _json(200, {"cleared": True})


async def _get_stats(request: web.Request) -> web.Response:
    return _json(200, request.app[STATE].stats.to_dict())


async def _delete_stats(request: web.Request) -> web.Response:
    stats = request.app[STATE].stats
    stats.reset()
    return _json(200, stats.to_dict())


async def _healthz(request: web.Request) -> web.Response:
    return _json(200, {"status": "ok"})


async def _close_log(app: web.Application) -> None:
    app[STATE].log.close()
