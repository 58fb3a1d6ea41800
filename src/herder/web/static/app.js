// herder dashboard: a thin face over the coordinator's REST API and /v1/live.
//
// No framework and no build step: ES modules served as they are (dom.js holds
// the helpers, gantt.js the timeline chart). Every data call carries the bearer
// token the user signed in with; the token lives in sessionStorage, so it
// leaves with the tab. Data is always put in the page as text (see el() in
// dom.js), never as HTML: task names, logs and tracebacks come from users' code.

import {
  $, el, fmtBytes, fmtDuration, fmtTime, plotlyReady, stateBadge, table, throttle,
} from "./dom.js";
import { drawGantt } from "./gantt.js";

const TOKEN_KEY = "herder.token";
const PAGE_SIZE = 50; // rows per page of the task table (#/tasks?limit=N changes it)
const TELEMETRY_WINDOW_S = 600;
const FINAL = ["succeeded", "failed", "cancelled"];

const app = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  ws: null,
  wsBackoffMs: 500,
  status: {}, // the last full /v1/status; snapshots update part of it
  executors: [],
  jobs: [],
  series: new Map(), // node id -> {at: [], cpu: [], mem: []}: CPU and memory over time
  seeded: new Set(), // nodes whose telemetry history was fetched once
  tasks: { key: "", cursors: [null], index: 0 }, // keyset paging: the `after` of each page seen
  logs: null, // the log poller of the open task page
  pollTimer: null,
};

// ---------------------------------------------------------------------------
// The API

class Refused extends Error {}

async function api(path, params = {}, init = {}) {
  const query = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") query.set(k, v);
  }
  const url = query.toString() ? `${path}?${query}` : path;
  const headers = { Authorization: `Bearer ${app.token}`, ...(init.headers || {}) };
  const response = await fetch(url, { ...init, headers });
  if (response.status === 401) throw new Refused("the coordinator refused the token");
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch { /* not JSON */ }
    throw new Error(`${response.status} ${detail}`);
  }
  return response.json();
}

const post = (path, body) => api(path, {}, {
  method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" },
});

/** A failed call: a refused token signs out, anything else is shown where it happened. */
function failed(where, error) {
  if (error instanceof Refused) { signOut("refused"); return; }
  console.error(error);
  if (where) where.replaceChildren(el("p", { class: "error" }, String(error.message || error)));
}

// ---------------------------------------------------------------------------
// Sign-in

function showSignin(message) {
  $("#app").hidden = true;
  $("#signin").hidden = false;
  $("#signin-error").textContent = message || "";
  $("#token").focus();
}

