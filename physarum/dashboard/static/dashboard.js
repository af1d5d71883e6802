// The physarum dashboard: polls the job's JSON API and draws SVG charts and tables.
// No library and no CDN, so the page works on a machine with no internet.
"use strict";

const POLL_MS = 1000;
const COLORS = ["#2f6fde", "#e0603a", "#2e9d6b", "#9b59b6", "#c49a16"];
const TILES = [
  ["reward", "reward"], ["eval/accuracy", "held-out accuracy"], ["train/kl", "KL to reference"],
  ["train/ppo_kl", "KL (policy step)"], ["train/mismatch_k3", "rollout–trainer mismatch"],
  ["train/entropy", "entropy"], ["data/response_len", "response length"],
  ["rollout/gen_tokens_per_s", "gen tokens/s"], ["train/tokens_per_s", "train tokens/s"],
  ["perf/step_s", "step time (s)"], ["train/loss", "loss"],
];
const CHARTS = [
  ["reward", "batch reward", [["reward", "reward"]]],
  ["accuracy", "held-out accuracy", [["eval/accuracy", "accuracy"]]],
  ["kl", "KL", [["train/kl", "to reference"], ["train/ppo_kl", "policy step"]]],
  ["mismatch", "rollout–trainer mismatch",
    [["train/mismatch_k3", "k3 KL"], ["train/mismatch_abs_diff", "|Δ logprob|"]]],
  ["truncation", "importance weights truncated (TIS)", [["train/tis_clip_frac", "fraction"]]],
  ["entropy", "entropy", [["train/entropy", "entropy"]]],
  ["length", "response length (tokens)", [["data/response_len", "mean"]]],
  ["throughput", "tokens/s",
    [["rollout/gen_tokens_per_s", "generation"], ["train/tokens_per_s", "training"]]],
];
const BUFFER_CHARTS = [
  ["groups", "groups waiting",
    [["buffer/groups_unconsumed", "unconsumed"], ["buffer/groups_pending", "taken, not acked"]]],
  ["staleness", "staleness of trained groups",
    [["buffer/staleness_mean", "mean"], ["buffer/staleness_max", "max"]]],
];
// Step time, split: waiting for episodes, logprobs/preparation, optimizer step, the rest
// (weight push, eval, checkpoint, logging) of the wall time between two steps.
const PHASES = [["wait", "wait for episodes"], ["prep", "logprobs + prep"],
  ["optim", "optimizer"], ["other", "push, eval, log"]];
const BUFFER_ROWS = [
  ["prompts_queued", "prompts queued"], ["prompts_leased", "prompts leased"],
  ["prompts_done", "prompts done"], ["groups_unconsumed", "groups waiting"],
  ["groups_pending", "groups taken, not acked"], ["groups_acked", "groups acked"],
  ["lag_versions", "head-of-queue lag (versions)"], ["drops_stale", "groups dropped (stale)"],
  ["stale_requeued", "prompts requeued"], ["lease_expiries", "leases expired"],
  ["late_pushes", "late pushes"], ["corrupt", "corrupt groups"], ["version", "buffer version"],
];

const records = [];
const svgNS = "http://www.w3.org/2000/svg";

function fmt(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (typeof v !== "number") return String(v);
  const a = Math.abs(v);
  if (a >= 1000) return v.toFixed(0);
  if (a !== 0 && a < 1e-3) return v.toExponential(2);
  return String(Number(v.toPrecision(4)));
}

// An axis label with as many decimals as the axis' span needs (6.148 / 6.150 / 6.152).
function axisLabel(v, span) {
  if (v === 0) return "0";
  if (Math.abs(v) >= 1e4 || Math.abs(v) < 1e-3) return v.toExponential(2);
  const digits = span > 0 ? Math.max(0, Math.min(6, 1 - Math.floor(Math.log10(span / 2)))) : 2;
  return v.toFixed(digits);
}

function duration(s) {
  if (s === null || s === undefined) return "?";
  s = Math.round(s);
  if (s < 60) return s + "s";
  const m = Math.floor(s / 60);
  if (m < 60) return m + "m" + String(s % 60).padStart(2, "0") + "s";
  return Math.floor(m / 60) + "h" + String(m % 60).padStart(2, "0") + "m";
}

