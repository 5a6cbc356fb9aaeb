"""Every Redis key Conclave reads or writes, named in one place.

Redis holds no truth (the database does): queues, liveness, shared limits and counters. All keys
of one deployment share its namespace (``CONCLAVE_QUEUE_NAMESPACE``), so several deployments, or
test sessions, can share one Redis. The module that owns a piece of state is the only one that
reads its layout; everyone else calls that module (admin views included).

| key | type | owner |
| --- | --- | --- |
| ``{ns}:{queue}``, ``{ns}:{queue}.msgs`` | list, hash | dramatiq's Redis layout (``shared/queue``) |
| ``{ns}:{queue}.DQ`` (+ ``.msgs``) | list, hash | dramatiq: the delay queue, a queue of its own |
| ``{ns}:{queue}.XQ`` | sorted set | dramatiq: dead-lettered |
| ``{ns}:fair:{queue}:…``, ``{ns}:fair:weights`` | lists, sorted sets, hashes | ``shared/queue/fair.py`` |
| ``{ns}:workers``, ``{ns}:workers:since`` | sorted set, string | ``shared/liveness.py`` |
| ``{ns}:breaker:{provider}`` (+ ``:probe``) | hash, string | ``shared/providers/breaker.py`` |
| ``{ns}:ratelimit:{provider}:rpm`` / ``:tpm`` | string (GCRA) | ``shared/providers/ratelimit.py`` |
| ``{ns}:rl:{kind}:{subject}`` | sorted set | ``api/ratelimit.py`` (sliding windows) |
| ``{ns}:quota:{tenant}:{day}`` | string | ``shared/quota.py`` |
| ``{ns}:metrics``, ``{ns}:{counter}:{minute}`` | hash, string | ``shared/metrics.py`` |
| ``{ns}:scheduler:leader`` | string | ``scheduler/leader.py`` |
| ``{ns}:progress:{batch}:{stage}`` | set | ``shared/progress.py`` |
| ``{ns}:progress-changed:{batch}`` | pub/sub channel | ``shared/progress.py`` |
| ``{ns}:dashboard-session:{sha256}`` | string | ``shared/dashboard_sessions.py`` |
| ``{ns}:cache:{tenant}:{g}.{m}:{sha256}`` (+ ``:lock``) | string | ``shared/cache.py`` (exact cache) |
| ``{ns}:cache-gen:{tenant}`` | hash | ``shared/cache.py`` (invalidation generations) |
| ``{ns}:semcache:{tenant}:{context}`` (+ ``:seq``) | sorted set, string | ``shared/semantic_cache.py`` |
| ``{ns}:spend:{tenant}:{month}`` (+ ``:holds``, ``:estimates``) | hash, zset, hash | ``shared/budget.py`` |
| ``{ns}:budget-waiting:{tenant}`` | set | ``shared/budget.py`` (batches waiting for budget) |
| ``{ns}:budget-changed`` | pub/sub channel | ``shared/budget.py`` (a tenant's budget changed) |
| ``{ns}:anomalies:{providers,log,latest,marks}`` | hash, list, str, zset | ``shared/analytics/anomalies`` |
"""

from __future__ import annotations

DEFAULT_NAMESPACE = "conclave"


# dramatiq's Redis broker layout (dramatiq/brokers/redis.py and dispatch.lua, 2.x).
def queue(ns: str, name: str) -> str:
    return f"{ns}:{name}"


def queue_messages(ns: str, name: str) -> str:
    """Message bodies by id: a message is here from enqueue until its ack."""
    return f"{ns}:{name}.msgs"


def fair_lanes(ns: str, name: str) -> str:
    """Prefix of a priority queue's fair lanes (``shared/queue/fair.py``): ``:tenants``,
    ``:clock``, ``:depth``, ``:urgent``, ``:owner``, ``:t:{tenant}``, ``:b:{batch}``."""
    return f"{ns}:fair:{name}"


def fair_depth(ns: str, name: str) -> str:
    """A list as long as the ids a queue's fair lanes hold (one-byte marks; the lane scripts keep
    it as ``{prefix}:depth``), for queue-length autoscalers."""
    return f"{fair_lanes(ns, name)}:depth"


