"""The ``conclave`` command (SPEC §2): one typer app, one module per group of commands."""

from __future__ import annotations

import typer

from shared.cli import client, demo, ops

app = typer.Typer(
    help="Conclave: batches of LLM council queries.", no_args_is_help=True, add_completion=False
)
app.add_typer(ops.keys_app, name="keys")
app.add_typer(ops.db_app, name="db")
app.command("sim-provider")(ops.sim_provider)
app.command("api")(ops.api)
app.command("worker")(ops.worker)
app.command("submit")(client.submit)
app.command("status")(client.status)
app.command("results")(client.results)
app.command("cancel")(client.cancel)
app.command("demo")(demo.demo)

if __name__ == "__main__":
    app()
