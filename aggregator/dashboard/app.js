// edgeloop dashboard: polls the aggregator's JSON API (same origin) and draws with uPlot.
// No framework and no build step. Every value from the API reaches the page as text
// (textContent), never as HTML. `window.edgeloop` exposes the charts for tests and debugging.
"use strict";

const POLL_MS = 3000;
const MAX_CHANNEL_CHARTS = 8;
const state = { page: null, device: null, charts: {}, timer: null, fields: null };
window.edgeloop = state;

// -- small helpers -------------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}

async function api(path, options) {
  const resp = await fetch(path, options);
  let body = null;
  try { body = await resp.json(); } catch (e) { /* not JSON */ }
  if (!resp.ok) {
    const err = new Error((body && body.error) || `${resp.status} ${resp.statusText}`);
    err.status = resp.status;
    throw err;
  }
  return body;
}

function age(now, then) {
  if (!then) return "never";
  const s = Math.max(0, now - then);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

const fmtTime = (t) => new Date(t * 1000).toLocaleString();
const setStatus = (text, bad) => { const s = document.getElementById("status"); s.textContent = text; s.className = bad ? "error" : "muted"; };

function table(rows, columns, id) {
  // columns: [[title, (row) => cell text or Node, className?], ...]
  const head = el("tr", {}, ...columns.map(([t]) => el("th", {}, t)));
  const body = rows.map((r) => el("tr", {}, ...columns.map(([, f, cls]) => el("td", { class: cls || "" }, f(r)))));
  return el("table", { class: "grid", id }, el("thead", {}, head), el("tbody", {}, ...body));
}

// A table of whatever objects an endpoint returns (the model routes grow fields over time).
function genericTable(items) {
  const keys = [...new Set(items.flatMap((o) => Object.keys(o)))].slice(0, 12);
  return table(items, keys.map((k) => [k, (o) => cellOf(k, o[k])]));
}

function cellOf(key, v) {
  if (v === null || v === undefined) return "-";
  if (typeof v === "number" && /(^|_)(at|time|since|started|created|updated)$/.test(key) && v > 1e9) return fmtTime(v);
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

// -- routing ---------------------------------------------------------------------------------------

function route() {
  const hash = location.hash || "#/";
  const m = hash.match(/^#\/device\/(.+)$/);
  const page = m ? "device" : ({ "#/alerts": "alerts", "#/models": "models" }[hash] || "fleet");
  state.page = page;
  if (m) { const d = decodeURIComponent(m[1]); if (d !== state.device) { state.device = d; state.fields = null; destroyCharts(); } }
  for (const s of document.querySelectorAll("section.page")) s.hidden = s.id !== `page-${page}`;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === page);
  refresh();
}

async function refresh() {
  clearTimeout(state.timer);
  try {
    if (state.page === "fleet") await showFleet();
    else if (state.page === "device") await showDevice();
    else if (state.page === "alerts") await showAlerts();
    else if (state.page === "models") await showModels();
    setStatus(`updated ${new Date().toLocaleTimeString()}`);
  } catch (e) {
    setStatus(`cannot reach the aggregator: ${e.message}`, true);
  }
  state.timer = setTimeout(refresh, POLL_MS);
}

// -- fleet -----------------------------------------------------------------------------------------

async function showFleet() {
  const [fleet, alerts] = await Promise.all([api("/api/fleet"), api("/api/alerts?limit=10")]);
  const counts = (fleet.anomalies && fleet.anomalies.counts) || null;
  const hours = fleet.anomalies ? fleet.anomalies.window_s / 3600 : 1;
  const tbody = document.querySelector("#fleet-table tbody");
  tbody.replaceChildren(...fleet.devices.map((d) => {
    const num = (v, bad) => el("td", { class: bad && v > 0 ? "num bad" : "num" }, v === undefined || v === null ? "-" : v);
    const anomalies = counts === null ? "?" : ((counts[d.device] || 0) / hours).toFixed(1);
    return el("tr", { "data-device": d.device },
      el("td", {}, el("a", { href: `#/device/${encodeURIComponent(d.device)}` }, d.device)),
      el("td", {}, el("span", { class: `badge ${d.state}` }, d.state)),
      el("td", {}, d.profile || "-"),
      el("td", { class: "model" }, d.model_version || "-"),
      el("td", {}, age(fleet.now, d.last_seen)),
      el("td", { class: "num" }, anomalies),
      num(d.seq_dropped, true), num(d.seq_lost, true), num(d.seq_pending, false),
      num(d.outbox_depth), num(d.messages),
      el("td", { class: d.skew_flagged ? "num bad" : "num" }, (d.skew_s || 0).toFixed(1)));
  }));
  document.getElementById("fleet-count").textContent = `${fleet.devices.length} device(s)`;
  document.getElementById("fleet-empty").hidden = fleet.devices.length > 0;
  document.getElementById("fleet-alerts").replaceChildren(alertTable(alerts.alerts));
}

// -- alerts ----------------------------------------------------------------------------------------

function alertTable(alerts) {
  if (!alerts.length) return el("p", { class: "muted" }, "No alerts.");
  return table(alerts, [
    ["time", (a) => fmtTime(a.time)],
    ["device", (a) => el("a", { href: `#/device/${encodeURIComponent(a.device)}` }, a.device)],
    ["severity", (a) => el("span", { class: `badge ${a.severity}` }, a.severity)],
    ["rule", (a) => a.rule], ["value", (a) => a.value.toFixed(3), "num"], ["message", (a) => a.message || ""],
    ["state", (a) => a.silenced_by ? `silenced (#${a.silenced_by})` : a.acked_at ? `acked ${fmtTime(a.acked_at)}`
      : el("button", { onclick: () => control(`/api/alerts/${encodeURIComponent(a.id)}/ack`, "POST") }, "ack")],
    ["", (a) => el("button", { title: "silence this rule on this device for 1 h",
      onclick: () => control("/api/silences", "POST", { device: a.device, rule: a.rule, until: "1h" }) }, "silence 1h")],
  ], "alerts-table");
}

async function control(path, method, body) {
  const token = localStorage.getItem("edgeloop-token") || "";
  const headers = { Authorization: `Bearer ${token}` };
  if (body) headers["Content-Type"] = "application/json";
  try {
    await api(path, { method, headers, body: body ? JSON.stringify(body) : undefined });
    refresh();
  } catch (e) {
    setStatus(`${method} ${path}: ${e.message}${e.status === 401 || e.status === 403 ? " (set the API token on the Alerts page)" : ""}`, true);
  }
}

async function showAlerts() {
  const data = await api("/api/alerts?limit=200");
  document.getElementById("alerts-list").replaceChildren(alertTable(data.alerts));
  const silences = data.silences.length ? table(data.silences, [
    ["id", (s) => s.id], ["device", (s) => s.device || "any"], ["rule", (s) => s.rule || "any"],
    ["until", (s) => fmtTime(s.until)],
    ["", (s) => el("button", { onclick: () => control(`/api/silences/${s.id}`, "DELETE") }, "end")],
  ]) : el("p", { class: "muted" }, "None.");
  document.getElementById("silences-list").replaceChildren(silences);
}

// -- device ----------------------------------------------------------------------------------------

function destroyCharts() {
  state.gen = (state.gen || 0) + 1;  // answers to requests made before this are dropped
  for (const c of Object.values(state.charts)) c.destroy();
  state.charts = {};
  document.getElementById("charts").replaceChildren();
}

// Vertical lines at model changes (violet) and alerts (red), drawn over each chart.
function markersPlugin() {
  return { hooks: { draw: [(u) => {
    const marks = state.marks || { models: [], alerts: [] };
    const { ctx } = u;
    const { top, height } = u.bbox;
    const line = (t, colour) => {
      const x = Math.round(u.valToPos(t, "x", true));
      if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) return;
      ctx.strokeStyle = colour; ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + height); ctx.stroke();
    };
    ctx.save(); ctx.lineWidth = 2 * devicePixelRatio;
    for (const t of marks.models) line(t, "#7c3aed");
    for (const t of marks.alerts) line(t, "#dc2626");
    ctx.restore();
  }] } };
}

