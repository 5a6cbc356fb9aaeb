"""Client commands: submit, status, results, cancel — HTTP calls to a running API.

Settings: ``CONCLAVE_API_URL`` and ``CONCLAVE_API_KEY``. Rate limits are handled below the
commands, in the client's transport (``ratelimit.py``): they never exit on a 429 they can wait out.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import httpx
import orjson
import typer
from rich.console import Console

from shared.cli.follow import follow_with_progress
from shared.cli.ratelimit import RateLimitTransport
from shared.lifecycle.statuses import BATCH_TERMINAL
from shared.settings import get_settings

console = Console(stderr=True)
TERMINAL = BATCH_TERMINAL


def api_client(url: str | None = None, key: str | None = None) -> httpx.Client:
    settings = get_settings()
    key = key or settings.api_key
    if not key:
        console.print("[red]set CONCLAVE_API_KEY (create one with 'conclave keys create')[/red]")
        raise typer.Exit(2)
    # Every request goes through one rate-limit layer: paced by RateLimit-*, 429s waited out.
    transport = RateLimitTransport(httpx.HTTPTransport(), on_wait=_say_waiting)
    return httpx.Client(
        base_url=url or settings.api_url,
        headers={"Authorization": f"Bearer {key}"},
        timeout=120.0,
        transport=transport,
    )


def _say_waiting(seconds: float, reason: str) -> None:
    console.print(f"[yellow]{reason}: waiting {seconds:.0f} s[/yellow]")


def _check(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            where = f" ({error['param']})" if error.get("param") else ""
            console.print(f"[red]{response.status_code} {error['type']}: {error['message']}{where}[/red]")
        except Exception:
            console.print(f"[red]HTTP {response.status_code}[/red]")
        raise typer.Exit(1)
    return response.json()


def read_queries(path: Path) -> list[dict[str, Any]]:
    """JSONL of queries; OpenAI batch lines (``{"custom_id", "body": {"messages"}}``) are accepted too."""
    queries = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            console.print(f"[red]{path}:{n}: not JSON ({exc})[/red]")
            raise typer.Exit(2) from exc
        if isinstance(item, dict) and isinstance(item.get("body"), dict):
            body = item["body"]
            item = {"custom_id": item.get("custom_id"), "messages": body.get("messages")}
            for key in ("max_tokens", "temperature"):
                if key in body:
                    item[key] = body[key]
        queries.append(item)
    return queries


def submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL, one query per line")],
    priority: Annotated[str, typer.Option(help="high | normal | low")] = "normal",
    wait: Annotated[
        bool, typer.Option(help="Follow the batch's event stream, a progress bar per stage, until it ends.")
    ] = False,
) -> None:
    """Submit a batch from a JSONL file; prints the batch id."""
    with api_client() as client:
        batch = _check(client.post("/v1/batches", json={"queries": read_queries(file), "priority": priority}))
        print(batch["id"])
        if wait:
            batch = follow_with_progress(client, batch["id"], console)
            console.print(f"batch {batch['id']}: {batch['status']}")


def status(batch_id: str) -> None:
    """Print a batch object."""
    with api_client() as client:
        sys.stdout.write(
            orjson.dumps(_check(client.get(f"/v1/batches/{batch_id}")), option=orjson.OPT_INDENT_2).decode()
            + "\n"
        )


def results(
    batch_id: str,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write to this file.")] = None,
    format: Annotated[str, typer.Option(help="jsonl | csv")] = "jsonl",
) -> None:
    """Download a batch's results (partial while it runs)."""
    with (
        api_client() as client,
        client.stream("GET", f"/v1/batches/{batch_id}/results", params={"format": format}) as response,
    ):
        if response.status_code >= 400:
            response.read()
            _check(response)
        sink = output.open("wb") if output else sys.stdout.buffer
        try:
            for chunk in response.iter_bytes():
                sink.write(chunk)
        finally:
            if output:
                sink.close()


def cancel(batch_id: str) -> None:
    """Cancel a batch: queued queries never run; running ones may finish."""
    with api_client() as client:
        batch = _check(client.post(f"/v1/batches/{batch_id}/cancel"))
        console.print(f"batch {batch['id']}: {batch['status']}")