def fair_weights(ns: str) -> str:
    """Tenant id → share weight, for every queue's lanes."""
    return f"{ns}:fair:weights"


def delayed_queue_name(name: str) -> str:
    return f"{name}.DQ"


def dead_lettered(ns: str, name: str) -> str:
    return f"{ns}:{name}.XQ"


def workers(ns: str) -> str:
    return f"{ns}:workers"


def workers_since(ns: str) -> str:
    return f"{ns}:workers:since"


def breaker(ns: str, provider: str) -> str:
    return f"{ns}:breaker:{provider}"


def breaker_probe(breaker_key: str) -> str:
    return f"{breaker_key}:probe"


def ratelimit(ns: str, provider: str) -> str:
    """The limiter's prefix; its rpm and tpm keys hang below it (``ratelimit_rpm``/``_tpm``)."""
    return f"{ns}:ratelimit:{provider}"


def ratelimit_rpm(prefix: str) -> str:
    return f"{prefix}:rpm"


def ratelimit_tpm(prefix: str) -> str:
    return f"{prefix}:tpm"


def sliding_window(ns: str, kind: str, subject: str) -> str:
    return f"{ns}:rl:{kind}:{subject}"


def daily_quota(ns: str, tenant_id: str, day_start: int) -> str:
    return f"{ns}:quota:{tenant_id}:{day_start}"


def metrics(ns: str) -> str:
    return f"{ns}:metrics"


def minute_counter(ns: str, name: str, minute: int) -> str:
    return f"{ns}:{name}:{minute}"


def scheduler_leader(ns: str) -> str:
    return f"{ns}:scheduler:leader"


def progress_stage(ns: str, batch_id: str, stage: str) -> str:
    return f"{ns}:progress:{batch_id}:{stage}"


def progress_changed(ns: str, batch_id: str) -> str:
    return f"{ns}:progress-changed:{batch_id}"


def dashboard_session(ns: str, token_sha256: str) -> str:
    return f"{ns}:dashboard-session:{token_sha256}"


def cache_prefix(ns: str, tenant_id: str) -> str:
    """A tenant's exact-cache entries hang below this (``shared/cache.py`` adds the generation and
    the digest): never shared across tenants."""
    return f"{ns}:cache:{tenant_id}"


def cache_lock(entry_key: str) -> str:
    return f"{entry_key}:lock"


def cache_generations(ns: str, tenant_id: str) -> str:
    """Hash of invalidation generations: field ``*`` for the whole tenant, one per model."""
    return f"{ns}:cache-gen:{tenant_id}"


def semantic_index(ns: str, tenant_id: str, context: str) -> str:
    """The questions a tenant's stage 1 calls answered in one context (system text and
    parameters), scored by insertion: never shared across tenants."""
    return f"{ns}:semcache:{tenant_id}:{context}"


def semantic_sequence(index_key: str) -> str:
    return f"{index_key}:seq"


def spend(ns: str, tenant_id: str, month_start: int) -> str:
    """A tenant's spend counter for one month: spent, reserved, the EWMA of a query's cost."""
    return f"{ns}:spend:{tenant_id}:{month_start}"


def spend_holds(ns: str, tenant_id: str, month_start: int) -> str:
    """Reservations by query, scored by the end of the query's lease."""
    return f"{spend(ns, tenant_id, month_start)}:holds"


def spend_estimates(ns: str, tenant_id: str, month_start: int) -> str:
    return f"{spend(ns, tenant_id, month_start)}:estimates"


def budget_waiting(ns: str, tenant_id: str) -> str:
    return f"{ns}:budget-waiting:{tenant_id}"


def budget_changed(ns: str) -> str:
    return f"{ns}:budget-changed"


def anomaly_providers(ns: str) -> str:
    """Provider → its anomaly state (degraded since, why, frozen means)."""
    return f"{ns}:anomalies:providers"


def anomaly_log(ns: str) -> str:
    """The latest anomaly events, newest first."""
    return f"{ns}:anomalies:log"


def anomaly_latest(ns: str) -> str:
    """The last detector run's findings (slow queries)."""
    return f"{ns}:anomalies:latest"


def anomaly_marks(ns: str) -> str:
    """(time, largest call id) marks that bound the detector's ledger reads."""
    return f"{ns}:anomalies:marks"