function el(tag, attrs, parent, ns) {
  const node = ns ? document.createElementNS(svgNS, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  if (parent) parent.appendChild(node);
  return node;
}

function series(key) {
  const pts = [];
  for (const r of records) {
    if (typeof r[key] === "number") pts.push([r.step, r[key]]);
  }
  return pts;
}

function chartBox(parent, id, title, labels) {
  const box = el("div", { class: "chart", id: "chart-" + id }, parent);
  el("h3", { text: title }, box);
  const svg = el("svg", { viewBox: "0 0 360 160", "data-chart": id }, box, true);
  const legend = el("div", { class: "legend" }, box);
  labels.forEach((label, i) => {
    const item = el("span", {}, legend);
    el("i", { style: "background:" + COLORS[i % COLORS.length] }, item);
    item.appendChild(document.createTextNode(label));
  });
  return svg;
}

function frame(svg, x0, x1, y0, y1, stepLabels = true) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const L = 50, R = 352, T = 10, B = 140;
  const sx = (x) => L + (x1 > x0 ? (x - x0) / (x1 - x0) : 0.5) * (R - L);
  const sy = (y) => B - (y1 > y0 ? (y - y0) / (y1 - y0) : 0.5) * (B - T);
  for (let i = 0; i <= 2; i++) {
    const y = y0 + (i / 2) * (y1 - y0);
    el("line", { x1: L, x2: R, y1: sy(y), y2: sy(y), stroke: "#eceff4" }, svg, true);
    el("text", { x: L - 4, y: sy(y) + 3, "text-anchor": "end", text: axisLabel(y, y1 - y0) }, svg, true);
  }
  if (stepLabels) {
    el("text", { x: L, y: 156, text: "step " + x0 }, svg, true);
    el("text", { x: R, y: 156, "text-anchor": "end", text: "step " + x1 }, svg, true);
  }
  return { sx, sy };
}

function bounds(all) {
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y0 > 0 && y0 < 0.5 * y1) y0 = 0;
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 0.5; y1 += Math.abs(y1) * 0.1 || 0.5; }
  return [Math.min(...xs), Math.max(...xs), y0, y1];
}

function drawLines(svg, keys) {
  const data = keys.map(([key]) => series(key));
  const all = data.flat();
  if (!all.length) {
    frame(svg, 0, 1, 0, 1);
    el("text", { x: 200, y: 80, "text-anchor": "middle", text: "no data yet" }, svg, true);
    return;
  }
  const { sx, sy } = frame(svg, ...bounds(all));
  data.forEach((pts, i) => {
    const color = COLORS[i % COLORS.length];
    const d = pts.map((p, j) => (j ? "L" : "M") + sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1));
    el("path", { d: d.join(""), fill: "none", stroke: color, "stroke-width": 1.6,
      "data-series": keys[i][0], "data-points": pts.length }, svg, true);
    if (pts.length <= 40) {
      for (const p of pts) el("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.2, fill: color }, svg, true);
    }
  });
}

function phases(r) {
  const total = r["perf/step_s"], wait = r["perf/wait_s"] || 0;
  const train = r["train/time/step_s"] || 0, optim = r["train/time/train_step_s"] || 0;
  if (typeof total !== "number") return null;
  return { wait, prep: Math.max(train - optim, 0), optim,
    other: Math.max(total - wait - train, 0) };
}

function drawPhases(svg) {
  const rows = records.filter((r) => phases(r)).slice(-60);
  if (!rows.length) { frame(svg, 0, 1, 0, 1); return; }
  const split = rows.map(phases);
  const top = Math.max(...split.map((p) => p.wait + p.prep + p.optim + p.other));
  const { sx, sy } = frame(svg, rows[0].step, rows[rows.length - 1].step, 0, top || 1);
  const w = Math.max(2, 300 / rows.length - 1);
  rows.forEach((r, i) => {
    let base = 0;
    PHASES.forEach(([key], k) => {
      const h = split[i][key];
      el("rect", { x: sx(r.step) - w / 2, width: w, y: sy(base + h), height: sy(base) - sy(base + h),
        fill: COLORS[k], "data-phase": key }, svg, true);
      base += h;
    });
  });
  svg.setAttribute("data-points", rows.length);
}

