"""Operator commands: keys, migrations, and running the processes (API, workers, simulated provider)."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import orjson
import typer
from rich.console import Console

from shared.settings import PRIORITIES, get_settings

keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
console = Console()
errors = Console(stderr=True)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant name; created if it does not exist.")],
    role: Annotated[str, typer.Option(help="admin | user | viewer")] = "user",
    tier: Annotated[
        str, typer.Option(help="One of the deployment's tiers (free | pro | enterprise by default).")
    ] = "free",
    operator: Annotated[bool, typer.Option(help="Make a new tenant the operator tenant.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Create a tenant (if needed) and a new API key for it; the key is shown once."""
    from shared.db import make_engine, make_sessionmaker, upgrade
    from shared.tenants import ROLES, check_tier, issue_key

    settings = get_settings()
    # The tiers are the deployment's (CONCLAVE_TIERS), not a fixed list.
    problem = None if role in ROLES else f"role must be one of {ROLES}"
    problem = problem or check_tier(settings, tier)
    if problem:
        errors.print(f"[red]{problem}[/red]")
        raise typer.Exit(2)
    upgrade(settings.database_url)
    sessions = make_sessionmaker(make_engine(settings.database_url, pool_size=1))
    with sessions.begin() as session:
        issued = issue_key(
            session, tenant_name=tenant, role=role, tier=tier, operator=operator, settings=settings
        )
    if as_json:
        sys.stdout.write(
            orjson.dumps(
                {
                    "api_key": issued.api_key,
                    "tenant_id": issued.tenant_id,
                    "webhook_secret": issued.webhook_secret,
                }
            ).decode()
            + "\n"
        )
        return
    console.print(f"tenant   {issued.tenant_id} ({'created' if issued.created_tenant else 'existing'})")
    console.print(f"api key  [bold]{issued.api_key}[/bold]  (shown once; store it now)")


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply database migrations."""
    from shared.db import upgrade

    upgrade(get_settings().database_url, revision)
    console.print("database is up to date")


def sim_provider(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8900,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    latency_ms: Annotated[float, typer.Option(help="Mean latency per call.")] = 0.0,
    error_rate: Annotated[float, typer.Option(help="Probability that a call fails.")] = 0.0,
    error_kinds: Annotated[str, typer.Option(help="Comma-separated error kinds.")] = "server",
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible faults.")] = None,
) -> None:
    """Serve the simulated provider (all three wire formats)."""
    from shared.sim import SimConfig, serve

    config = SimConfig(
        latency_ms=latency_ms,
        error_rate=error_rate,
        error_kinds=[k.strip() for k in error_kinds.split(",") if k.strip()],
        seed=seed,
    )
    serve(config, host, port)


def api(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1,
) -> None:
    """Run the HTTP API (uvicorn)."""
    import uvicorn

    from shared.db import upgrade

    upgrade(get_settings().database_url)
    uvicorn.run(
        "api.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="warning",
        access_log=False,
    )


def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated priority queues to consume.")] = ",".join(
        PRIORITIES
    ),
    processes: Annotated[int, typer.Option()] = 1,
    threads: Annotated[
        int,
        typer.Option(help="Queries in flight per process (plus an eighth more kept for high, if served)."),
    ] = 64,
) -> None:
    """Run a worker pool (dramatiq) on the given priority queues."""
    names = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = [q for q in names if q not in PRIORITIES]
    if unknown:
        errors.print(f"[red]unknown queue(s) {unknown}; use {PRIORITIES}[/red]")
        raise typer.Exit(2)
    from shared.queue.contract import HIGH_RESERVE_ENV, high_reserve

    # A process serving `high` and a lower queue gets extra threads kept for `high`
    # (workers/broker.py, shared/queue/contract.py); `threads` stays what normal and low work can
    # have in flight.
    reserve = high_reserve(threads, names)
    argv = [
        sys.executable,
        "-m",
        "dramatiq",
        "workers.actors",
        "--processes",
        str(processes),
        "--threads",
        str(threads + reserve),
        "--queues",
        *names,
    ]
    os.execve(sys.executable, argv, {**os.environ, HIGH_RESERVE_ENV: str(reserve)})