async function signIn(token) {
  app.token = token;
  try {
    await api("/v1/status");
  } catch (error) {
    app.token = "";
    sessionStorage.removeItem(TOKEN_KEY);
    showSignin(error instanceof Refused ? "refused: that token is not valid here" : String(error));
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("#signin").hidden = true;
  $("#app").hidden = false;
  startLive();
  route();
}

function signOut(message) {
  app.token = "";
  sessionStorage.removeItem(TOKEN_KEY);
  stopLive();
  stopLogs();
  showSignin(message === "refused" ? "refused: that token is not valid here" : message);
}

// ---------------------------------------------------------------------------
// Live updates: the /v1/live WebSocket, with a slow poll while it is down

function startLive() {
  stopLive();
  connectLive();
  // A safety net: while the socket is down, poll what a snapshot would bring.
  app.pollTimer = setInterval(() => {
    if (!app.ws || app.ws.readyState !== WebSocket.OPEN) pollSnapshot();
  }, 3000);
  pollSnapshot();
}

function stopLive() {
  if (app.pollTimer) clearInterval(app.pollTimer);
  app.pollTimer = null;
  if (app.ws) { app.ws.onclose = null; app.ws.close(); }
  app.ws = null;
  setLiveDot(false);
}

function connectLive() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/v1/live`);
  app.ws = ws;
  // The token goes in the first message, not the URL: URLs end up in logs.
  ws.onopen = () => { ws.send(JSON.stringify({ token: app.token })); };
  ws.onmessage = (message) => {
    app.wsBackoffMs = 500;
    setLiveDot(true);
    const data = JSON.parse(message.data);
    if (data.type === "snapshot") onSnapshot(data.status, data.executors, data.at, true);
    else if (data.type === "event") onEvent(data.event);
  };
  ws.onclose = (event) => {
    setLiveDot(false);
    if (app.ws !== ws) return;
    app.ws = null;
    if (event.code === 4401) { signOut("refused"); return; }
    // Reconnect with a growing wait (up to 15 s): the coordinator may be restarting.
    setTimeout(() => { if (app.token && !app.ws) connectLive(); }, app.wsBackoffMs);
    app.wsBackoffMs = Math.min(app.wsBackoffMs * 2, 15000);
  };
}

function setLiveDot(on) {
  $("#live-dot").classList.toggle("on", on);
  $("#live-dot").title = on ? "live updates" : "live updates: reconnecting";
}

async function pollSnapshot() {
  try {
    const [status, executors] = await Promise.all([api("/v1/status"), api("/v1/executors")]);
    onSnapshot(status, executors, Date.now() / 1000, false);
  } catch (error) {
    failed(null, error);
  }
}

/**
 * A live snapshot carries only what changes each second (states, slots used,
 * the last reading); the rest of a node (provider, address, what it runs) is
 * kept from the last /v1/executors and refreshed now and then.
 */
function onSnapshot(status, executors, at, partial) {
  if (status) {
    app.status = partial ? { ...app.status, ...status } : status;
    renderStatus(app.status);
  }
  if (!executors) return;
  const known = new Map(app.executors.map((n) => [n.id, n]));
  app.executors = partial ? executors.map((n) => ({ ...(known.get(n.id) || {}), telemetry_at: undefined, ...n })) : executors;
  recordTelemetry(app.executors, at);
  if (currentView() === "overview") {
    renderNodes();
    renderCharts();
    throttle("jobs", 2000, loadJobs); // progress moves even when events are missed
    if (partial) throttle("executors", 3000, pollSnapshot);
  }
}

function onEvent(event) {
  const view = currentView();
  if (!event.action || !event.action.startsWith("task_")) {
    if (view === "overview") throttle("nodes", 1000, pollSnapshot);
    return;
  }
  if (view === "overview") throttle("jobs", 1000, loadJobs);
  if (view === "tasks") throttle("tasks", 2000, () => loadTasks(false));
  if (view === "timeline") throttle("timeline", 2000, loadTimeline);
  if (view === "task" && event.task_id === routeArg()) throttle("task", 500, loadTask);
}

function renderStatus(status) {
  const counts = Object.entries(status.counts || {})
    .filter(([, n]) => n > 0).map(([s, n]) => `${s} ${n}`).join(" · ");
  let byState = status.nodes;
  if (!byState) { // a snapshot has no node counts: count the nodes it lists
    byState = {};
    for (const n of app.executors) byState[n.state] = (byState[n.state] || 0) + 1;
  }
  const nodes = Object.entries(byState).map(([s, n]) => `${s} ${n}`).join(" · ");
  const rate = (status.throughput || 0).toFixed(1);
  $("#status-line").textContent =
    `tasks: ${counts || "none"} | nodes: ${nodes || "none"} | ${rate} tasks/s` +
    (status.uptime_s !== undefined ? ` | up ${fmtDuration(status.uptime_s)}` : "");
}

// ---------------------------------------------------------------------------
// Routing: #/overview, #/tasks?job=J, #/task/ID, #/timeline?job=J

function parseHash() {
  const [path, query] = location.hash.replace(/^#\/?/, "").split("?");
  const [view, ...rest] = path.split("/");
  return { view: view || "overview", arg: rest.map(decodeURIComponent).join("/"),
           params: new URLSearchParams(query || "") };
}

const currentView = () => parseHash().view;
const routeArg = () => parseHash().arg;

function route() {
  if (!app.token) return;
  const { view } = parseHash();
  for (const section of document.querySelectorAll(".view")) section.hidden = true;
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.view === view
      || (view === "task" && link.dataset.view === "tasks"));
  }
  if (view !== "task") stopLogs();
  const show = (id) => { $(`#view-${id}`).hidden = false; };
  if (view === "tasks") { show("tasks"); loadTasks(true); }
  else if (view === "task") { show("task"); loadTask(); }
  else if (view === "timeline") { show("timeline"); showTimeline(); }
  else { show("overview"); showOverview(); }
}

