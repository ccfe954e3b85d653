// ft ui: one small page over the REST API (/api/...) and ft serve's OpenAI API (/serve/v1/...).
// No framework, no build: every text from the server goes in with textContent, never as HTML.
"use strict";

const $ = (sel, el = document) => el.querySelector(sel);
const $$ = (sel, el = document) => [...el.querySelectorAll(sel)];

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// -- formatting as the CLI does -------------------------------------------------------------------------
const fmtLoss = (x) => (x === null || x === undefined ? "-" : Number(x).toFixed(4));
const fmtInt = (x) => (x === null || x === undefined ? "-" : Math.round(x).toLocaleString("en-US"));
const fmtNum = (x, d = 2) => (x === null || x === undefined ? "-" : Number(x).toFixed(d));
function fmtSecs(s) {
  if (s === null || s === undefined) return "-";
  s = Math.round(s);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}
function fmtBytes(n) {
  if (n === null || n === undefined) return "-";
  const u = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}
const badge = (status) => h("span", { class: `badge st-${status}` }, status);

// -- API: bearer key kept in this tab (sessionStorage), never a cookie -----------------------------------
let KEY = sessionStorage.getItem("ft-key") || "";
const authHeaders = () => (KEY ? { Authorization: `Bearer ${KEY}` } : {});
let keyPromise = null;

function askKey() {
  if (keyPromise) return keyPromise;
  keyPromise = new Promise((resolve) => {
    const dlg = $("#key-dialog");
    $("#key-form").onsubmit = () => {
      KEY = $("#key-input").value.trim();
      sessionStorage.setItem("ft-key", KEY);
      keyPromise = null;
      resolve();
    };
    dlg.showModal();
  });
  return keyPromise;
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && (body.message || (body.error && body.error.message) || body.detail)) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function raw(path, opts = {}) {
  for (let attempt = 0; ; attempt++) {
    const r = await fetch(path, { ...opts, headers: { ...(opts.headers || {}), ...authHeaders() } });
    if (r.status === 401 && attempt < 3) { await askKey(); continue; }
    return r;
  }
}

async function api(path, opts = {}) {
  const o = { ...opts };
  if (o.json !== undefined) {
    o.body = JSON.stringify(o.json);
    o.headers = { "Content-Type": "application/json", ...(o.headers || {}) };
    delete o.json;
  }
  const r = await raw(path, o);
  const text = await r.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = { message: text }; }
  if (!r.ok) throw new ApiError(r.status, body);
  return body;
}

// Server-sent events over fetch (EventSource cannot send the Authorization header).
async function streamEvents(path, opts, onEvent, signal) {
  const r = await raw(path, { ...opts, signal });
  if (!r.ok) throw new ApiError(r.status, await r.json().catch(() => null));
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, i);
      buf = buf.slice(i + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) onEvent(event, data.join("\n"));
    }
  }
}

function showMsg(el, text, kind = "") {
  el.textContent = text;
  el.className = `msg ${kind}`;
}
const errText = (e) => (e.body && e.body.hint ? `${e.message}\nhint: ${e.body.hint}` : e.message);

// Poll a job until it ends; onUpdate(job) on each poll.
async function followJob(jobId, onUpdate) {
  for (;;) {
    const job = await api(`/api/jobs/${jobId}`);
    onUpdate(job);
    if (!["queued", "running"].includes(job.status)) return job;
    await new Promise((r) => setTimeout(r, 700));
  }
}
const lastLine = (job) => { const l = job.log_tail.trim().split("\n").pop() || ""; return l.length > 160 ? l.slice(-160) : l; };
const jobError = (job) => (job.result && job.result.message) || job.log_tail.trim().split("\n").slice(-3).join("\n") || job.status;

// -- tabs ---------------------------------------------------------------------------------------------
const loaders = {};
function showTab(name) {
  for (const b of $$("#tabs button")) b.classList.toggle("active", b.dataset.tab === name);
  for (const s of $$("section.tab")) s.classList.toggle("hidden", s.id !== `tab-${name}`);
  location.hash = name;
  if (loaders[name]) loaders[name]().catch((e) => console.error(e));
}
for (const b of $$("#tabs button")) b.addEventListener("click", () => showTab(b.dataset.tab));

async function fillRunSelects() {
  const runs = (await api("/api/runs")).runs;
  for (const sel of $$("select.run-select")) {
    const cur = sel.value;
    sel.replaceChildren(...runs.slice().reverse().map((r) => h("option", { value: r.id }, `${r.id} (${r.status})`)));
    if (cur) sel.value = cur;
  }
  return runs;
}