function drawHistogram(svg, taken, dropped) {
  const keys = [...new Set([...Object.keys(taken || {}), ...Object.keys(dropped || {})])]
    .map(Number).sort((a, b) => a - b);
  if (!keys.length) { frame(svg, 0, 1, 0, 1, false); return; }
  const top = Math.max(...keys.map((k) => (taken[k] || 0) + (dropped[k] || 0)));
  const { sy } = frame(svg, keys[0], keys[keys.length - 1], 0, top, false);  // x: staleness
  const w = 300 / keys.length;
  keys.forEach((k, i) => {
    const x = 48 + i * w, a = taken[k] || 0, b = dropped[k] || 0;
    el("rect", { x, width: w - 4, y: sy(a), height: sy(0) - sy(a), fill: COLORS[0] }, svg, true);
    el("rect", { x, width: w - 4, y: sy(a + b), height: sy(a) - sy(a + b), fill: COLORS[1] }, svg, true);
    el("text", { x: x + w / 2 - 2, y: 150, "text-anchor": "middle", text: String(k) }, svg, true);
  });
}

function latest(key) {
  for (let i = records.length - 1; i >= 0; i--) {
    if (typeof records[i][key] === "number") return records[i];
  }
  return null;
}

function renderTiles() {
  const root = document.getElementById("tiles");
  root.textContent = "";
  for (const [key, label] of TILES) {
    const r = latest(key);
    if (!r) continue;
    const tile = el("div", { class: "tile" }, root);
    el("div", { class: "label", text: label }, tile);
    el("div", { class: "value", "data-metric": key, "data-step": r.step, text: fmt(r[key]) }, tile);
    el("div", { class: "step", text: "step " + r.step }, tile);
  }
}

function renderBuffer(stats) {
  const table = document.getElementById("buffer-table");
  table.textContent = "";
  for (const [key, label] of BUFFER_ROWS) {
    if (!(key in stats)) continue;
    const tr = el("tr", {}, table);
    el("td", { text: label }, tr);
    el("td", { class: "num", "data-buffer": key, text: fmt(stats[key]) }, tr);
  }
  drawHistogram(document.querySelector("[data-chart=hist]"), stats.staleness_hist, stats.dropped_hist);
}

function renderServices(rows) {
  const body = document.querySelector("#services tbody");
  body.textContent = "";
  for (const r of rows) {
    const tr = el("tr", { "data-service": r.name }, body);
    el("td", { text: r.name }, tr);
    el("td", { text: r.node_ip || "–" }, tr);
    const gpus = r.gpu_ids && r.gpu_ids.length ? " [" + r.gpu_ids.join(",") + "]" : "";
    el("td", { text: (r.device || "–") + gpus }, tr);
    el("td", { class: "num", text: r.pid || "–" }, tr);
    const health = el("td", {}, tr);
    el("span", { class: "dot " + r.health }, health);
    health.appendChild(document.createTextNode(r.health));
    el("td", { class: "num", text: r.version === undefined || r.version === null ? "–" : "v" + r.version }, tr);
  }
}

function renderStatus(s) {
  const parts = [s.stage, `step ${s.step}/${s.total_steps}`, `weights v${s.version}`,
    `elapsed ${duration(s.elapsed_s)}`, `ETA ${duration(s.eta_s)}`];
  document.getElementById("status").textContent = parts.join(" · ");
  const pct = s.total_steps ? (100 * s.step) / s.total_steps : 0;
  document.getElementById("progress-bar").style.width = pct.toFixed(1) + "%";
}

async function getJSON(path) {
  const res = await fetch(path, { credentials: "same-origin" });
  if (!res.ok) throw new Error(path + ": HTTP " + res.status);
  return res.json();
}

function build() {
  const charts = document.getElementById("charts");
  for (const [id, title, keys] of CHARTS) chartBox(charts, id, title, keys.map((k) => k[1]));
  chartBox(charts, "phases", "step time by phase (s)", PHASES.map((p) => p[1]));
  const buf = document.getElementById("buffer-charts");
  for (const [id, title, keys] of BUFFER_CHARTS) chartBox(buf, id, title, keys.map((k) => k[1]));
  chartBox(buf, "hist", "staleness: groups by versions behind", ["trained", "dropped"]);
}

async function poll() {
  try {
    const fresh = await getJSON("api/metrics?since=" + records.length);
    records.push(...fresh);
    renderStatus(await getJSON("api/status"));
    for (const [id, , keys] of [...CHARTS, ...BUFFER_CHARTS]) {
      drawLines(document.querySelector(`[data-chart=${id}]`), keys);
    }
    drawPhases(document.querySelector("[data-chart=phases]"));
    renderTiles();
    renderBuffer(await getJSON("api/buffer"));
    renderServices(await getJSON("api/services"));
    document.getElementById("footer").textContent =
      `${records.length} metric records · updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    document.getElementById("footer").textContent = "job not reachable (finished?): " + err.message;
  }
  setTimeout(poll, POLL_MS);
}

build();
poll();