function chart(key, title, points, since, until) {
  const xs = points.map((p) => p[0]);
  const ys = points.map((p) => p[1]);
  let c = state.charts[key];
  if (!c) {
    const box = el("div", { class: "chart", "data-key": key }, el("h4", {}, title));
    document.getElementById("charts").append(box);
    const width = Math.max(320, document.getElementById("charts").clientWidth - 10);
    c = new uPlot({ width, height: 180, plugins: [markersPlugin()],
      scales: { x: { time: true, range: () => [state.range[0], state.range[1]] } },
      series: [{}, { label: title, stroke: "#2563eb", width: 1.5, points: { show: xs.length < 60 } }] },
      [xs, ys], box);
    state.charts[key] = c;
  } else {
    c.setData([xs, ys]);
  }
  c.root.dataset.points = String(xs.length);
}

async function showDevice() {
  const device = state.device;
  const gen = state.gen;
  const q = `device=${encodeURIComponent(device)}`;
  const range = document.getElementById("range").value;
  const [rec, timeline] = await Promise.all([api(`/api/devices/${encodeURIComponent(device)}`),
    api(`/api/timeline?${q}&since=${range}`)]);
  if (!state.fields) {
    state.fields = await api(`/api/fields?${q}`);
    const sel = document.getElementById("feature");
    sel.replaceChildren(...state.fields.features.map((f) => el("option", { value: f }, f)));
  }
  const d = rec.device;
  document.getElementById("device-name").textContent = device;
  const badge = document.getElementById("device-state");
  badge.textContent = d.state; badge.className = `badge ${d.state}`;
  document.getElementById("device-info").textContent =
    `profile ${d.profile || "-"} · model ${d.model_version || "-"} · agent ${d.agent_version || "-"} · last seen ` +
    `${age(rec.now, d.last_seen)} · dropped ${d.seq_dropped ?? "-"} · lost ${d.seq_lost ?? "-"} · outbox ${d.outbox_depth}`;
  state.marks = { models: timeline.model_changes.map((m) => m.time), alerts: timeline.alerts.map((a) => a.time) };
  const wanted = [
    ...state.fields.telemetry.slice(0, MAX_CHANNEL_CHARTS).map((f) => ["telemetry", f, f]),
    ["inference", "score", "anomaly score"],
  ];
  const feature = document.getElementById("feature").value;
  if (feature) wanted.push(["features", feature, "feature"]);
  const series = await Promise.all(wanted.map(([m, f]) =>
    api(`/api/series?${q}&measurement=${m}&field=${encodeURIComponent(f)}&since=${range}`)));
  if (gen !== state.gen) return;  // the range, feature or device changed while we waited
  state.range = [series[0].since, series[0].until];
  series.forEach((s, i) => {
    const [m, f, key] = wanted[i];
    chart(key === "feature" ? "feature" : `${m}:${f}`, key === "feature" ? `feature ${f}` : (m === "telemetry" ? f : key),
      s.points, s.since, s.until);
  });
  document.getElementById("device-alerts").replaceChildren(alertTable(timeline.alerts));
}