// -- charts: hand-drawn on <canvas> -----------------------------------------------------------------
function drawChart(canvas, series, { log = false } = {}) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, L = 52, R = 10, T = 10, B = 24;
  ctx.clearRect(0, 0, W, H);
  const pts = series.flatMap((s) => s.points);
  canvas.dataset.points = String(series.reduce((n, s) => n + s.points.length, 0));
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#6b7385";
  if (!pts.length) { ctx.fillText("no data yet", W / 2 - 30, H / 2); return; }
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]).filter(Number.isFinite);
  let x0 = Math.min(...xs), x1 = Math.max(...xs);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const Y = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  ctx.strokeStyle = "#e2e5ec"; ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    ctx.beginPath(); ctx.moveTo(L, Y(y)); ctx.lineTo(W - R, Y(y)); ctx.stroke();
    const label = Math.abs(y) < 1e-2 && y !== 0 ? y.toExponential(1) : y.toPrecision(3);
    ctx.fillText(label, 4, Y(y) + 4);
  }
  ctx.fillText(`step ${Math.round(x0)}`, L, H - 6);
  ctx.fillText(`${Math.round(x1)}`, W - R - 24, H - 6);
  for (const s of series) {
    if (!s.points.length) continue;
    ctx.strokeStyle = s.color; ctx.fillStyle = s.color; ctx.lineWidth = 2;
    ctx.beginPath();
    s.points.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
    ctx.stroke();
    if (s.dots || s.points.length < 30) for (const [x, y] of s.points) { ctx.beginPath(); ctx.arc(X(x), Y(y), 2.5, 0, 7); ctx.fill(); }
  }
}

// -- Runs --------------------------------------------------------------------------------------------
let current = null; // {run, rows, abort}

function runRow(r) {
  const tr = h("tr", { class: "click", dataset: { run: r.id }, onclick: () => openRun(r.id) },
    h("td", {}, r.name ? `${r.id}` : r.id), h("td", {}, badge(r.status)), h("td", {}, r.model || "-"),
    h("td", {}, r.dataset || "-"), h("td", { class: "num" }, `${r.step || 0}/${r.total_steps || "?"}`),
    h("td", { class: "num" }, fmtLoss(r.best_val_loss) + (r.best_step !== null && r.best_step !== undefined ? ` @${r.best_step}` : "")),
    h("td", { class: "num" }, r.train_seconds ? fmtSecs(r.train_seconds) : "-"));
  if (current && current.run === r.id) tr.classList.add("sel");
  return tr;
}

async function loadRuns() {
  const [runs, jobs, datasets] = await Promise.all([api("/api/runs"), api("/api/jobs"), api("/api/datasets")]);
  $("#runs-table tbody").replaceChildren(...runs.runs.slice().reverse().map(runRow));
  $("#jobs-table tbody").replaceChildren(...jobs.jobs.slice().reverse().slice(0, 12).map((j) =>
    h("tr", { dataset: { job: j.id } }, h("td", {}, j.id), h("td", {}, j.kind), h("td", {}, badge(j.status)),
      h("td", {}, j.run_id ? h("a", { href: "#", onclick: (e) => { e.preventDefault(); openRun(j.run_id); } }, j.run_id) : "-"),
      h("td", {}, ["queued", "running"].includes(j.status)
        ? h("button", { class: "small", onclick: () => api(`/api/jobs/${j.id}/stop`, { method: "POST" }).then(loadRuns) }, "stop") : ""))));
  const sel = $("#train-dataset");
  const cur = sel.value;
  sel.replaceChildren(h("option", { value: "" }, "train.yml's data.path"),
    ...datasets.datasets.map((d) => h("option", { value: d.name }, `${d.name} (v${d.version})`)));
  if (cur) sel.value = cur;
}
loaders.runs = loadRuns;
// The lists follow jobs and runs started anywhere (the page, the CLI) while the Runs tab is shown.
setInterval(() => {
  if (!$("#tab-runs").classList.contains("hidden") && !document.hidden) loadRuns().catch(console.error);
}, 3000);
$("#runs-refresh").addEventListener("click", loadRuns);

$("#train-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const f = new FormData(e.target);
  const sets = String(f.get("sets") || "").split("\n").map((s) => s.trim()).filter(Boolean);
  if (f.get("steps")) sets.unshift(`training.max_steps=${f.get("steps")}`);
  const msg = $("#train-msg");
  try {
    const job = await api("/api/training/start", { method: "POST", json: { dataset: f.get("dataset") || null, name: f.get("name") || null, set: sets } });
    showMsg(msg, `job ${job.id} ${job.status}`, "ok");
    await loadRuns();
    watchJobForRun(job.id);
  } catch (err) { showMsg(msg, errText(err), "error"); }
});

