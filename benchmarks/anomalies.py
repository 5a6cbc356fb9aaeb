"""Anomaly benchmark (issue 17, done-when 4): how long after one model turns three times slower
``provider.degraded`` arrives, and how long after it is back ``provider.recovered`` does, with
the shipped windows (a 30 s recent window, a 10-minute baseline, the job every 10 s).

    python -m benchmarks.anomalies                       # 90 s of baseline, then the round
    python -m benchmarks.anomalies --warmup-s 60 --rounds 2

The real stack (API, `conclave worker`, scheduler with its defaults) runs a steady stream of
small council batches on the simulated provider (``--rate`` queries a second, ``--latency-ms``
each call). After ``--warmup-s`` the simulated ``beta`` is made ``--factor`` times slower; the
clock runs from that change until the receiver holds a ``provider.degraded`` delivery (sent by
the scheduler's dispatcher, verified with the ``standardwebhooks`` library), then from the
restore until ``provider.recovered``. Each figure includes the job's interval, the dispatcher's
second, and the time the recent window takes to fill with the new latency.
"""

from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import standardwebhooks

from benchmarks.common import Stack, bench_env, ensure_redis, print_table, stack_parser
from shared.db import make_engine, make_sessionmaker, upgrade
from shared.sim import SimConfig, SimServer
from shared.tenants import issue_key
from shared.webhooks.endpoints import register_endpoint


class Receiver:
    """Webhook deliveries as they arrive: (monotonic time, headers, body)."""

    def __init__(self) -> None:
        self.got: list[tuple[float, dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.got.append((time.monotonic(), {k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, event: str, secret: str, timeout: float) -> tuple[float, dict[str, Any]] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, headers, body in list(self.got):
                payload = standardwebhooks.Webhook(secret).verify(body, headers)
                if payload["type"] == event:
                    return at, payload
            time.sleep(0.1)
        return None


def main() -> None:
    parser = stack_parser(__doc__, latency_ms=100, threads=32, processes=1)
    parser.add_argument("--rate", type=float, default=5, help="queries per second")
    parser.add_argument("--warmup-s", type=float, default=90, help="normal latency before the change")
    parser.add_argument("--factor", type=float, default=3, help="how much slower beta turns")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--timeout-s", type=float, default=180, help="give up waiting for an event")
    args = parser.parse_args()

    redis_ = ensure_redis(os.environ.get("CONCLAVE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    receiver = Receiver()
    with SimServer(SimConfig(latency_ms=args.latency_ms, seed=7)) as sim:
        env = bench_env(redis_.url, args.database_url, sim.url)
        env["CONCLAVE_WEBHOOK_ALLOW_PRIVATE"] = "true"
        upgrade(env["CONCLAVE_DATABASE_URL"])
        sessions = make_sessionmaker(make_engine(env["CONCLAVE_DATABASE_URL"], pool_size=1))
        with sessions.begin() as session:
            issued = issue_key(session, tenant_name="bench-anomalies", role="admin", tier="enterprise")
            register_endpoint(
                session,
                issued.tenant_id,
                receiver.url,
                ["provider.degraded", "provider.recovered"],
                allow_private=True,
            )
        stack = Stack(env=env, logs=Path(env["CONCLAVE_PROVIDERS_FILE"]).parent / "logs")
        stack.logs.mkdir()
        stop = threading.Event()
        try:
            url = stack.start_api()
            stack.start_workers(processes=args.processes, threads=args.threads)
            stack.start_scheduler()
            client = httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {issued.api_key}"}, timeout=60
            )

            def load() -> None:
                n = 0
                while not stop.is_set():
                    k = max(1, round(args.rate))
                    queries = [{"custom_id": f"a{n + i}", "prompt": f"question {n + i}"} for i in range(k)]
                    client.post("/v1/batches", json={"queries": queries}).raise_for_status()
                    n += k
                    stop.wait(k / args.rate)

            threading.Thread(target=load, daemon=True).start()
            time.sleep(args.warmup_s)  # the baseline builds up (a benchmark, not a test)
            rows: list[tuple[object, ...]] = []
            for round_no in range(1, args.rounds + 1):
                receiver.got.clear()
                slow = {"beta": {"latency_ms": args.latency_ms * args.factor}}
                httpx.post(f"{sim.url}/_sim/config", json={"models": slow}).raise_for_status()
                changed = time.monotonic()
                found = receiver.wait_for("provider.degraded", issued.webhook_secret, args.timeout_s)
                degraded_s = round(found[0] - changed, 1) if found else "none"
                reasons = found[1]["data"]["reasons"] if found else []
                httpx.post(f"{sim.url}/_sim/config", json={"models": {}}).raise_for_status()
                restored = time.monotonic()
                back = receiver.wait_for("provider.recovered", issued.webhook_secret, args.timeout_s)
                recovered_s = round(back[0] - restored, 1) if back else "none"
                why = ", ".join(
                    f"{r['model']}/{r['stage']} {r['ratio']}x" for r in reasons if r["kind"] == "latency"
                )
                rows.append((round_no, degraded_s, recovered_s, why))
                if round_no < args.rounds:
                    time.sleep(40)  # the recent window forgets the slow calls first
            load_avg = " ".join(f"{x:.2f}" for x in os.getloadavg())
            print_table(
                f"anomalies: beta x{args.factor} at {args.latency_ms:.0f} ms, {args.rate} queries/s "
                f"(load average {load_avg})",
                ["round", "s to provider.degraded", "s to provider.recovered", "slow (model/stage ratio)"],
                rows,
            )
            print(json.dumps({"rows": rows}))
        finally:
            stop.set()
            stack.stop()
            receiver.server.shutdown()
            redis_.stop()


if __name__ == "__main__":
    main()