// -- models (routes of aggregator/http_models.py; absent until that lands) ---------------------------

// 404: the routes are not there; 503: this aggregator runs without a model registry.
async function optional(path) {
  try { return await api(path); } catch (e) {
    if (e.status === 404) return null;
    if (e.status === 503) return { unavailable: e.message };
    throw e;
  }
}

function listOf(body, ...keys) {
  if (!body) return [];
  if (Array.isArray(body)) return body;
  for (const k of keys) if (Array.isArray(body[k])) return body[k];
  return [];
}

async function showModels() {
  const [models, deployments, rollouts] = await Promise.all(
    [optional("/api/models"), optional("/api/deployments"), optional("/api/rollouts")]);
  const show = (id, body, keys, empty) => {
    const items = listOf(body, ...keys);
    const why = body && body.unavailable ? ` (${body.unavailable})` : "";
    document.getElementById(id).replaceChildren(
      items.length ? genericTable(items) : el("p", { class: "muted" }, empty + why));
  };
  show("models-list", models, ["models", "versions"], "No models yet.");
  show("deployments-list", deployments, ["deployments", "devices"], "No deployments yet.");
  show("rollouts-list", rollouts, ["rollouts"], "No rollouts yet.");
}

// -- start -----------------------------------------------------------------------------------------

document.getElementById("range").addEventListener("change", () => { destroyCharts(); refresh(); });
document.getElementById("feature").addEventListener("change", () => {
  if (state.charts.feature) { state.charts.feature.destroy(); delete state.charts.feature;
    const box = document.querySelector('.chart[data-key="feature"]'); if (box) box.remove(); }
  refresh();
});
const tokenInput = document.getElementById("token");
tokenInput.value = localStorage.getItem("edgeloop-token") || "";
tokenInput.addEventListener("change", () => localStorage.setItem("edgeloop-token", tokenInput.value));
window.addEventListener("hashchange", route);
route();