async function watchJobForRun(jobId) {
  for (let i = 0; i < 600; i++) {
    const job = await api(`/api/jobs/${jobId}`);
    if (job.run_id) { await loadRuns(); return openRun(job.run_id); }
    if (!["queued", "running"].includes(job.status)) { showMsg($("#train-msg"), jobError(job), "error"); return loadRuns(); }
    await new Promise((r) => setTimeout(r, 400));
  }
}

function renderStatus(st) {
  const s = st.run;
  if (!s) return;
  $("#run-status").replaceWith(h("span", { id: "run-status", class: `badge st-${s.status}` }, s.status));
  $("#run-bar").style.width = `${Math.round((st.progress || 0) * 100)}%`;
  const running = s.status === "running";
  $("#run-stop").disabled = !running;
  $("#run-resume").disabled = running || s.status === "completed";
  if (s.detail) $("#run-status").title = s.detail;
  current.summary = s;
  current.eta = st.eta_seconds;
  renderStats();
}

function renderStats() {
  const s = current.summary || {};
  const rows = current.rows;
  const lastTrain = [...rows].reverse().find((r) => r.type === "train");
  const start = rows.find((r) => r.type === "start");
  const mem = lastTrain && lastTrain.memory;
  const eta = s.status === "running" ? (lastTrain ? lastTrain.eta_seconds : current.eta) : null;
  const stat = (label, value, id) => h("div", { class: "stat" }, h("b", { id }, value), h("span", {}, label));
  $("#run-stats").replaceChildren(
    stat("step", `${s.step || 0} / ${s.total_steps || "?"}`, "stat-step"),
    stat("ETA", eta === null || eta === undefined ? "-" : fmtSecs(eta), "stat-eta"),
    stat("best val loss", fmtLoss(s.best_val_loss) + (s.best_step ? ` @${s.best_step}` : ""), "stat-best"),
    stat("last loss", lastTrain ? fmtLoss(lastTrain.loss) : "-"),
    stat("tokens / s", lastTrain ? fmtInt(lastTrain.tokens_per_second) : "-"),
    stat("memory (rss / peak)", mem ? `${fmtNum(mem.rss_gb, 1)} / ${fmtNum(mem.peak_gb, 1)} GB` : "-"),
    stat("device", start ? start.device : "-"),
    stat("model / dataset", `${s.model || "-"} / ${s.dataset || "-"}`));
}

let drawPending = false;
function redraw() {
  if (drawPending) return;
  drawPending = true;
  requestAnimationFrame(() => {
    drawPending = false;
    const rows = current.rows;
    const train = rows.filter((r) => r.type === "train" || (r.type === undefined && r.loss !== undefined));
    const evals = rows.filter((r) => r.type === "eval" || r.val_loss !== undefined);
    drawChart($("#chart-loss"), [
      { points: train.map((r) => [r.step, r.loss]), color: "#2f6fdf" },
      { points: evals.map((r) => [r.step, r.val_loss]), color: "#d9480f", dots: true },
    ]);
    drawChart($("#chart-lr"), [{ points: train.filter((r) => r.lr !== undefined).map((r) => [r.step, r.lr]), color: "#7048e8" }]);
    drawChart($("#chart-tps"), [{ points: train.filter((r) => r.tokens_per_second !== undefined).map((r) => [r.step, r.tokens_per_second]), color: "#1f8a4c" }]);
    renderStats();
    const lastEval = [...evals].reverse().find((r) => r.samples && r.samples.length);
    if (lastEval) {
      $("#run-samples").replaceChildren(h("p", { class: "muted" }, `step ${lastEval.step} (greedy, training.eval_samples)`),
        ...lastEval.samples.map((smp) => h("div", { class: "run-sample" }, h("b", {}, `validation prompt #${smp.index}`),
          h("pre", {}, smp.text ?? JSON.stringify(smp.tokens)))));
    }
  });
}

async function openRun(runId) {
  if (current && current.abort) current.abort.abort();
  if (current && current.timer) clearInterval(current.timer);
  current = { run: runId, rows: [], abort: new AbortController() };
  $("#run-detail").classList.remove("hidden");
  $("#run-title").textContent = runId;
  $("#run-samples").textContent = "none yet";
  for (const tr of $$("#runs-table tbody tr")) tr.classList.toggle("sel", tr.dataset.run === runId);
  const mine = current;
  const poll = async () => {
    try { if (current === mine) renderStatus(await api(`/api/training/${runId}/status`)); } catch (e) { console.error(e); }
  };
  await poll();
  mine.timer = setInterval(poll, 2000);
  redraw();
  streamEvents(`/api/metrics/${runId}/stream`, {}, (event, data) => {
    if (event !== "message" || current !== mine) return;
    mine.rows.push(JSON.parse(data));
    redraw();
  }, mine.abort.signal).catch((e) => { if (e.name !== "AbortError") console.error(e); });
}

