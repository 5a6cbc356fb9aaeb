"""``conclave demo``: the whole system on one machine with nothing but Python.

Starts (or reuses) Redis, a SQLite database in ``./.conclave-demo/``, the simulated provider,
the API, a worker pool and the scheduler as real processes; submits the sample batch; follows
its event stream with a progress bar per council stage; prints the council's answers; stops everything.
"""

from __future__ import annotations

import contextlib
import os
import time
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

from shared.cli.client import TERMINAL, _check, api_client, read_queries
from shared.cli.follow import follow_with_progress
from shared.settings import get_settings

console = Console()


def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo keeps its database and logs.")] = Path(
        ".conclave-demo"
    ),
    latency_ms: Annotated[float, typer.Option(help="Simulated provider latency.")] = 300.0,
    queries: Annotated[
        Path | None, typer.Option(help="JSONL of queries (default: the built-in sample).")
    ] = None,
    serve: Annotated[
        bool,
        typer.Option(
            help="Keep the stack running after the sample, for the examples/ scripts (Ctrl-C stops)."
        ),
    ] = False,
) -> None:
    """Run the main job end to end on this machine and print the council's answers."""
    from shared.db import upgrade
    from shared.sim import SimConfig, SimServer
    from shared.stack import Stack, ensure_redis
    from shared.tenants import issue_key

    settings = get_settings()
    workdir.mkdir(parents=True, exist_ok=True)
    database_url = (
        os.environ.get("CONCLAVE_DATABASE_URL") or f"sqlite:///{(workdir / 'conclave.db').resolve()}"
    )
    sample = queries or Path(str(resources.files("shared") / "demo" / "sample.jsonl"))

    redis_ = ensure_redis(settings.redis_url)
    console.print(f"[dim]redis: {redis_.kind} at {redis_.url}[/dim]")
    sim = SimServer(SimConfig(latency_ms=latency_ms, latency_jitter_ms=latency_ms / 3, seed=7)).start()
    console.print(f"[dim]simulated provider: {sim.url} ({latency_ms:g} ms)[/dim]")
    env = {
        **os.environ,
        "CONCLAVE_DATABASE_URL": database_url,
        "CONCLAVE_REDIS_URL": redis_.url,
        "CONCLAVE_SIM_PROVIDER_URL": sim.url,
        # The demo always runs against the simulated provider, even next to a real providers.toml.
        "CONCLAVE_PROVIDERS_FILE": str((workdir / "no-providers.toml").resolve()),
        "CONCLAVE_LOG_LEVEL": "WARNING",
    }
    stack = Stack(env=env, logs=workdir / "logs")
    stack.logs.mkdir(parents=True, exist_ok=True)
    try:
        upgrade(database_url)
        from shared.db import make_engine, make_sessionmaker

        with make_sessionmaker(make_engine(database_url, pool_size=1)).begin() as session:
            key = issue_key(session, tenant_name="demo", role="admin", tier="enterprise").api_key
        api_url = stack.start_api()
        stack.start_workers(processes=1, threads=32)
        stack.start_scheduler()
        console.print(f"[dim]api: {api_url} · workers: 1×32 · logs: {stack.logs}[/dim]")

        with api_client(api_url, key) as client:
            batch = _check(client.post("/v1/batches", json={"queries": read_queries(sample)}))
            console.print(
                f"submitted [bold]{batch['id']}[/bold] ({batch['request_counts']['total']} queries, "
                f"council {', '.join(batch['council']['members'])} → {batch['council']['chairman']})"
            )
            batch = follow_with_progress(client, batch["id"], console, alive=stack.dead)
            assert batch["status"] in TERMINAL
            response = client.get(f"/v1/batches/{batch['id']}/results")
            records = [line for line in response.text.splitlines() if line]
        import orjson

        questions = {
            q["custom_id"]: q.get("prompt") or q["messages"][-1]["content"] for q in read_queries(sample)
        }
        for line in records:
            record = orjson.loads(line)
            ranking = ", ".join(
                f"{r['model']} ({r['mean_rank']})" for r in record["aggregate_ranking"] if r["votes"]
            )
            body = (
                escape(record["answer"])
                if record["answer"]
                else f"[red]{record['status']}: {escape(str(record['error']))}[/red]"
            )
            console.print(
                Panel(
                    f"[bold]{escape(questions.get(record['custom_id'], ''))}[/bold]\n\n{body}\n\n"
                    f"[dim]synthesis: {record['synthesis']} · ranking: {ranking or 'n/a'} · "
                    f"{record['latency_ms']} ms[/dim]",
                    title=record["custom_id"],
                    title_align="left",
                )
            )
        counts = batch["request_counts"]
        console.print(
            f"batch {batch['status']}: {counts['completed']} succeeded, {counts['failed']} failed "
            f"of {counts['total']}"
        )
        if serve:
            # The SDK examples (examples/) read these, as every Conclave client does (SPEC §2).
            console.print(
                "\n[bold]The stack keeps running; in another shell:[/bold]\n"
                f"export CONCLAVE_API_URL={api_url}\nexport CONCLAVE_API_KEY={key}\n"
                "python examples/openai_batch.py   # or examples/anthropic_batch.py\n"
                "[dim]Ctrl-C stops it.[/dim]"
            )
            with contextlib.suppress(KeyboardInterrupt):
                while not stack.dead():
                    time.sleep(0.5)
    finally:
        stack.stop()
        sim.stop()
        redis_.stop()
