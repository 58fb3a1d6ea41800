// The timeline as a Gantt chart drawn with plotly, like Dask's task stream:
// one lane per node slot, one bar per attempt, coloured by its outcome.

import { el, fmtDuration, plotlyReady } from "./dom.js";

export const COLOURS = {
  succeeded: "#16a34a",
  failed: "#dc2626",
  running: "#2563eb",
  cancelled: "#9ca3af",
};

/**
 * Pack attempts into lanes, greedily per node: each attempt goes to the first
 * lane of its node that is free at its start. With one task per slot at a time,
 * a node gets as many lanes as it has busy slots. `label(nodeId)` names a node;
 * attempts still running end at `now`.
 */
export function packLanes(attempts, now, label) {
  const byNode = new Map();
  for (const a of attempts) {
    const key = a.node_id || "?";
    if (!byNode.has(key)) byNode.set(key, []);
    byNode.get(key).push(a);
  }
  const placed = [];
  const lanes = [];
  for (const node of [...byNode.keys()].sort((x, y) => label(x).localeCompare(label(y)))) {
    const ends = []; // per lane of this node: when its last attempt ends
    const list = byNode.get(node).sort((x, y) => x.start - y.start);
    for (const a of list) {
      const end = a.end ?? now;
      let lane = ends.findIndex((e) => e <= a.start);
      if (lane < 0) { lane = ends.length; ends.push(end); } else ends[lane] = end;
      placed.push({ ...a, end, lane: `${label(node)} · ${lane + 1}` });
    }
    for (let i = 0; i < ends.length; i++) lanes.push(`${label(node)} · ${i + 1}`);
  }
  return { placed, lanes };
}

/** The colour class of an attempt: the store's outcome, or running while it has no end. */
export function outcome(a) {
  if (a.state === "succeeded" || a.state === "failed" || a.state === "cancelled") return a.state;
  if (a.end === null || a.state === "running" || a.state === "leased") return "running";
  return "failed"; // an attempt that ended any other way (lost node, timeout) did not succeed
}

/** Plotly reads a few HTML tags in hover text: user data goes in as entities. */
const plain = (text) => String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");

/**
 * Draw `attempts` into `box`. `label` names nodes, `revision` keeps the user's
 * zoom across redraws of the same chart, `onClick(taskId)` opens a task.
 */
export function drawGantt(box, attempts, options) {
  if (!window.Plotly) {
    plotlyReady().then(
      () => drawGantt(box, attempts, options),
      (error) => { box.textContent = error.message; },
    );
    return;
  }
  const { label, revision, onClick } = options;
  if (!attempts.length) {
    Plotly.purge(box);
    box.replaceChildren(el("p", { class: "muted" }, "no attempts"));
    return;
  }
  if (box.querySelector("p")) box.replaceChildren();
  const { placed, lanes } = packLanes(attempts, Date.now() / 1000, label);
  // One trace per outcome: one colour each.
  const traces = Object.keys(COLOURS).map((kind) => {
    const bars = placed.filter((a) => outcome(a) === kind);
    return {
      type: "bar", orientation: "h", name: kind, marker: { color: COLOURS[kind] },
      y: bars.map((a) => a.lane),
      base: bars.map((a) => new Date(a.start * 1000).toISOString()),
      x: bars.map((a) => Math.max((a.end - a.start) * 1000, 1)), // ms on a date axis
      customdata: bars.map((a) => a.task_id),
      text: bars.map((a) => `${plain(a.name || a.task_id)} (attempt ${a.attempt})<br>` +
        `${fmtDuration(a.end - a.start)} on ${plain(label(a.node_id))}`),
      hovertemplate: "%{text}<extra>%{fullData.name}</extra>", textposition: "none",
    };
  }).filter((t) => t.y.length);
  const layout = {
    barmode: "overlay", bargap: 0.15, height: Math.max(220, 70 + lanes.length * 24),
    margin: { l: 130, r: 10, t: 10, b: 40 }, showlegend: false,
    xaxis: { type: "date" },
    yaxis: { type: "category", categoryorder: "array", categoryarray: [...lanes].reverse(),
             automargin: true },
    uirevision: revision,
  };
  Plotly.react(box, traces, layout, { displaylogo: false, responsive: true });
  if (!box.dataset.clickBound) {
    box.dataset.clickBound = "1";
    box.on("plotly_click", (event) => {
      const id = event.points?.[0]?.customdata;
      if (id) onClick(id);
    });
  }
}