$("#run-stop").addEventListener("click", async () => {
  try { renderStatus(await api(`/api/training/${current.run}/stop`, { method: "POST" })); } catch (e) { alert(errText(e)); }
});
$("#run-resume").addEventListener("click", async () => {
  try {
    const job = await api(`/api/training/${current.run}/resume`, { method: "POST" });
    showMsg($("#train-msg"), `resuming ${current.run}: job ${job.id}`, "ok");
    await loadRuns();
    openRun(current.run);
  } catch (e) { alert(errText(e)); }
});

// -- Datasets ------------------------------------------------------------------------------------------
$("#upload-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const file = $("#upload-file").files[0];
  const msg = $("#upload-msg");
  if (!file) return showMsg(msg, "choose a file first", "error");
  try {
    const r = await api(`/api/datasets/upload?filename=${encodeURIComponent(file.name)}`, { method: "POST", body: file });
    showMsg(msg, `uploaded ${r.path} (${fmtBytes(r.bytes)})`, "ok");
    $("#prepare-form [name=source]").value = r.path;
  } catch (err) { showMsg(msg, errText(err), "error"); }
});

function rejectedTable(records) {
  return h("table", { id: "rejected-table" },
    h("thead", {}, h("tr", {}, h("th", {}, "file"), h("th", { class: "num" }, "line"), h("th", {}, "reason"), h("th", {}, "message"))),
    h("tbody", {}, records.map((r) => h("tr", {}, h("td", {}, r.file || r.where || "-"), h("td", { class: "num" }, r.line ?? "-"),
      h("td", {}, r.reason), h("td", {}, r.message)))));
}

function histogram(hist) {
  if (!hist || !hist.counts || !hist.counts.length) return "";
  const top = Math.max(...hist.counts) || 1;
  return h("div", {}, h("h3", {}, "token lengths"),
    h("div", { class: "hist" }, hist.counts.map((c, i) => h("div", { style: `height:${(100 * c) / top}%`, title: `${hist.edges[i]}-${hist.edges[i + 1] - 1}: ${c}` }))),
    h("div", { class: "row muted" }, h("span", {}, hist.edges[0]), h("span", { class: "spacer" }), h("span", {}, hist.edges[hist.edges.length - 1])));
}

$("#prepare-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const f = new FormData(e.target);
  const body = {};
  for (const [k, v] of f.entries()) if (v !== "") body[k] = v;
  for (const k of ["val", "test"]) if (body[k] !== undefined) body[k] = Number(body[k]);
  if (body.max_seq_length !== undefined) body.max_seq_length = Number(body.max_seq_length);
  body.show_content = f.get("show_content") === "on";
  const msg = $("#prepare-msg"), out = $("#prepare-report");
  out.replaceChildren();
  try {
    const job = await api("/api/datasets/prepare", { method: "POST", json: body });
    const done = await followJob(job.id, (j) => showMsg(msg, `preparing (job ${j.id}): ${j.status}… ${lastLine(j)}`));
    const rej = await api(`/api/jobs/${done.id}/rejected`);
    if (done.status === "completed") {
      const r = done.result, s = r.stats;
      showMsg(msg, `prepared ${r.name} v${r.version}: ${fmtInt(s.kept)} kept of ${fmtInt(s.records_read)} read, ${fmtInt(s.bad)} invalid`, "ok");
      out.append(h("p", {}, `splits: ${Object.entries(r.splits).map(([k, v]) => `${k}`).join(", ")}`), histogram(s.histogram));
      loadDatasets();
    } else {
      showMsg(msg, jobError(done), "error");
    }
    if (rej.records.length) out.append(h("h3", {}, `rejected records (${rej.records.length})`), rejectedTable(rej.records));
  } catch (err) { showMsg(msg, errText(err), "error"); }
});

async function loadDatasets() {
  const list = await api("/api/datasets");
  $("#datasets-table tbody").replaceChildren(...list.datasets.map((d) => h("tr", { class: "click", dataset: { dataset: d.name }, onclick: () => openDataset(d.name) },
    h("td", {}, d.name), h("td", { class: "num" }, `v${d.version}`), h("td", {}, d.model),
    h("td", {}, Object.entries(d.records).map(([k, v]) => `${k} ${fmtInt(v)}`).join(", ")),
    h("td", {}, h("button", { class: "small", onclick: async (ev) => {
      ev.stopPropagation();
      if (!confirm(`remove dataset ${d.name} v${d.version}?`)) return;
      await api(`/api/datasets/${d.name}?version=${d.version}`, { method: "DELETE" });
      loadDatasets();
    } }, "remove")))));
}
loaders.datasets = loadDatasets;

