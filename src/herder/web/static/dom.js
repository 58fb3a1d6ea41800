// Small DOM and formatting helpers shared by the dashboard's modules.
//
// Data always reaches the page through el(), as text nodes: task names, logs
// and tracebacks come from users' code and must never be parsed as HTML.


/** An element with attributes and children; strings become text nodes, never HTML. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "style") node.style.cssText = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export const $ = (selector) => document.querySelector(selector);

let plotly = null;

/**
 * Load plotly.min.js (4.8 MB) once, when a chart is first drawn: as a script in
 * the page it would hold back app.js (deferred scripts run in order) and with
 * it the first paint, by seconds on a slow machine.
 */
export function plotlyReady() {
  plotly ??= new Promise((resolve, reject) => {
    const script = el("script", { src: "/static/plotly.min.js" });
    script.addEventListener("load", () => resolve(window.Plotly));
    script.addEventListener("error", () => reject(new Error("plotly.min.js did not load")));
    document.head.append(script);
  });
  return plotly;
}

export function fmtTime(epoch) {
  if (epoch === null || epoch === undefined) return "";
  const d = new Date(epoch * 1000);
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString() : d.toLocaleString();
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 120) return `${seconds.toFixed(1)} s`;
  if (seconds < 7200) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function stateBadge(state) {
  return el("span", { class: `state ${state || ""}` }, state || "");
}

/** Run fn at most once per `ms`: live events can come by the hundred per second. */
const timers = new Map(); // pending throttled calls, by name

export function throttle(name, ms, fn) {
  if (timers.has(name)) return;
  timers.set(name, setTimeout(() => { timers.delete(name); fn(); }, ms));
}


export function table(headers, rows) {
  if (!rows.length) return el("p", { class: "muted" }, "none");
  return el("table", { class: "grid" },
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.map((r) => el("tr", {}, r.map((c) => el("td", {}, c ?? ""))))));
}