// ---------------------------------------------------------------------------
// Overview: nodes, CPU and memory charts, jobs

function showOverview() {
  renderNodes();
  renderCharts();
  loadJobs();
  pollSnapshot();
}

/** A node's name, with its id when names repeat (local agents are all named after the host). */
function nodeName(id) {
  const node = app.executors.find((n) => n.id === id);
  if (!node) return id || "";
  const name = node.name || node.id;
  const twins = app.executors.filter((n) => (n.name || n.id) === name).length;
  return twins > 1 && name !== node.id ? `${name} (${node.id})` : name;
}

function meter(percent) {
  if (percent === null || percent === undefined) return el("span", { class: "muted" }, "–");
  const width = Math.max(0, Math.min(100, percent));
  return el("span", {}, el("span", { class: "meter" }, el("span", { style: `width:${width}%` })),
    `${percent.toFixed(0)}%`);
}

function renderNodes() {
  const body = $("#nodes-table tbody");
  const alive = app.executors.filter((n) => !["terminated", "lost"].includes(n.state));
  $("#node-count").textContent = `(${alive.length} alive, ${app.executors.length} known)`;
  body.replaceChildren(...app.executors.map(nodeRow));
}

function nodeRow(node) {
  const t = node.telemetry || {};
  const labels = Object.entries(node.labels || {})
    .map(([k, v]) => el("span", { class: "label" }, `${k}=${v}`));
  const running = (node.running || []).map((r) =>
    el("div", {}, el("a", { href: `#/task/${encodeURIComponent(r.task_id)}` }, r.name || r.task_id)));
  const memory = t.memory_used !== undefined ? ` (${fmtBytes(t.memory_used)})` : "";
  const alive = !["terminated", "lost", "draining"].includes(node.state);
  return el("tr", { dataset: { node: node.id }, class: "node-row" },
    el("td", { title: node.id }, node.name || node.id,
      el("div", { class: "muted" }, [node.id !== node.name ? node.id : null, node.address]
        .filter(Boolean).join(" · "))),
    el("td", {}, stateBadge(node.state),
      node.paused || node.available === false ? el("div", { class: "muted" }, "paused") : null),
    el("td", {}, node.provider || ""),
    el("td", {}, labels),
    el("td", {}, `${node.used ?? 0} / ${node.slots ?? 0}`),
    el("td", {}, meter(t.cpu_percent), t.load1 !== undefined ? el("div", { class: "muted" },
      `load ${Number(t.load1).toFixed(2)}`) : null),
    el("td", {}, meter(t.memory_percent), el("span", { class: "muted" }, memory)),
    el("td", {}, running),
    el("td", {}, alive ? [
      el("button", { type: "button", onclick: () => nodeAction(node, "drain") }, "Drain"),
      " ",
      el("button", { type: "button", class: "danger", onclick: () => nodeAction(node, "terminate") },
        "Terminate"),
    ] : null));
}

async function nodeAction(node, action) {
  if (!confirm(`${action} ${node.name || node.id}?`)) return;
  try { await post(`/v1/nodes/${encodeURIComponent(node.id)}/${action}`, {}); pollSnapshot(); }
  catch (error) { failed(null, error); alert(String(error.message || error)); }
}