async function openDataset(name, split = "train") {
  const [info, shown] = await Promise.all([api(`/api/datasets/${name}`), api(`/api/datasets/${name}/records?split=${split}&n=5`)]);
  const s = info.stats;
  $("#dataset-detail").replaceChildren(
    h("h3", {}, `${name} v${info.summary.version}`),
    h("p", { class: "muted" }, `source ${info.summary.source} · ${fmtInt(s.kept)} records · versions ${info.versions.join(", ")}`),
    histogram(s.histogram),
    h("div", { class: "row" }, h("h3", {}, "records"), h("span", { class: "muted" }, "trained tokens highlighted"),
      ...Object.keys(info.summary.records).map((sp) => h("button", { class: "small", onclick: () => openDataset(name, sp) }, sp))),
    ...shown.records.map((r) => h("div", {}, h("div", { class: "muted" }, `#${r.index} · ${r.where} · ${r.tokens} tokens, ${r.trained_tokens} trained`),
      h("div", { class: "segments" }, r.segments.map((sg) => (sg.trained ? h("mark", { class: "trained" }, sg.text) : sg.text))))));
}

// -- Models --------------------------------------------------------------------------------------------
async function loadModels() {
  const q = $("#model-search").value.trim();
  const r = await api(q ? `/api/models/search?q=${encodeURIComponent(q)}` : "/api/models");
  $("#models-table tbody").replaceChildren(...r.models.map((m) => h("tr", { class: "click", dataset: { model: m.name }, onclick: () => openModel(m.name) }, h("td", {}, m.name), h("td", {}, m.architecture || "-"),
    h("td", { class: "num" }, m.parameters ? `${(m.parameters / 1e6).toFixed(1)}M` : "-"), h("td", { class: "num" }, fmtBytes(m.size_bytes ?? m.bytes)), h("td", {}, m.source || "-"))));
  $("#catalog-table tbody").replaceChildren(...r.catalog.map((c) => h("tr", {}, h("td", {}, c.name),
    h("td", { class: "num" }, c.parameters ? `${(c.parameters / 1e9).toFixed(2)}B` : "-"), h("td", { class: "num" }, fmtBytes(c.download_bytes)),
    h("td", {}, c.description || ""), h("td", {}, c.pulled ? "pulled" : h("button", { class: "small", onclick: () => pull(c.name) }, "pull")))));
}
loaders.models = loadModels;

async function openModel(name) {
  const out = $("#model-detail");
  out.replaceChildren(h("p", { class: "muted" }, `${name}: measuring…`));
  const r = await api(`/api/models/${name}`);
  const m = r.memory;
  out.replaceChildren(h("h3", {}, `${name} · ${r.model.architecture} · ${r.model.quantization} · ${fmtBytes(r.model.size_bytes)}`),
    m ? h("div", {}, h("p", { id: "memory-verdict", class: m.fits ? "ok" : "bad" }, `training with the current train.yml: ${m.verdict}`),
      h("div", { class: "stats" }, ...[["total", m.total_bytes], ["available", m.available_bytes], ["weights", m.weights_bytes], ["adapters", m.adapter_bytes], ["optimizer", m.optimizer_bytes], ["activations", m.activation_bytes]]
        .map(([k, v]) => h("div", { class: "stat" }, h("b", {}, fmtBytes(v)), h("span", {}, k)))),
      ...m.advice.map((a) => h("p", { class: "muted" }, a)))
      : h("p", { class: "muted" }, r.memory_error || "no memory estimate"));
}
let searchTimer = null;
$("#model-search").addEventListener("input", () => { clearTimeout(searchTimer); searchTimer = setTimeout(loadModels, 250); });

$("#hub-search").addEventListener("click", async () => {
  const q = $("#model-search").value.trim();
  const msg = $("#hub-msg");
  if (!q) return showMsg(msg, "type a search text first", "error");
  showMsg(msg, `searching ${q}…`);
  const r = await api(`/api/models/hub?q=${encodeURIComponent(q)}`);
  if (r.error) { $("#hub-table").classList.add("hidden"); return showMsg(msg, `Hub not reachable: ${r.error}`, "error"); }
  showMsg(msg, `${r.models.length} repositories on ${r.endpoint}`);
  $("#hub-table").classList.remove("hidden");
  $("#hub-table tbody").replaceChildren(...r.models.map((m) => h("tr", { dataset: { repo: m.id } }, h("td", {}, m.id), h("td", { class: "num" }, fmtInt(m.downloads)),
    h("td", { class: "num" }, fmtInt(m.likes)), h("td", {}, m.pipeline_tag || "-"), h("td", {}, h("button", { class: "small", onclick: () => pull(m.id) }, "pull")))));
});

