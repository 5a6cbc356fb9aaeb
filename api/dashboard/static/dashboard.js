// Conclave dashboard: keeps every figure of the page live from the same-origin JSON views and
// the batch event stream. The session is an HttpOnly cookie: nothing here stores or sees a key.
"use strict";

const STAGES = ["answer", "review", "synthesis"];

function el(id) { return document.getElementById(id); }
function setText(id, value) { const node = el(id); if (node && node.textContent !== String(value)) node.textContent = value; }
function money(v) { return "$" + Number(v || 0).toFixed(4); }
function ms(v) { return v === null || v === undefined ? "–" : v + " ms"; }
function pct(v) { return (100 * Number(v || 0)).toFixed(1) + "%"; }
function eta(s) {
  if (s === null || s === undefined) return "–";
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}
function when(ts) { return ts ? new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19) : "–"; }
function done(counts) {
  return counts.completed + counts.failed + counts.cancelled + counts.expired;
}
function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}
function row(cells) {
  const tr = document.createElement("tr");
  cells.forEach((c) => tr.appendChild(c));
  return tr;
}
function fill(tbodyId, rows, emptyText, span) {
  const body = el(tbodyId);
  body.replaceChildren(...(rows.length ? rows : [row([Object.assign(cell(emptyText, "muted"), { colSpan: span })])]));
}
function bar(doneN, total) {
  const wrap = document.createElement("div");
  wrap.className = "bar small";
  const f = document.createElement("div");
  f.className = "fill";
  f.style.width = (total ? (100 * doneN) / total : 0).toFixed(1) + "%";
  wrap.appendChild(f);
  const td = document.createElement("td");
  td.className = "stagecol";
  td.title = doneN + " / " + total;
  td.appendChild(wrap);
  return td;
}
async function getJSON(url) {
  const r = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (r.status === 401) { window.location.assign("/dashboard/signin"); throw new Error("signed out"); }
  if (!r.ok) throw new Error(url + " → " + r.status);
  return r.json();
}
function every(ms, fn) {
  const tick = async () => {
    try { await fn(); setText("live", "live"); } catch (e) { setText("live", "reconnecting"); }
    setTimeout(tick, ms);
  };
  tick();
}

// ---------------------------------------------------------------- batches
function batchesPage() {
  // Every 2 s: the list's counts are one grouped read over all its batches' queries.
  every(2000, async () => {
    const page = await getJSON("/dashboard/data/batches");
    fill("batch-rows", page.data.map((b) => {
      const link = document.createElement("a");
      link.href = "/dashboard/batches/" + encodeURIComponent(b.id);
      link.textContent = b.id;
      const first = document.createElement("td");
      first.appendChild(link);
      const st = b.progress.stages;
      const tr = row([
        first, cell(b.status, "status-" + b.status), cell(when(b.created_at)),
        bar(st.answer.done, st.answer.total), bar(st.review.done, st.review.total), bar(st.synthesis.done, st.synthesis.total),
        cell(done(b.request_counts) + " / " + b.request_counts.total, "num"), cell(b.request_counts.failed, "num"),
        cell(eta(b.eta_seconds), "num"), cell(money(b.cost_usd), "num"),
      ]);
      tr.dataset.batchId = b.id;
      return tr;
    }), "No batches yet.", 10);
  });
}