/** Append each node's newest telemetry to its series; fetch its history the first time. */
function recordTelemetry(executors, snapshotAt) {
  const now = snapshotAt ?? Date.now() / 1000;
  for (const node of executors) {
    if (!app.seeded.has(node.id) && !["terminated", "lost"].includes(node.state)) {
      app.seeded.add(node.id);
      seedTelemetry(node.id);
    }
    const t = node.telemetry;
    if (!t) continue;
    const series = seriesOf(node.id);
    const at = t.at ?? node.telemetry_at ?? now;
    if (series.at.length && at <= series.at[series.at.length - 1]) continue; // nothing new
    pushPoint(series, at, t.cpu_percent, t.memory_percent);
  }
}

function seriesOf(nodeId) {
  if (!app.series.has(nodeId)) app.series.set(nodeId, { at: [], cpu: [], mem: [] });
  return app.series.get(nodeId);
}

function pushPoint(series, at, cpu, mem) {
  series.at.push(at);
  series.cpu.push(cpu ?? null);
  series.mem.push(mem ?? null);
  // Keep the window bounded: a tab left open for a day must not grow without end.
  const oldest = at - TELEMETRY_WINDOW_S;
  while (series.at.length && series.at[0] < oldest) {
    series.at.shift(); series.cpu.shift(); series.mem.shift();
  }
}

async function seedTelemetry(nodeId) {
  try {
    const history = await api("/v1/telemetry", { node: nodeId, window_s: TELEMETRY_WINDOW_S });
    const series = { at: [], cpu: [], mem: [] };
    for (const p of history.points || []) pushPoint(series, p.at, p.cpu_percent, p.memory_percent);
    // Points that came live while the history was on its way stay after it.
    const live = seriesOf(nodeId);
    live.at.forEach((at, i) => {
      if (!series.at.length || at > series.at[series.at.length - 1]) {
        pushPoint(series, at, live.cpu[i], live.mem[i]);
      }
    });
    app.series.set(nodeId, series);
    if (currentView() === "overview") renderCharts();
  } catch (error) {
    if (error instanceof Refused) failed(null, error);
    else app.seeded.delete(nodeId); // retried with the next snapshot
  }
}

function renderCharts() {
  if (!window.Plotly) {
    plotlyReady().then(renderCharts, () => {});  // the charts stay empty; the rest works
    return;
  }
  const alive = app.executors.filter((n) => !["terminated", "lost"].includes(n.state));
  const trace = (node, key) => {
    const s = seriesOf(node.id);
    return { type: "scatter", mode: "lines", name: nodeName(node.id),
             x: s.at.map((at) => new Date(at * 1000)), y: s[key], line: { width: 1.5 } };
  };
  const layout = (title) => ({
    title: { text: title, font: { size: 13 } }, margin: { l: 40, r: 10, t: 30, b: 30 },
    yaxis: { range: [0, 100], ticksuffix: "%" }, showlegend: alive.length <= 12,
    legend: { font: { size: 10 } }, uirevision: title, // keeps zoom across live redraws
  });
  const config = { displaylogo: false, responsive: true };
  Plotly.react("chart-cpu", alive.map((n) => trace(n, "cpu")), layout("CPU"), config);
  Plotly.react("chart-mem", alive.map((n) => trace(n, "mem")), layout("Memory"), config);
}

async function loadJobs() {
  try {
    app.jobs = await api("/v1/jobs", { limit: 100 });
  } catch (error) {
    failed(null, error);
    return;
  }
  if (currentView() === "overview") renderJobs();
}

function jobProgress(job) {
  const counts = job.counts || {};
  const total = job.total || Object.values(counts).reduce((a, b) => a + b, 0) || 0;
  const ok = counts.succeeded || 0;
  const bad = counts.failed || 0;
  const off = counts.cancelled || 0;
  return { total, ok, bad, off, done: ok + bad + off };
}

function renderJobs() {
  const body = $("#jobs-table tbody");
  if (!app.jobs.length) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 5, class: "muted" }, "no jobs yet")));
    return;
  }
  body.replaceChildren(...app.jobs.map(jobRow));
}

