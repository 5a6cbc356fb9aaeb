"""The dashboard in headless Chromium (SPEC §12): sign-in, live batch progress without a reload,
cancel, results download, sign-out, the operations page, and the security promises.

Each page's screenshot is written to ``test-artifacts/browser/``.
"""

from __future__ import annotations

import http.server
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from shared.keys import fair_depth
from shared.sim import SimServer
from shared.stack import free_port, terminate
from shared.tenants import create_key
from tests.browser.conftest import Browse, Deployment
from tests.helpers import poll, sim_log, tagged_queries, wait_for_batch

pytestmark = pytest.mark.integration

STAGES = ("answer", "review", "synthesis")


def set_sim(sim: SimServer, **config: object) -> None:
    httpx.post(f"{sim.url}/_sim/config", json=config).raise_for_status()


@pytest.fixture(scope="module")
def workers(deployment: Deployment) -> Iterator[Any]:
    proc = deployment.stack.start_workers(processes=2, threads=32)
    yield proc


def dom_figures(page: Any) -> dict[str, Any]:
    return page.evaluate(
        """() => {
          const t = (id) => document.getElementById(id).textContent;
          const out = {status: t('status'), done: +t('done'), total: +t('total'), eta: t('eta'),
                       cost: t('cost'), marker: window.__notReloaded === true, stages: {}};
          for (const s of ['answer', 'review', 'synthesis']) out.stages[s] = +t('stage-' + s + '-done');
          for (const k of ['completed', 'failed', 'queued', 'running', 'cancelled', 'expired'])
            out[k] = +t('count-' + k);
          return out;
        }"""
    )