// ---------------------------------------------------------------- one batch
function renderProgress(p) {
  const c = p.request_counts;
  setText("status", p.status);
  el("status").className = "badge status-" + p.status;
  setText("done", done(c));
  setText("total", c.total);
  ["completed", "failed", "queued", "running", "cancelled", "expired"].forEach((k) => setText("count-" + k, c[k]));
  setText("eta", eta(p.eta_seconds));
  setText("cost", money(p.cost_usd));
  if (p.stages) {
    STAGES.forEach((s) => {
      const st = p.stages[s];
      setText("stage-" + s + "-done", st.done);
      setText("stage-" + s + "-total", st.total);
      el("stage-" + s + "-bar").style.width = (st.total ? (100 * st.done) / st.total : 0).toFixed(1) + "%";
    });
  }
  const cancel = el("cancel");
  if (cancel) cancel.disabled = !(p.status === "in_progress" || p.status === "validating");
}
function renderDetail(b) {
  setText("tokens", b.usage.total_tokens);
  fill("failures", Object.entries(b.failures_by_type).map(([k, n]) => row([cell(k), cell(n, "num")])), "None", 2);
  fill("members", b.members.map((m) => row([
    cell(m.model), cell(m.calls, "num"), cell(m.cached, "num"), cell(m.failed, "num"), cell(ms(m.latency_p50_ms), "num"),
    cell(ms(m.latency_p95_ms), "num"), cell(money(m.cost_usd), "num"),
  ])), "No calls yet", 7);
}
function batchPage() {
  const id = document.body.dataset.batchId;
  const base = "/dashboard/batches/" + encodeURIComponent(id);
  let ended = false;
  const detail = async () => {
    const b = await getJSON("/dashboard/data/batches/" + encodeURIComponent(id));
    renderDetail(b);
    if (!ended) renderProgress(b.progress);
  };
  const poll = async () => {
    try { await detail(); } catch (e) { /* the stream says how the connection is */ }
    if (!ended) setTimeout(poll, 2000);
  };
  poll();
  const es = new EventSource(base + "/events");
  es.addEventListener("open", () => setText("stream-state", "live"));
  es.addEventListener("error", () => { if (!ended) setText("stream-state", "reconnecting"); });
  es.addEventListener("progress", (e) => renderProgress(JSON.parse(e.data)));
  es.addEventListener("end", (e) => {
    ended = true;
    es.close();
    const b = JSON.parse(e.data);
    const c = b.request_counts;
    renderProgress({ status: b.status, request_counts: c, eta_seconds: b.eta_seconds, cost_usd: b.cost_usd });
    setText("stream-state", "ended");
    detail().catch(() => {});
  });
  const cancel = el("cancel");
  if (cancel) {
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      const r = await fetch(base + "/cancel", { method: "POST", credentials: "same-origin" });
      if (!r.ok) {
        const body = await r.json().catch(() => ({}));
        setText("action-error", (body.error && body.error.message) || "cancel failed (" + r.status + ")");
        return;
      }
      renderProgress(Object.assign({}, await r.json(), { stages: null }));
    });
  }
}

// ---------------------------------------------------------------- models
function modelsPage() {
  every(5000, async () => {
    const page = await getJSON("/dashboard/data/models");
    fill("model-rows", page.data.map((m) => row([
      cell(m.model), cell(m.calls, "num"), cell(m.cached, "num"), cell(m.failed, "num"), cell(pct(m.error_rate), "num"),
      cell(Object.entries(m.errors).map(([k, n]) => k + " " + n).join(", ") || "–"),
      cell(ms(m.latency_p50_ms), "num"), cell(ms(m.latency_p95_ms), "num"), cell(m.tokens, "num"), cell(money(m.cost_usd), "num"),
    ])), "No calls in the last 24 hours.", 10);
  });
}

// ---------------------------------------------------------------- operations
function operationsPage() {
  let chart = null;
  every(1000, async () => {
    const o = await getJSON("/dashboard/data/operations");
    setText("workers-alive", o.workers_alive);
    setText("in-flight", o.queries_in_flight);
    setText("throughput-1m", o.finished_per_minute[o.finished_per_minute.length - 1]);
    setText("cost-today", money(o.cost_today_usd));
    fill("queue-rows", o.queues.map((q) => {
      const tr = row([cell(q.queue), cell(q.depth, "num depth"), cell(q.delayed, "num"), cell(q.dead_lettered, "num"), cell(q.in_flight, "num")]);
      tr.dataset.queue = q.queue;
      return tr;
    }), "No queues", 5);
    fill("provider-rows", o.providers.map((p) => {
      const circuit = cell(p.circuit, "circuit circuit-" + p.circuit);
      const tr = row([cell(p.provider), circuit, cell(pct(p.window_error_rate), "num"), cell(ms(p.latency_p50_ms), "num"),
        cell(ms(p.latency_p95_ms), "num"), cell(p.rpm_headroom === null ? "unlimited" : p.rpm_headroom, "num"), cell(p.window_calls, "num")]);
      tr.dataset.provider = p.provider;
      return tr;
    }), "No providers", 7);
    const minute = Math.floor(o.now / 60) * 60;
    const xs = o.finished_per_minute.map((_, i) => minute - 60 * (o.finished_per_minute.length - i));
    const data = [xs, o.finished_per_minute];
    const box = el("throughput-chart");
    if (!chart && window.uPlot) {
      chart = new uPlot({
        width: Math.max(280, box.clientWidth - 8), height: 180,
        series: [{}, { label: "finished / min", stroke: "#2f6fdf", fill: "rgba(47,111,223,0.12)", width: 2 }],
        axes: [{}, { size: 50 }], legend: { show: false },
      }, data, box);
    } else if (chart) {
      chart.setData(data);
    }
  });
}

const pages = { batches: batchesPage, batch: batchPage, models: modelsPage, operations: operationsPage };
document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.batchId ? "batch" : document.body.dataset.page;
  if (pages[page]) pages[page]();
});