function jobRow(job) {
  const p = jobProgress(job);
  const pct = p.total ? Math.floor((100 * p.done) / p.total) : 0;
  const part = (cls, n) => el("span", { class: cls, style: `width:${p.total ? (100 * n) / p.total : 0}%` });
  const states = Object.entries(job.counts || {}).filter(([, n]) => n > 0)
    .map(([s, n]) => el("span", {}, stateBadge(s), ` ${n} `));
  const id = encodeURIComponent(job.id);
  return el("tr", { class: "job-row", dataset: { job: job.id, pct: String(pct) } },
    el("td", { title: job.id }, job.name || job.id,
      job.name && job.name !== job.id ? el("div", { class: "muted" }, job.id) : null),
    el("td", {}, fmtTime(job.created_at)),
    el("td", {},
      el("span", { class: "progress", role: "progressbar", "aria-valuenow": pct },
        part("ok", p.ok), part("bad", p.bad), part("off", p.off)),
      el("span", { class: "job-pct" }, `${pct}%`), el("span", { class: "muted" }, ` ${p.done} / ${p.total}`),
      job.eta_s ? el("span", { class: "muted" }, ` · about ${fmtDuration(job.eta_s)} left`) : null),
    el("td", {}, states),
    el("td", {},
      el("a", { href: `#/tasks?job=${id}` }, "tasks"), " · ",
      p.bad ? [el("a", { href: `#/tasks?job=${id}&state=failed` }, "failures"), " · "] : null,
      el("a", { href: `#/timeline?job=${id}` }, "timeline")));
}

// ---------------------------------------------------------------------------
// Tasks: filters and keyset paging

function taskFilters() {
  const params = parseHash().params;
  return {
    state: params.get("state") || "",
    job: params.get("job") || "",
    node: params.get("node") || "",
    name: params.get("name") || "",
    order: params.get("order") || "asc",
    limit: String(Math.min(Math.max(parseInt(params.get("limit"), 10) || PAGE_SIZE, 1), 1000)),
  };
}

function fillFilterForm(filters) {
  const form = $("#task-filters");
  for (const [key, value] of Object.entries(filters)) {
    if (form.elements[key]) form.elements[key].value = value;
  }
}

/** Load the current page. A change of filters (or `reset`) goes back to the first page. */
async function loadTasks(reset) {
  const filters = taskFilters();
  const key = JSON.stringify(filters);
  if (reset || key !== app.tasks.key) {
    if (key !== app.tasks.key) app.tasks = { key, cursors: [null], index: 0 };
    fillFilterForm(filters);
  }
  const { state, job, node, name, order } = filters;
  const size = Number(filters.limit);
  const params = {
    job, node, name, order,
    after: app.tasks.cursors[app.tasks.index],
    limit: size + 1, // one more than shown tells whether a next page exists, with no count
  };
  if (state.startsWith("group:")) params.states = state.slice(6);
  else params.state = state;
  const body = $("#tasks-table tbody");
  let rows;
  try {
    rows = await api("/v1/tasks", params);
  } catch (error) {
    failed(body, error);
    return;
  }
  if (JSON.stringify(taskFilters()) !== key || currentView() !== "tasks") return; // stale answer
  const hasNext = rows.length > size;
  rows = rows.slice(0, size);
  app.tasks.cursors[app.tasks.index + 1] = hasNext ? rows[rows.length - 1].id : undefined;
  body.replaceChildren(...(rows.length ? rows.map(taskRow)
    : [el("tr", {}, el("td", { colspan: 8, class: "muted" }, "no tasks match"))]));
  $("#page-prev").disabled = app.tasks.index === 0;
  $("#page-next").disabled = !hasNext;
  const first = app.tasks.index * size + 1;
  $("#page-label").textContent = rows.length
    ? `page ${app.tasks.index + 1} (rows ${first}–${first + rows.length - 1})` : "";
}