def test_batch_page_follows_a_running_batch_live_and_downloads_results(
    browse: Any, deployment: Deployment, workers: Any, sim: SimServer
) -> None:
    key, _ = deployment.key("user")
    b: Browse = browse()
    b.sign_in(key)
    set_sim(sim, latency_ms=150)
    with deployment.api(key) as api:
        batch_id = api.post("/v1/batches", json={"queries": tagged_queries(300, prefix="live")}).json()["id"]
        b.page.goto(f"{deployment.url}/dashboard/batches/{batch_id}")
        b.page.evaluate("window.__notReloaded = true")
        samples = []
        deadline = time.monotonic() + 180
        shot_running = False
        while time.monotonic() < deadline:
            figures = dom_figures(b.page)
            samples.append(figures)
            if not shot_running and 0 < figures["stages"]["synthesis"] < figures["stages"]["answer"] < 300:
                b.shot("batch-running")
                shot_running = True
            if b.page.text_content("#stream-state") == "ended":
                break
            b.page.wait_for_timeout(150)
        final = api.get(f"/v1/batches/{batch_id}").json()
        assert final["status"] == "completed"
        last = dom_figures(b.page)
        b.page.wait_for_timeout(600)  # the bars' width transition, for the screenshot
        b.shot("batch-completed")

        # The figures moved while the batch ran, on one page load, and never went backwards.
        assert last["marker"], "the page was reloaded"
        for stage in STAGES:
            seen = [s["stages"][stage] for s in samples]
            assert len(set(seen)) >= 3, (stage, sorted(set(seen)))
            assert seen == sorted(seen), f"{stage} went backwards"
        assert len({s["done"] for s in samples}) >= 3
        assert len({s["cost"] for s in samples}) >= 3
        assert len({s["eta"] for s in samples}) >= 2
        # ...and ended equal to the API's.
        counts = final["request_counts"]
        assert last["status"] == "completed" and last["total"] == counts["total"] == 300
        assert last["done"] == counts["completed"] + counts["failed"] == 300
        assert {k: last[k] for k in counts if k != "total"} == {
            k: v for k, v in counts.items() if k != "total"
        }
        assert last["stages"] == dict.fromkeys(STAGES, 300)
        assert last["cost"] == f"${final['cost_usd']:.4f}"
        assert last["eta"] == "0 s" and final["eta_seconds"] == 0

        # Per-member latency and cost come from the ledger.
        b.page.wait_for_selector("#members tr td.num")
        members = b.page.eval_on_selector_all("#members tr", "rows => rows.map(r => r.cells[0].textContent)")
        assert {"sim:alpha", "sim:beta", "sim:gamma", "sim:chairman"} <= set(members)

        # The results download holds the same records as the API's.
        with b.page.expect_download() as info:
            b.page.click("#download-jsonl")
        path = info.value.path()
        downloaded = [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
        expected = [orjson.loads(x) for x in api.get(f"/v1/batches/{batch_id}/results").content.splitlines()]
        assert downloaded == expected and len(downloaded) == 300

    b.page.goto(f"{deployment.url}/dashboard/batches")
    b.page.wait_for_selector(f"tr[data-batch-id='{batch_id}']")
    b.shot("batches")
    b.page.goto(f"{deployment.url}/dashboard/models")
    b.page.wait_for_selector("#model-rows tr td.num")
    b.shot("models")
    models = b.page.eval_on_selector_all("#model-rows tr", "rows => rows.map(r => r.cells[0].textContent)")
    assert {"sim:alpha", "sim:chairman"} <= set(models)
    b.assert_same_origin()


def test_cancel_from_the_page_stops_the_batch(
    browse: Any, deployment: Deployment, workers: Any, sim: SimServer
) -> None:
    key, _ = deployment.key("user")
    b: Browse = browse()
    b.sign_in(key)
    set_sim(sim, latency_ms=300)
    with deployment.api(key) as api:
        batch_id = api.post("/v1/batches", json={"queries": tagged_queries(2000, prefix="stop")}).json()["id"]
        b.page.goto(f"{deployment.url}/dashboard/batches/{batch_id}")
        b.page.wait_for_function("+document.getElementById('stage-answer-done').textContent > 0")
        b.page.click("#cancel")
        b.page.wait_for_function(
            "document.getElementById('status').textContent === 'cancelled'", timeout=60_000
        )
        b.shot("batch-cancelled")
        final = wait_for_batch(api, batch_id, timeout=60)
        assert final["status"] == "cancelled"
        assert final["request_counts"]["cancelled"] > 1000
        assert dom_figures(b.page)["cancelled"] == final["request_counts"]["cancelled"]
        # Stopped: no provider call for this batch after it ended.
        calls_then = sim_calls(sim, "stop")
        time.sleep(1.0)  # a window in which a still-running batch would have made calls
        assert sim_calls(sim, "stop") == calls_then
    b.assert_same_origin()


def sim_calls(sim: SimServer, tag: str) -> int:
    return sum(1 for r in sim_log(sim.url) if f"[tag:{tag}-" in orjson.dumps(r).decode())


def test_sign_out_ends_the_session(browse: Any, deployment: Deployment) -> None:
    key, _ = deployment.key("user")
    b: Browse = browse()
    b.sign_in(key)
    b.shot("signed-in-batches")
    (cookie,) = [c for c in b.context.cookies() if c["name"] == "conclave_session"]
    b.page.click("#signout")
    b.page.wait_for_url(f"{deployment.url}/dashboard/signin")
    b.shot("signin")
    assert not [c for c in b.context.cookies() if c["name"] == "conclave_session"]
    b.page.goto(f"{deployment.url}/dashboard/batches")
    assert b.page.url == f"{deployment.url}/dashboard/signin"
    # The old cookie is dead on the server too, not only forgotten by this browser.
    replay = httpx.get(
        f"{deployment.url}/dashboard/data/batches", cookies={"conclave_session": cookie["value"]}
    )
    assert replay.status_code == 401
    b.assert_same_origin()


def test_key_never_in_a_url_storage_or_log_and_the_cookie_is_locked_down(
    browse: Any, deployment: Deployment, workers: Any
) -> None:
    key, _ = deployment.key("user")
    b: Browse = browse()
    b.sign_in(key)
    with deployment.api(key) as api:
        batch_id = api.post("/v1/batches", json={"queries": tagged_queries(3, prefix="sec")}).json()["id"]
    for path in ("/dashboard/batches", f"/dashboard/batches/{batch_id}", "/dashboard/models"):
        b.page.goto(deployment.url + path)
        b.page.wait_for_load_state("networkidle") if path.endswith("models") else b.page.wait_for_timeout(
            1500
        )
        storage = b.page.evaluate(
            "() => JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage)])"
        )
        assert key not in storage
        assert key not in b.page.content()
    assert b.requests and not [u for u in b.requests if key in u]
    assert key not in deployment.stack.log_text()

    (cookie,) = [c for c in b.context.cookies() if c["name"] == "conclave_session"]
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict" and cookie["path"] == "/dashboard"
    assert key not in cookie["value"]
    assert b.page.evaluate("document.cookie") == ""
    # Behind an https proxy the cookie is Secure too.
    behind_tls = httpx.post(
        f"{deployment.url}/dashboard/signin",
        data={"api_key": key},
        headers={"X-Forwarded-Proto": "https", "Origin": deployment.url.replace("http://", "https://")},
    )
    assert behind_tls.status_code == 303, behind_tls.text
    set_cookie = behind_tls.headers["set-cookie"]
    assert re.search(r"(?i);\s*secure", set_cookie) and re.search(r"(?i)httponly", set_cookie)
    assert re.search(r"(?i)samesite=strict", set_cookie)
    b.assert_same_origin()


class _AttackerPage(http.server.BaseHTTPRequestHandler):
    target = ""

    def do_GET(self) -> None:
        body = (
            f'<html><body><form id="f" method="post" action="{self.target}">'
            '<input name="x" value="1"></form><script>document.getElementById("f").submit()</script>'
            "</body></html>"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_cross_site_form_post_is_refused(
    browse: Any, deployment: Deployment, workers: Any, sim: SimServer
) -> None:
    key, _ = deployment.key("user")
    set_sim(sim, latency_ms=500)
    with deployment.api(key) as api:
        batch_id = api.post("/v1/batches", json={"queries": tagged_queries(400, prefix="csrf")}).json()["id"]
        b: Browse = browse()
        b.sign_in(key)
        # Another site (another origin: another port) makes the signed-in browser post a cancel.
        port = free_port()
        handler = type(
            "Attacker", (_AttackerPage,), {"target": f"{deployment.url}/dashboard/batches/{batch_id}/cancel"}
        )
        server = http.server.HTTPServer(("127.0.0.1", port), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            with b.page.expect_response(lambda r: r.url.endswith("/cancel")) as answer:
                b.page.goto(f"http://localhost:{port}/")
            assert answer.value.status in (401, 403)
        finally:
            server.shutdown()
        assert api.get(f"/v1/batches/{batch_id}").json()["status"] == "in_progress"
        # With the session cookie itself (no SameSite help) a foreign Origin is still refused.
        (cookie,) = [c for c in b.context.cookies() if c["name"] == "conclave_session"]
        forged = httpx.post(
            f"{deployment.url}/dashboard/batches/{batch_id}/cancel",
            cookies={"conclave_session": cookie["value"]},
            headers={"Origin": "http://evil.example"},
        )
        assert forged.status_code == 403 and forged.json()["error"]["type"] == "permission_error"
        no_origin = httpx.post(
            f"{deployment.url}/dashboard/batches/{batch_id}/cancel",
            cookies={"conclave_session": cookie["value"]},
        )
        assert no_origin.status_code == 403
        assert api.get(f"/v1/batches/{batch_id}").json()["status"] == "in_progress"
        api.post(f"/v1/batches/{batch_id}/cancel")
    # Nor can another site sign the browser in (to a session of the attacker's choosing).
    login = httpx.post(
        f"{deployment.url}/dashboard/signin", data={"api_key": key}, headers={"Origin": "http://evil.example"}
    )
    assert login.status_code == 403 and "set-cookie" not in login.headers


def test_a_viewer_sees_no_cancel_and_the_api_refuses_it(browse: Any, deployment: Deployment) -> None:
    user_key, tenant = deployment.key("user")
    with deployment.sessions.begin() as session:
        viewer_key, _ = create_key(session, tenant, "viewer")
    with deployment.api(user_key) as api:
        batch_id = api.post("/v1/batches", json={"queries": tagged_queries(5, prefix="view")}).json()["id"]
    b: Browse = browse()
    b.sign_in(viewer_key)
    b.page.goto(f"{deployment.url}/dashboard/batches/{batch_id}")
    b.page.wait_for_function("document.getElementById('status').textContent !== '…'")
    b.shot("batch-viewer")
    assert b.page.query_selector("#cancel") is None
    assert b.page.query_selector("#download-jsonl") is not None
    status = b.page.evaluate(
        f"fetch('/dashboard/batches/{batch_id}/cancel', {{method: 'POST'}}).then(r => r.status)"
    )
    assert status == 403
    with deployment.api(viewer_key) as api:
        refused = api.post(f"/v1/batches/{batch_id}/cancel")
        assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
        assert api.get(f"/v1/batches/{batch_id}").json()["status"] not in ("cancelling", "cancelled")


def test_another_tenants_batch_is_404_on_every_page_and_stream(browse: Any, deployment: Deployment) -> None:
    mine, _ = deployment.key("admin")
    theirs, _ = deployment.key("admin")
    with deployment.api(theirs) as api:
        batch_id = api.post("/v1/batches", json={"queries": tagged_queries(2, prefix="other")}).json()["id"]
    b: Browse = browse()
    b.sign_in(mine)
    page = b.page.goto(f"{deployment.url}/dashboard/batches/{batch_id}")
    assert page is not None and page.status == 404
    b.shot("batch-other-tenant-404")
    for path, method in (
        (f"/dashboard/data/batches/{batch_id}", "GET"),
        (f"/dashboard/batches/{batch_id}/events", "GET"),
        (f"/dashboard/batches/{batch_id}/events?queries=true", "GET"),
        (f"/dashboard/batches/{batch_id}/results", "GET"),
        (f"/dashboard/batches/{batch_id}/results?format=csv", "GET"),
        (f"/dashboard/batches/{batch_id}/cancel", "POST"),
    ):
        status = b.page.evaluate(f"fetch('{path}', {{method: '{method}'}}).then(r => r.status)")
        assert status == 404, (path, status)
    with deployment.api(mine) as api:
        for path in (f"/v1/batches/{batch_id}/events", f"/v1/batches/{batch_id}/events?queries=true"):
            r = api.get(path)
            assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error", path
    # The batches page lists only the tenant's own batches.
    b.page.goto(f"{deployment.url}/dashboard/batches")
    b.page.wait_for_selector("#batch-rows tr")
    assert b.page.query_selector(f"tr[data-batch-id='{batch_id}']") is None


def test_operations_page_shows_queue_depths_and_an_open_circuit(
    browse: Any, deployment: Deployment, workers: Any, sim: SimServer
) -> None:
    key, _ = deployment.key("admin", operator=True)
    user_key, _ = deployment.key("user")
    ns = deployment.settings.queue_namespace
    # No worker: what is queued stays queued, and the page must show exactly Redis's depths.
    terminate([workers])
    deployment.stack.procs.remove(workers)
    with deployment.api(user_key) as api:
        for priority, n in (("high", 17), ("low", 23)):
            created = api.post(
                "/v1/batches",
                json={"queries": tagged_queries(n, prefix=f"ops{priority}"), "priority": priority},
            )
            assert created.status_code == 202, created.text
    # Waiting = on the queue's list or in its fair lanes (shared/queue/fair.py).
    depths = {
        p: deployment.redis.llen(f"{ns}:{p}") + deployment.redis.llen(fair_depth(ns, p))
        for p in ("high", "normal", "low")
    }
    assert depths["high"] >= 17 and depths["low"] >= 23
    b: Browse = browse()
    b.sign_in(key)
    b.page.goto(f"{deployment.url}/dashboard/operations")
    for pool, depth in depths.items():
        b.page.wait_for_function(
            f"(document.querySelector(\"tr[data-queue='{pool}'] td.depth\") || {{}}).textContent"
            f" === '{depth}'",
            timeout=10_000,
        )
    b.shot("operations-queued")

    # The provider fails every call; once its circuit is open in Redis, the page says so within 5 s.
    set_sim(sim, error_rate=1.0, error_kinds=["server"])
    proc = deployment.stack.start_workers(processes=1, threads=32)
    breaker = f"{ns}:breaker:sim"
    poll(
        lambda: deployment.redis.hget(breaker, "state") == b"open",
        timeout=60,
        interval=0.05,
        what="the circuit to open",
    )
    opened = time.monotonic()
    b.page.wait_for_function(
        "(document.querySelector(\"tr[data-provider='sim'] td.circuit\") || {}).textContent === 'open'",
        timeout=5_000,
    )
    shown_after = time.monotonic() - opened
    assert shown_after <= 5.0
    b.page.wait_for_function("document.querySelector('#throughput-chart canvas') !== null")
    b.shot("operations-circuit-open")
    assert int(b.page.text_content("#workers-alive") or 0) >= 1
    set_sim(sim, error_rate=0)
    terminate([proc])
    deployment.stack.procs.remove(proc)
    b.assert_same_origin()
