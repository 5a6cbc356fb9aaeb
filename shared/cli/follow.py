"""Follow a batch to its end through its event stream (SPEC §12), with a progress bar per stage.

Used by ``conclave submit --wait`` and ``conclave demo`` instead of polling: the API pushes a
``progress`` event at most once a second when something changed, and the ``end`` event carries
the final batch object. A dropped connection (an API replica restarting, a proxy's idle timeout)
is resumed with ``Last-Event-ID``, so nothing is missed and nothing is counted twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from shared.progress import STAGES, parse_event_stream

# Reconnect after this long without a byte: the API sends a keep-alive every 15 s.
READ_TIMEOUT_S = 40.0
RECONNECT_S = (0.5, 1.0, 2.0, 5.0)
MAX_RECONNECTS = 20  # about a minute and a half without an answer: the API is gone


class StreamFailed(Exception):
    """The API answered the stream with an error (its body says why)."""

    def __init__(self, status: int, body: Any):
        super().__init__(f"HTTP {status}")
        self.status, self.body = status, body


def follow_with_progress(
    client: httpx.Client,
    batch_id: str,
    console: Console,
    alive: Callable[[], str | None] | None = None,
) -> dict[str, Any]:
    """Show the batch's progress until its ``end`` event; return the final batch object.
    ``alive`` returns why to give up (e.g. a local process died)."""
    with Progress(
        TextColumn("[bold]{task.description:>9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bars:
        tasks = {stage: bars.add_task(stage, total=None, detail="") for stage in STAGES}
        last_id: str | None = None
        failures = 0
        while True:
            try:
                for event in _events(client, batch_id, last_id):
                    failures = 0
                    last_id = event.get("id", last_id)
                    data = orjson.loads(event["data"])
                    if event["event"] == "progress":
                        _show(bars, tasks, data)
                    elif event["event"] == "end":
                        return dict(data)
                    _give_up_if_dead(alive, console)
            except StreamFailed as exc:
                error = exc.body.get("error", {}) if isinstance(exc.body, dict) else {}
                console.print(
                    f"[red]{exc.status} {error.get('type', '')}: {error.get('message', exc.body)}[/red]"
                )
                raise typer.Exit(1) from None
            except httpx.TransportError as exc:
                if failures >= MAX_RECONNECTS:
                    console.print(
                        f"[red]lost the API ({type(exc).__name__}); the batch goes on without us[/red]"
                    )
                    raise typer.Exit(1) from None
            _give_up_if_dead(alive, console)
            time.sleep(RECONNECT_S[min(failures, len(RECONNECT_S) - 1)])  # reconnect backoff
            failures += 1


def _events(client: httpx.Client, batch_id: str, last_id: str | None) -> Any:
    headers = {"Accept": "text/event-stream"}
    if last_id:
        headers["Last-Event-ID"] = last_id
    timeout = httpx.Timeout(30.0, read=READ_TIMEOUT_S)
    with client.stream("GET", f"/v1/batches/{batch_id}/events", headers=headers, timeout=timeout) as response:
        if response.status_code != 200:
            response.read()
            try:
                body: Any = response.json()
            except ValueError:
                body = response.text[:200]
            raise StreamFailed(response.status_code, body)
        yield from parse_event_stream(response.iter_lines())


def _show(bars: Progress, tasks: dict[str, TaskID], data: dict[str, Any]) -> None:
    counts = data["request_counts"]
    eta = data.get("eta_seconds")
    details = {
        "answer": f"{data['status']} · ok {counts['completed']} · failed {counts['failed']}",
        "review": f"running {counts['running']} · queued {counts['queued']}",
        "synthesis": f"${data['cost_usd']:.4f}" + (f" · ETA {eta} s" if eta is not None else ""),
    }
    for stage, task in tasks.items():
        st = data["stages"][stage]
        bars.update(task, completed=st["done"], total=st["total"], detail=details[stage])


def _give_up_if_dead(alive: Callable[[], str | None] | None, console: Console) -> None:
    problem = alive() if alive else None
    if problem:
        console.print(f"[red]{problem}[/red]")
        raise typer.Exit(1)