function taskRow(task) {
  const duration = task.started_at
    ? (task.finished_at ?? Date.now() / 1000) - task.started_at : null;
  const open = () => { location.hash = `#/task/${encodeURIComponent(task.id)}`; };
  return el("tr", { class: "clickable task-row", dataset: { task: task.id, state: task.state },
                    onclick: open },
    el("td", { title: task.id },
      el("a", { href: `#/task/${encodeURIComponent(task.id)}` }, task.name || task.id)),
    el("td", {}, task.job_id || ""),
    el("td", {}, stateBadge(task.state)),
    el("td", {}, `${task.attempt ?? 0} / ${task.max_attempts ?? ""}`),
    el("td", {}, nodeName(task.node_id)),
    el("td", {}, fmtTime(task.started_at)),
    el("td", {}, fmtDuration(duration)),
    el("td", {}, task.reason || task.waiting_reason || ""));
}

function setupTaskFilters() {
  $("#task-filters").addEventListener("submit", (event) => {
    event.preventDefault();
    const query = new URLSearchParams();
    for (const [key, value] of new FormData(event.target)) {
      if (value && !(key === "order" && value === "asc")) query.set(key, value.trim());
    }
    const size = parseHash().params.get("limit"); // a chosen page size stays
    if (size) query.set("limit", size);
    const target = `#/tasks${query.toString() ? `?${query}` : ""}`;
    if (location.hash === target) loadTasks(true); else location.hash = target;
  });
  $("#page-next").addEventListener("click", () => {
    if (app.tasks.cursors[app.tasks.index + 1] === undefined) return;
    app.tasks.index += 1;
    loadTasks(false);
  });
  $("#page-prev").addEventListener("click", () => {
    if (app.tasks.index === 0) return;
    app.tasks.index -= 1;
    loadTasks(false);
  });
}

// ---------------------------------------------------------------------------
// One task: facts, error, result, phases, attempts, events, logs

async function loadTask() {
  const id = routeArg();
  const box = $("#task-detail");
  let detail;
  try {
    detail = await api(`/v1/tasks/${encodeURIComponent(id)}`);
  } catch (error) {
    failed(box, error);
    return;
  }
  if (currentView() !== "task" || routeArg() !== id) return;
  box.replaceChildren(...renderTask(detail));
  if (!app.logs || app.logs.taskId !== id) startLogs(id, "stdout");
  else box.append(app.logs.section);
}

function renderTask(detail) {
  const task = detail.task;
  const duration = task.started_at ? (task.finished_at ?? Date.now() / 1000) - task.started_at : null;
  const facts = [
    ["id", task.id], ["job", task.job_id], ["kind", task.kind],
    ["attempt", `${task.attempt ?? 0} of ${task.max_attempts ?? "?"}`],
    ["node", task.node_id && !nodeName(task.node_id).includes(task.node_id)
      ? `${nodeName(task.node_id)} (${task.node_id})` : nodeName(task.node_id)],
    ["reason", task.reason], ["waiting because", task.waiting_reason],
    ["created", fmtTime(task.created_at)], ["started", fmtTime(task.started_at)],
    ["finished", fmtTime(task.finished_at)], ["duration", fmtDuration(duration)],
  ].filter(([, v]) => v !== undefined && v !== null && v !== "");
  const parts = [
    el("div", { class: "task-head" },
      el("h2", { id: "task-name" }, task.name || task.id), stateBadge(task.state),
      el("a", { href: `#/tasks?job=${encodeURIComponent(task.job_id)}` }, "job's tasks"),
      el("a", { href: `#/timeline?job=${encodeURIComponent(task.job_id)}` }, "timeline"),
      FINAL.includes(task.state) ? null
        : el("button", { type: "button", class: "danger", onclick: () => cancelTask(task.id) }, "Cancel")),
    el("dl", { class: "facts" }, facts.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])),
  ];
  if (task.error) parts.push(renderError(task.error));
  if (task.output) parts.push(...renderOutput(task.output));
  if (detail.progress || detail.live) {
    parts.push(el("h2", {}, "Live"), el("pre", {}, JSON.stringify(
      { progress: detail.progress, live: detail.live }, null, 2)));
  }
  parts.push(...renderHistory(detail));
  parts.push(el("h2", {}, "Spec"), el("pre", { id: "task-spec" }, JSON.stringify(specOf(task), null, 2)));
  return parts;
}

