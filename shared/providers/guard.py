"""The layers around one provider call, composed once per provider and process:
circuit breaker (shared) → rate limiter (shared) → concurrency cap (this process) → the call.

The runner retries and falls back around ``ProviderGuard.call``; the wire format inside it
knows nothing of any of this.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx
import redis.asyncio as aioredis

from shared import keys
from shared.providers import errors
from shared.providers.base import ChatRequest, ChatResult, Provider
from shared.providers.breaker import BreakerConfig, CircuitBreaker
from shared.providers.ratelimit import RateLimiter, RateLimitTimeout, estimate_tokens


class ProviderGuard:
    def __init__(
        self,
        provider: Provider,
        *,
        redis_client: aioredis.Redis | None = None,
        namespace: str = keys.DEFAULT_NAMESPACE,
        breaker: BreakerConfig | None = None,
    ):
        cfg = provider.config
        self.provider = provider
        self._slots = asyncio.Semaphore(cfg.max_concurrency)
        self.breaker: CircuitBreaker | None = None
        self.limiter: RateLimiter | None = None
        if redis_client is not None:
            self.breaker = CircuitBreaker(
                redis_client,
                keys.breaker(namespace, cfg.name),
                breaker
                or BreakerConfig(min_failures=cfg.breaker_failures, cooldown_s=cfg.breaker_cooldown_s),
            )
            limiter = RateLimiter(redis_client, keys.ratelimit(namespace, cfg.name), rpm=cfg.rpm, tpm=cfg.tpm)
            self.limiter = limiter if limiter.active else None

    async def call(
        self,
        client: httpx.AsyncClient,
        request: ChatRequest,
        on_send: Callable[[], Awaitable[None]] | None = None,
    ) -> ChatResult:
        """The call through breaker, limiter and cap; ``on_send`` runs once all three let it
        through, right before the request goes out (the worker writes the call's ledger row)."""
        probe = False
        if self.breaker is not None:
            allowed, probe, wait = await self.breaker.acquire()
            if not allowed:
                raise errors.CircuitOpen(
                    f"circuit open for provider {self.provider.name!r}", retry_after=wait or None
                )
        estimate = 0
        if self.limiter is not None:
            estimate = estimate_tokens(request.messages, request.max_tokens)
            try:
                await self.limiter.acquire(estimate)
            except BaseException as exc:
                # No call was made, so the probe learnt nothing: free its slot for the next caller.
                if self.breaker is not None and probe:
                    await self.breaker.release_probe()
                if isinstance(exc, RateLimitTimeout):
                    raise errors.RateLimited(f"local rate limit: {exc}") from exc
                raise
        try:
            async with self._slots:
                if on_send is not None:
                    await on_send()
                result = await self.provider.complete(client, request)
        except errors.ProviderError as exc:
            if self.breaker is not None:
                await self.breaker.record(False, exc.category, probe=probe)
            raise
        except BaseException:
            # Cancelled or crashed mid-call: a probe must not stay claimed until it times out.
            if self.breaker is not None and probe:
                await self.breaker.record(False, "network", probe=True)
            raise
        if self.breaker is not None:
            await self.breaker.record(True, None, probe=probe)
        if self.limiter is not None:
            await self.limiter.settle(estimate, result.input_tokens + result.output_tokens)
        return result