async function pull(source, name) {
  const msg = $("#pull-msg");
  try {
    const job = await api("/api/models/pull", { method: "POST", json: { source, name: name || null } });
    const done = await followJob(job.id, (j) => showMsg(msg, `pulling ${source} (job ${j.id}): ${j.status}… ${lastLine(j)}`));
    showMsg(msg, done.status === "completed" ? `pulled ${done.result.name}` : jobError(done), done.status === "completed" ? "ok" : "error");
    loadModels();
  } catch (err) { showMsg(msg, errText(err), "error"); }
}
$("#pull-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const f = new FormData(e.target);
  pull(f.get("source"), f.get("name"));
});

// -- Config --------------------------------------------------------------------------------------------
let configFields = [];

function inputFor(f) {
  const v = f.value;
  if (typeof v === "boolean") return h("input", { type: "checkbox", name: f.key, checked: v });
  const text = v === null ? "" : typeof v === "object" ? JSON.stringify(v) : String(v);
  return h("input", { name: f.key, value: text, placeholder: f.default === null ? "null" : String(f.default) });
}

function readValue(f, el) {
  if (el.type === "checkbox") return el.checked;
  const t = el.value.trim();
  if (t === "") return null;
  if (typeof f.value === "number" || typeof f.default === "number") { const n = Number(t); return Number.isFinite(n) ? n : t; }
  if (typeof f.value === "object" && f.value !== null) { try { return JSON.parse(t); } catch { return t; } }
  return t;
}

function changedValues() {
  const out = {};
  for (const f of configFields) {
    const el = $(`#config-form [name="${CSS.escape(f.key)}"]`);
    const v = readValue(f, el);
    if (JSON.stringify(v) !== JSON.stringify(f.value)) out[f.key] = v;
  }
  return out;
}

function showFieldErrors(errors) {
  for (const f of configFields) {
    const el = $(`#config-form [name="${CSS.escape(f.key)}"]`);
    const err = el.closest(".field").querySelector(".field-error");
    err.textContent = errors[f.key] || "";
    el.classList.toggle("invalid", Boolean(errors[f.key]));
  }
}

async function validateConfig() {
  const values = changedValues();
  const r = await api("/api/config/validate", { method: "POST", json: { values } });
  showFieldErrors(r.errors);
  showMsg($("#config-msg"), r.ok ? `${Object.keys(values).length} change(s), valid` : "fix the fields marked in red", r.ok ? "" : "error");
  return r.ok;
}

async function loadConfig() {
  const schema = await api("/api/config/schema");
  configFields = schema.fields;
  $("#config-path").textContent = schema.path || "";
  const sections = {};
  for (const f of schema.fields) (sections[f.section] ||= []).push(f);
  let timer = null;
  $("#config-form").replaceChildren(...Object.entries(sections).map(([name, fields]) => h("fieldset", {}, h("legend", {}, name),
    fields.map((f) => h("div", { class: "field" },
      h("label", { class: "key", for: `cfg-${f.key}` }, f.key.split(".")[1]),
      inputFor(f),
      h("div", { class: "doc" }, `${f.doc} Allowed: ${f.allowed}. Default: ${JSON.stringify(f.default)} · source: ${f.source}`),
      h("div", { class: "field-error" }))))));
  $("#config-form").oninput = () => { clearTimeout(timer); timer = setTimeout(() => validateConfig().catch(console.error), 300); };
}
loaders.config = loadConfig;

$("#config-save").addEventListener("click", async () => {
  const msg = $("#config-msg");
  try {
    if (!(await validateConfig())) return;
    const r = await api("/api/config", { method: "PUT", json: { values: changedValues() } });
    showMsg(msg, r.changed.length ? `saved ${r.changed.join(", ")} to ${r.path}` : "nothing changed", "ok");
    await loadConfig();
  } catch (err) { showMsg(msg, errText(err), "error"); }
});

// -- Evaluate ------------------------------------------------------------------------------------------
function metricTable(r) {
  const rows = [["loss", "loss", 4], ["perplexity", "perplexity", 3], ["accuracy", "accuracy", 4]];
  const base = r.base && r.base.metrics, tuned = r.tuned.metrics;
  const tr = (label, b, t, d = 4) => h("tr", {}, h("td", {}, label), h("td", { class: "num" }, fmtNum(b, d)), h("td", { class: "num" }, fmtNum(t, d)),
    h("td", { class: "num" }, b === null || b === undefined || t === null || t === undefined ? "-" : `${t - b >= 0 ? "+" : ""}${(t - b).toFixed(d)}`));
  const body = rows.map(([label, k, d]) => tr(label, base ? base[k] : null, tuned[k], d));
  if (r.tuned.text) for (const k of Object.keys(r.tuned.text)) body.push(tr(k, r.base && r.base.text ? r.base.text[k] : null, r.tuned.text[k]));
  return h("table", { id: "eval-metrics" }, h("thead", {}, h("tr", {}, h("th", {}, "metric"), h("th", { class: "num" }, "base"), h("th", { class: "num" }, "tuned"), h("th", { class: "num" }, "tuned − base"))), h("tbody", {}, body));
}