function renderError(error) {
  return el("section", { id: "task-error" },
    el("h2", {}, "Error"),
    el("p", { class: "error" }, `${error.type || "Error"}: ${error.message || ""}`),
    error.traceback ? el("pre", { id: "task-traceback", class: "traceback" }, error.traceback) : null);
}

function renderOutput(output) {
  const { phases, ...rest } = output;
  const parts = [el("h2", {}, "Result"), el("pre", { id: "task-result" }, JSON.stringify(rest, null, 2))];
  if (phases && phases.length) {
    parts.push(el("h2", {}, "Phases"), table(["phase", "start", "end", "took", "outcome"],
      phases.map((p) => [p.phase, fmtTime(p.start), fmtTime(p.end),
        fmtDuration(p.end && p.start ? p.end - p.start : null), p.outcome ?? ""])));
  }
  return parts;
}

function renderHistory(detail) {
  const attempts = detail.attempts || [];
  return [
    el("h2", {}, "Attempts"),
    table(["attempt", "node", "leased", "started", "ended", "took", "outcome", "reason"],
      attempts.map((a) => [
        a.attempt, nodeName(a.node_id), fmtTime(a.leased_at), fmtTime(a.started_at),
        fmtTime(a.ended_at), fmtDuration(a.ended_at && a.started_at ? a.ended_at - a.started_at : null),
        stateBadge(a.state ?? a.outcome ?? (a.ended_at ? "" : "running")), a.reason ?? ""])),
    el("h2", {}, "State history"),
    table(["at", "what", "node", "details"], history(detail).map((h) => [
      fmtTime(h.at), h.what, nodeName(h.node_id), h.details])),
  ];
}

/**
 * The task's story in time order: the stored events where there are some,
 * and what its record and attempts say (submitted, leased, started, ended),
 * so that the story is whole even when events were trimmed.
 */
function history(detail) {
  const task = detail.task;
  const rows = (detail.events || []).map((e) => ({
    at: e.at, what: e.action, node_id: e.node_id,
    details: e.data && Object.keys(e.data).length ? JSON.stringify(e.data) : "",
  }));
  const seen = new Set(rows.map((r) => r.what));
  const add = (at, what, node_id, details = "") => {
    if (at !== null && at !== undefined) rows.push({ at, what, node_id, details });
  };
  if (!seen.has("task_submitted")) add(task.created_at, "submitted", null);
  if (!rows.some((r) => r.what.startsWith("task_"))) {
    for (const a of detail.attempts || []) {
      add(a.leased_at, `attempt ${a.attempt} leased`, a.node_id);
      add(a.started_at, `attempt ${a.attempt} started`, a.node_id);
      add(a.ended_at, `attempt ${a.attempt} ${a.outcome || a.state || "ended"}`, a.node_id, a.reason || "");
    }
    if (FINAL.includes(task.state) && !(detail.attempts || []).length) add(task.finished_at, task.state, null);
  }
  return rows.sort((x, y) => x.at - y.at);
}

/** What was asked for: the task minus what the coordinator recorded about its run. */
function specOf(task) {
  const recorded = ["state", "attempt", "node_id", "reason", "started_at", "finished_at",
    "error", "output", "waiting_reason", "lease_id", "restarts"];
  return Object.fromEntries(Object.entries(task).filter(([k]) => !recorded.includes(k)));
}
async function cancelTask(id) {
  if (!confirm(`Cancel ${id}?`)) return;
  try { await post("/v1/cancel", { task_ids: [id] }); loadTask(); }
  catch (error) { failed(null, error); alert(String(error.message || error)); }
}

// Logs are read by offset, a piece at a time, until the task says it is done.
const LOG_LIMIT = 2 * 1024 * 1024; // what one tab keeps; the rest stays on the coordinator