function renderReport(r) {
  const out = $("#eval-report");
  out.replaceChildren(h("h3", {}, `${r.run_id || r.base_model} · ${r.checkpoint} · ${r.split} (${r.records} records of ${r.dataset} v${r.dataset_version})`), metricTable(r));
  if (r.labels && r.labels.length) {
    out.append(h("h3", {}, "per label"), h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "label"), h("th", { class: "num" }, "records"), h("th", { class: "num" }, "base loss"), h("th", { class: "num" }, "tuned loss"))),
      h("tbody", {}, r.labels.map((l) => h("tr", {}, h("td", {}, l.label), h("td", { class: "num" }, fmtInt(l.records)), h("td", { class: "num" }, fmtLoss(l.base_loss)), h("td", { class: "num" }, fmtLoss(l.tuned_loss)))))));
  }
  if (r.tools) out.append(h("h3", {}, "tool calls"), h("pre", {}, JSON.stringify(r.tools, null, 2)));
  if (r.samples && r.samples.length) {
    out.append(h("h3", {}, "generations"));
    for (const s of r.samples) {
      out.append(h("div", { class: "muted" }, `#${s.index} · ${s.where}`), h("div", { class: "side sample" },
        h("div", {}, h("b", {}, "prompt"), h("pre", {}, s.prompt)), h("div", {}, h("b", {}, "reference"), h("pre", {}, s.reference)),
        h("div", {}, h("b", {}, "base"), h("pre", {}, s.base ?? "-")), h("div", {}, h("b", {}, "tuned"), h("pre", {}, s.tuned))));
    }
  }
}

async function loadEvaluations() {
  await fillRunSelects();
  const r = await api("/api/evaluations");
  $("#evals-table tbody").replaceChildren(...r.evaluations.slice().reverse().map((e) => h("tr", {}, h("td", {}, e.run_id || "-"), h("td", {}, e.checkpoint), h("td", {}, e.split),
    h("td", { class: "num" }, fmtInt(e.records)), h("td", { class: "num" }, fmtLoss(e.base_loss)), h("td", { class: "num" }, fmtLoss(e.tuned_loss)),
    h("td", {}, e.path ? h("button", { class: "small", onclick: async () => renderReport(await api(`/api/evaluations/report?path=${encodeURIComponent(reportPath(e.path))}`)) }, "open") : ""))));
}
const reportPath = (p) => (p.endsWith(".json") ? p : p.endsWith(".md") ? p.replace(/[^/]+$/, "report.json") : `${p}/report.json`);
loaders.evaluate = loadEvaluations;

$("#eval-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const f = new FormData(e.target);
  const body = { run: f.get("run") || null, checkpoint: f.get("checkpoint") || null, split: f.get("split") };
  for (const k of ["n_samples", "max_tokens", "limit"]) if (f.get(k)) body[k] = Number(f.get(k));
  const msg = $("#eval-msg");
  try {
    const job = await api("/api/evaluate", { method: "POST", json: body });
    const done = await followJob(job.id, (j) => showMsg(msg, `evaluating (job ${j.id}): ${j.status}… ${lastLine(j)}`));
    if (done.status !== "completed") return showMsg(msg, jobError(done), "error");
    showMsg(msg, `report ${done.result.report_json}`, "ok");
    renderReport(done.result);
    loadEvaluations();
  } catch (err) { showMsg(msg, errText(err), "error"); }
});

// -- Export --------------------------------------------------------------------------------------------
async function download(path) {
  const r = await raw(`/api/exports/download?path=${encodeURIComponent(path)}`);
  if (!r.ok) return alert(`download failed: HTTP ${r.status}`);
  const url = URL.createObjectURL(await r.blob());
  const a = h("a", { href: url, download: path.split("/").pop() });
  document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function renderExport(r) {
  const main = r.main_file || Object.keys(r.files)[0];
  $("#export-result").replaceChildren(
    h("p", {}, `${r.format} ${r.quant} · ${fmtBytes(r.bytes)} · ${fmtSecs(r.seconds)} · ${r.path}`),
    h("table", { id: "export-checks" }, h("thead", {}, h("tr", {}, h("th", {}, "check"), h("th", {}, "result"), h("th", {}, "detail"))),
      h("tbody", {}, r.checks.map((c) => h("tr", {}, h("td", {}, c.name), h("td", { class: c.ok ? "ok" : "bad" }, c.ok ? "ok" : "failed"), h("td", {}, c.detail))))),
    main ? h("button", { id: "export-download", onclick: () => download(main.startsWith("/") ? main : `${r.path}/${main}`) }, `download ${main.split("/").pop()}`) : "");
}

async function loadExports() {
  await fillRunSelects();
  const r = await api("/api/exports");
  $("#exports-table tbody").replaceChildren(...r.exports.slice().reverse().map((e) => {
    const m = e.meta || {};
    const names = Object.keys(m.sha256 || {});
    const main = names.find((n) => n.endsWith(".gguf")) || names[0];
    return h("tr", {}, h("td", {}, e.run_id || m.base_model || "-"), h("td", {}, m.format || "-"), h("td", {}, m.quant || "-"),
      h("td", { class: "num" }, fmtBytes(m.bytes)),
      h("td", {}, main ? h("a", { href: "#", onclick: (ev) => { ev.preventDefault(); download(`${m.path}/${main}`); } }, main) : "-"));
  }));
}
loaders.export = loadExports;

$("#export-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const f = new FormData(e.target);
  const body = { run: f.get("run") || null, format: f.get("format"), quant: f.get("quant") || null, checkpoint: f.get("checkpoint") || null };
  const msg = $("#export-msg");
  try {
    const job = await api("/api/export", { method: "POST", json: body });
    const done = await followJob(job.id, (j) => showMsg(msg, `exporting (job ${j.id}): ${j.status}… ${lastLine(j)}`));
    if (done.status !== "completed") return showMsg(msg, jobError(done), "error");
    showMsg(msg, `exported ${done.result.main_file || done.result.path}`, "ok");
    renderExport(done.result);
    loadExports();
  } catch (err) { showMsg(msg, errText(err), "error"); }
});

// -- Playground: ft serve's OpenAI API, streamed ---------------------------------------------------------
const chats = { a: [], b: [] };
async function loadPlayground() {
  let models = [];
  try { models = (await api("/serve/v1/models")).data; } catch (e) { showMsg($("#chat-log-a"), `no model to chat with: ${errText(e)}`, "error"); }
  for (const side of ["a", "b"]) {
    const sel = $(`#chat-model-${side}`);
    const cur = sel.value;
    sel.replaceChildren(...models.map((m) => h("option", { value: m.id }, m.id)));
    if (cur) sel.value = cur;
    else if (side === "b" && models.length > 1) sel.value = models[models.length - 1].id;
  }
}
loaders.playground = loadPlayground;
$("#chat-compare").addEventListener("change", (e) => $("#chat-col-b").classList.toggle("hidden", !e.target.checked));
$("#chat-clear").addEventListener("click", () => { chats.a = []; chats.b = []; $("#chat-log-a").replaceChildren(); $("#chat-log-b").replaceChildren(); });

async function chatOn(side, text) {
  const log = $(`#chat-log-${side}`);
  chats[side].push({ role: "user", content: text });
  log.append(h("div", { class: "bubble user" }, text));
  const out = h("div", { class: "bubble assistant streaming" }, "");
  log.append(out);
  let reply = "";
  // 503 while another model loads (ft serve loads one at a time): wait and retry, as OpenAI clients do.
  for (let attempt = 0; ; attempt++) {
    try {
      await streamEvents("/serve/v1/chat/completions", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ model: $(`#chat-model-${side}`).value, messages: chats[side], stream: true, max_tokens: Number($("#chat-max").value) || 64 }),
      }, (_ev, data) => {
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) { reply += delta.content; out.textContent = reply; out.dataset.chunks = String(Number(out.dataset.chunks || 0) + 1); log.scrollTop = log.scrollHeight; }
      });
      break;
    } catch (e) {
      if (e.status === 503 && attempt < 30) { out.textContent = "loading the model…"; await new Promise((r) => setTimeout(r, 1000)); continue; }
      out.classList.add("error"); out.textContent = errText(e);
      break;
    }
  }
  out.classList.remove("streaming");
  out.classList.add("done");
  chats[side].push({ role: "assistant", content: reply });
}

$("#chat-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = $("#chat-input").value.trim();
  if (!text) return;
  $("#chat-input").value = "";
  const sides = $("#chat-compare").checked ? ["a", "b"] : ["a"];
  await Promise.all(sides.map((s) => chatOn(s, text)));
});

// -- start ---------------------------------------------------------------------------------------------
(async () => {
  try { const hl = await (await fetch("/health")).json(); $("#workspace").textContent = hl.workspace; if (hl.auth && !KEY) await askKey(); } catch (e) { console.error(e); }
  const tab = location.hash.slice(1);
  showTab(loaders[tab] ? tab : "runs");
})();