function startLogs(taskId, stream) {
  stopLogs();
  const pre = el("pre", { id: "task-log", class: "log" });
  const tab = (name) => el("button", { type: "button", class: name === stream ? "active" : "",
    onclick: () => { startLogs(taskId, name); } }, name);
  const section = el("section", { id: "task-logs" },
    el("h2", {}, "Logs"), el("div", { class: "tabs" }, tab("stdout"), " ", tab("stderr")), pre);
  app.logs = { taskId, stream, offset: 0, size: 0, section, pre, timer: null, stopped: false };
  $("#task-detail").append(section);
  pollLogs(app.logs);
}

function stopLogs() {
  if (app.logs) { app.logs.stopped = true; clearTimeout(app.logs.timer); }
  app.logs = null;
}

async function pollLogs(logs) {
  if (logs.stopped) return;
  let piece;
  try {
    piece = await api(`/v1/tasks/${encodeURIComponent(logs.taskId)}/logs`,
      { stream: logs.stream, offset: logs.offset });
  } catch (error) {
    if (error instanceof Refused) { failed(null, error); return; }
    if (!logs.pre.textContent) logs.pre.textContent = `(no logs: ${error.message || error})`;
    return;
  }
  if (logs.stopped) return;
  if (piece.data && logs.size < LOG_LIMIT) {
    logs.pre.append(document.createTextNode(piece.data));
    logs.size += piece.data.length;
  }
  logs.offset = piece.offset ?? logs.offset;
  if (!piece.done) logs.timer = setTimeout(() => pollLogs(logs), piece.data ? 200 : 1000);
  else if (!logs.pre.textContent) logs.pre.textContent = "(empty)";
}

// ---------------------------------------------------------------------------
// Timeline: attempts per node slot, drawn as a Gantt chart (Dask's task stream)

async function showTimeline() {
  await loadJobsForTimeline();
  loadTimeline();
}

async function loadJobsForTimeline() {
  try { app.jobs = await api("/v1/jobs", { limit: 100 }); } catch (error) { failed(null, error); }
  const select = $("#timeline-job");
  const chosen = parseHash().params.get("job") || "";
  const options = [el("option", { value: "" }, "all jobs, last 10 minutes")];
  for (const job of app.jobs) options.push(el("option", { value: job.id }, `${job.name || job.id} (${job.id})`));
  if (chosen && !app.jobs.some((j) => j.id === chosen)) options.push(el("option", { value: chosen }, chosen));
  select.replaceChildren(...options);
  select.value = chosen;
}

async function loadTimeline() {
  const job = parseHash().params.get("job") || "";
  const params = job ? { job, limit: 5000 } : { since: Date.now() / 1000 - 600, limit: 5000 };
  let attempts;
  try {
    attempts = await api("/v1/timeline", params);
  } catch (error) {
    failed($("#timeline-chart"), error);
    return;
  }
  if (currentView() !== "timeline" || (parseHash().params.get("job") || "") !== job) return;
  drawGantt($("#timeline-chart"), attempts, {
    label: nodeName,
    revision: job || "all",
    onClick: (id) => { location.hash = `#/task/${encodeURIComponent(id)}`; },
  });
  $("#timeline-note").textContent = `${attempts.length} attempts` +
    (attempts.length >= 5000 ? " (the first 5000)" : "");
  // While something runs its bar grows: redraw now and then even with no events.
  if (attempts.some((a) => a.end === null)) throttle("timeline", 2000, loadTimeline);
}

function setupTimeline() {
  $("#timeline-job").addEventListener("change", (event) => {
    const job = event.target.value;
    location.hash = job ? `#/timeline?job=${encodeURIComponent(job)}` : "#/timeline";
  });
}

// ---------------------------------------------------------------------------
// Start

function main() {
  $("#signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    signIn($("#token").value.trim());
  });
  $("#signout").addEventListener("click", () => signOut(""));
  window.addEventListener("hashchange", route);
  setupTaskFilters();
  setupTimeline();
  if (app.token) signIn(app.token); else showSignin("");
}

main();
