"""The dashboard served at ``/``: one self-contained HTML page (no CDN, no build step; charts are inline SVG).

It lists the runs (live progress while one runs, through the run's server-sent events), and for the selected
run (``#run=ID``; by default the newest that succeeded) draws dense-vs-compressed bar charts of throughput,
latency and memory with the compressed / dense ratio, plus the full metric table. Each chart is an
``<svg class="chart" data-metric=KEY data-dense=V data-compressed=V data-ratio=R>`` holding one
``<rect class="bar" data-model=dense|compressed data-value=V>`` per model (and a dot per repeat), so tests and
scripts can read what was drawn. ``#charts`` gets ``data-state="drawn"`` and ``data-run`` once it is complete.
"""

PAGE = (r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>a3-bench-server</title>
<link rel="icon" href="data:,">
<style>
  :root { --fg: #1d2430; --muted: #667085; --line: #e3e6eb; --bg: #ffffff; --panel: #f7f8fa;
          --dense: #8c8c8c; --compressed: #1f77b4; --good: #1a7f37; --bad: #c0362c; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
         color: var(--fg); background: var(--bg); }
  header { display: flex; align-items: baseline; gap: 16px; padding: 12px 24px; border-bottom: 1px solid var(--line); }
  header h1 { font-size: 18px; margin: 0; }
  header .muted { font-size: 13px; }
  main { padding: 8px 24px 40px; max-width: 1280px; }
  h2 { font-size: 16px; margin: 20px 0 8px; }
  h3 { font-size: 14px; margin: 16px 0 6px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
  .muted { color: var(--muted); }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
  th { font-weight: 600; font-size: 12px; color: var(--muted); }
  td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
  tr.run { cursor: pointer; }
  tr.run:hover { background: var(--panel); }
  tr.run.selected { background: #eaf2fb; }
  code, .path { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; word-break: break-all; }
  .badge { display: inline-block; padding: 0 8px; border-radius: 10px; font-size: 12px; font-weight: 600; color: #fff; }
  .badge.queued { background: #8c8c8c; } .badge.running { background: #1f77b4; }
  .badge.succeeded { background: var(--good); } .badge.failed { background: var(--bad); }
  .badge.cancelled { background: #9a6700; } .badge.interrupted { background: #6f42c1; }
  .bar-outer { width: 140px; height: 8px; background: var(--line); border-radius: 4px; overflow: hidden;
               display: inline-block; vertical-align: middle; }
  .bar-inner { height: 100%; background: var(--compressed); }
  .error { color: var(--bad); }
  .good { fill: var(--good); color: var(--good); } .bad { fill: var(--bad); color: var(--bad); }
  .charts { display: flex; flex-wrap: wrap; gap: 12px; }
  svg.chart { background: var(--panel); border: 1px solid var(--line); border-radius: 6px; }
  svg.chart text { font: 11px system-ui, "DejaVu Sans", sans-serif; fill: var(--fg); }
  svg.chart text.title { font-weight: 600; }
  svg.chart text.ratio { font-weight: 700; font-size: 12px; }
  .legend span { display: inline-block; width: 10px; height: 10px; margin: 0 4px 0 12px; vertical-align: middle; }
  .links a { margin-right: 14px; }
  button { font: inherit; padding: 2px 10px; border: 1px solid var(--line); background: #fff; border-radius: 4px;
           cursor: pointer; }
  button:hover { background: var(--panel); }
  form.new-run { display: grid; grid-template-columns: repeat(4, minmax(140px, 1fr)); gap: 8px 12px; padding: 10px 0; }
  form.new-run label { display: flex; flex-direction: column; font-size: 12px; color: var(--muted); }
  form.new-run label.wide { grid-column: span 2; }
  form.new-run input, form.new-run select { font: inherit; padding: 3px 6px; border: 1px solid var(--line);
                                            border-radius: 4px; color: var(--fg); }
  details summary { cursor: pointer; font-weight: 600; margin-top: 16px; }
  dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 6px 0 10px; }
  dl.meta dt { color: var(--muted); } dl.meta dd { margin: 0; }
  #metrics-table { margin-top: 18px; max-width: 900px; }
</style>
</head>
<body>
<header><h1>a3-bench-server</h1><span id="health" class="muted">connecting…</span></header>
<main>
  <p id="auth-msg" class="error" hidden>This service needs its token: open <code>/?token=YOUR_TOKEN</code> once.</p>
  <section>
    <h2>Runs</h2>
    <table id="runs">
      <thead><tr><th>run</th><th>status</th><th>models</th><th>engine</th><th>created</th><th>progress</th>
        <th class="num">output tok/s</th><th class="num">KV capacity</th><th class="num">peak RSS</th><th></th></tr>
      </thead>
      <tbody></tbody>
    </table>
    <p id="runs-empty" class="muted" hidden>No runs yet: start one below, or <code>POST /runs</code>
      (see <a href="/docs">/docs</a>).</p>
  </section>
  <details id="new-run">
    <summary>New run</summary>
    <form class="new-run" id="new-run-form">
      <label class="wide">dense model folder<input name="dense" required placeholder="/path/to/dense"></label>
      <label class="wide">compressed model folder<input name="compressed" required
                                                        placeholder="/path/to/compressed"></label>
      <label>engine<select name="engine"><option>vllm</option><option>hf</option></select></label>
      <label>prompts<input name="num_prompts" type="number" min="1" value="32"></label>
      <label>input tokens<input name="input_len" type="number" min="1" value="128"></label>
      <label>output tokens<input name="output_len" type="number" min="1" value="128"></label>
      <label>repeats<input name="repeats" type="number" min="1" value="2"></label>
      <label>label<input name="label" maxlength="200"></label>
      <label title="measure the two folders even if their tokenizers or vocabularies differ or the compressed """
    # the title attribute cannot wrap: the page continues in the next literal, with no byte added
    r"""model is not an export of the dense one">allow mismatch<input name="allow_mismatch" type="checkbox"></label>
      <label>&nbsp;<button type="submit">Start</button></label>
    </form>
    <p id="new-run-msg"></p>
  </details>
  <section id="detail" hidden>
    <h2 id="detail-title"></h2>
    <dl class="meta" id="detail-meta"></dl>
    <p id="detail-progress"></p>
    <p id="detail-error" class="error" hidden></p>
    <p class="links" id="detail-links"></p>
    <div class="legend muted" id="legend" hidden>compressed / dense ratio above each chart; bars are medians, dots
      single repeats
      <span style="background: var(--dense)"></span>dense<span
        style="background: var(--compressed)"></span>compressed</div>
    <div id="charts" data-state="empty"></div>
    <table id="metrics-table" hidden>
      <thead><tr><th>metric</th><th class="num">dense</th><th class="num">compressed</th>
        <th class="num">compressed / dense</th></tr></thead>
      <tbody></tbody>
    </table>
  </section>
</main>
<script>
"use strict";
const SVGNS = "http://www.w3.org/2000/svg";
const ACTIVE = new Set(["queued", "running"]);
const GROUPS = [
  ["Throughput", ["output_tokens_per_s", "total_tokens_per_s", "requests_per_s"]],
  ["Latency", ["ttft_ms_median", "tpot_ms_median", "itl_ms_median", "elapsed_s"]],
  ["Memory", ["peak_rss_bytes", "kv_cache_tokens", "max_concurrency", "weight_bytes", "kv_bytes_per_token",
              "peak_gpu_bytes"]],
  ["Engine", ["running_saturated_mean", "running_max", "saturated_output_tokens_per_s", "preemptions"]],
  ["Quality", ["perplexity"]],
];
let runs = [];
let selected = null;      // run id shown in the detail section
let shownRevision = null; // what the detail section shows: id + status + done
let source = null;        // EventSource of the selected active run
let listTimer = null;

function $(sel) { return document.querySelector(sel); }
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const kid of kids)
    if (kid !== null && kid !== undefined) e.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  return e;
}
function svgEl(tag, attrs, text) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}
async function api(path, opts) {
  const resp = await fetch(path, Object.assign({credentials: "same-origin", headers: {"Accept": "application/json"}},
                                               opts || {}));
  if (resp.status === 401) { $("#auth-msg").hidden = false; throw new Error("unauthorized"); }
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (!resp.ok) {
    const msg = body ? (body.message || (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)))
                     : resp.statusText;
    throw new Error(msg || ("HTTP " + resp.status));
  }
  return body;
}
function fmtValue(meta, v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (meta && meta.unit === "bytes")
    return v < 2 ** 30 ? (v / 2 ** 20).toFixed(1) + " MiB" : (v / 2 ** 30).toFixed(2) + " GiB";
  const a = Math.abs(v);
  const digits = a >= 1000 ? 0 : a >= 100 ? 1 : a >= 10 ? 2 : 3;
  return v.toLocaleString("en-US", {maximumFractionDigits: digits});
}
function unitOf(meta) { return meta.unit && meta.unit !== "bytes" ? meta.unit : ""; }
function ratioIsGood(meta, r) { return meta.better === "lower" ? r <= 1 : r >= 1; }
function shortPath(p) { const parts = String(p || "").split("/").filter(Boolean); return parts.slice(-1)[0] || p; }
function when(iso) { return iso ? new Date(iso).toLocaleString() : "–"; }
function metaMap(results) {
  const m = {};
  for (const meta of (results && results.metrics) || []) m[meta.key] = meta;
  return m;
}

// ---- the run list -----------------------------------------------------------------------------------
function progressCell(run) {
  const p = run.progress || {};
  if (run.status === "running" || run.status === "queued") {
    const frac = p.total ? Math.min(1, p.done / p.total) : 0;
    return el("td", {class: "progress"},
      el("span", {class: "bar-outer"},
         el("span", {class: "bar-inner", style: "width:" + (100 * frac).toFixed(1) + "%; display:block"})),
      " ", p.total ? p.done + "/" + p.total : "", " ", el("span", {class: "muted"}, p.message || ""));
  }
  if (run.error) return el("td", {class: "error"}, run.error.length > 140 ? run.error.slice(0, 140) + "…" : run.error);
  return el("td", {class: "muted"}, p.message || "");
}
function ratioCell(run, key) {
  const r = run.ratios && run.ratios[key];
  if (r === undefined || r === null) return el("td", {class: "num muted"}, "–");
  const better = (key === "peak_rss_bytes") ? r <= 1 : r >= 1;
  return el("td", {class: "num " + (better ? "good" : "bad")}, r.toFixed(2) + "x");
}
function renderList() {
  const body = $("#runs tbody");
  body.replaceChildren();
  $("#runs-empty").hidden = runs.length > 0;
  for (const run of runs) {
    const actions = el("td", {});
    if (ACTIVE.has(run.status))
      actions.append(el("button", {class: "cancel", onclick: (ev) => { ev.stopPropagation(); cancelRun(run.id); }},
                        "cancel"));
    const tr = el("tr", {class: "run" + (run.id === selected ? " selected" : ""), "data-run": run.id,
                         "data-status": run.status, onclick: () => select(run.id)},
      el("td", {}, el("code", {}, run.id), run.label ? el("div", {class: "muted"}, run.label) : null),
      el("td", {}, el("span", {class: "badge " + run.status}, run.status)),
      el("td", {class: "path", title: run.dense + "\n" + run.compressed}, shortPath(run.dense), " → ",
         shortPath(run.compressed)),
      el("td", {}, run.engine),
      el("td", {class: "muted"}, when(run.created)),
      progressCell(run),
      ratioCell(run, "output_tokens_per_s"), ratioCell(run, "kv_cache_tokens"), ratioCell(run, "peak_rss_bytes"),
      actions);
    body.append(tr);
  }
}
async function refreshList() {
  clearTimeout(listTimer);
  try {
    const [list, health] = await Promise.all([api("/runs?limit=200"), api("/healthz")]);
    runs = list.runs;
    $("#health").textContent = "a3-serve " + health.version + " · worker " + (health.worker_busy ? "busy" : "idle") +
      " · " + health.queue_length + " queued";
    if (!selected) {
      const fromHash = (location.hash.match(/run=([A-Za-z0-9_-]+)/) || [])[1];
      const pick = fromHash || (runs.find((r) => r.status === "succeeded") || runs[0] || {}).id;
      if (pick) { selected = pick; }
    }
    renderList();
    if (selected) await showDetail(selected, false);
  } catch (err) {
    $("#health").textContent = "error: " + err.message;
  }
  const busy = runs.some((r) => ACTIVE.has(r.status));
  listTimer = setTimeout(refreshList, busy ? 3000 : 15000);
}
async function cancelRun(id) {
  try { await api("/runs/" + id + "/cancel", {method: "POST"}); }
  catch (err) { alert("cancel failed: " + err.message); }
  refreshList();
}
function select(id) {
  selected = id;
  history.replaceState(null, "", "#run=" + id);
  shownRevision = null;
  renderList();
  showDetail(id, true);
}

// ---- one run ----------------------------------------------------------------------------------------
async function showDetail(id, force) {
  let run;
  try { run = await api("/runs/" + id); } catch (err) { return; }
  const rev = run.id + ":" + run.status + ":" + (run.progress && run.progress.done) + ":" +
              (run.progress && run.progress.message);
  if (!force && rev === shownRevision) return;
  shownRevision = rev;
  $("#detail").hidden = false;
  $("#detail-title").replaceChildren("Run ", el("code", {}, run.id), " ",
                                     el("span", {class: "badge " + run.status}, run.status),
                                     run.label ? " " + run.label : "");
  const w = run.request.workload || {};
  const meta = $("#detail-meta");
  meta.replaceChildren();
  const quant = (run.results && run.results.config && run.results.config.quantization) || {};
  const scheme = (name) => quant[name] ? " (quantized: " + quant[name].scheme +
    (quant[name].group_size ? ", group " + quant[name].group_size : "") + ")" : "";
  const rows = [["dense", run.dense + scheme("dense")], ["compressed", run.compressed + scheme("compressed")],
    ["workload", w.num_prompts + " requests × " + w.input_len + " input + " + w.output_len + " output tokens, " +
                 w.repeats + " repeat(s), engine " + run.engine + ", dtype " + w.dtype],
    ["created", when(run.created)], ["finished", when(run.finished)]];
  if (run.results && run.results.environment) rows.push(["machine", run.results.environment.machine || "?"]);
  for (const [k, v] of rows)
    meta.append(el("dt", {}, k), el("dd", {class: k === "dense" || k === "compressed" ? "path" : ""}, v));
  const p = run.progress || {};
  $("#detail-progress").textContent = ACTIVE.has(run.status)
    ? "progress: " + (p.total ? p.done + "/" + p.total : "starting") + (p.message ? " · " + p.message : "") : "";
  $("#detail-error").hidden = !run.error;
  $("#detail-error").textContent = run.error || "";
  const links = $("#detail-links");
  links.replaceChildren();
  if (run.status === "succeeded") {
    links.append(el("a", {href: run.links.report_json}, "report.json"),
                 el("a", {href: run.links.report_md}, "report.md"),
                 el("a", {href: run.links.report_png}, "report.png"));
  }
  links.append(el("a", {href: run.links.log}, "worker log"));
  drawResults(run);
  followEvents(run);
}
function followEvents(run) {
  if (source && source.runId !== run.id) { source.close(); source = null; }
  if (!ACTIVE.has(run.status) || source || typeof EventSource === "undefined") return;
  source = new EventSource(run.links.events);
  source.runId = run.id;
  source.addEventListener("run", (ev) => {
    const s = JSON.parse(ev.data);
    const i = runs.findIndex((r) => r.id === s.id);
    if (i >= 0) { runs[i] = s; renderList(); }
    if (s.id === selected) showDetail(s.id, false);
  });
  source.addEventListener("end", () => { source.close(); source = null; refreshList(); });
  source.onerror = () => { if (source) { source.close(); source = null; } };
}
function drawResults(run) {
  const box = $("#charts");
  const table = $("#metrics-table");
  box.replaceChildren();
  table.querySelector("tbody").replaceChildren();
  const res = run.results;
  if (!res || !res.models) {
    box.dataset.state = "empty"; box.dataset.run = run.id; table.hidden = true; $("#legend").hidden = true;
    return;
  }
  const metas = metaMap(res);
  const d = res.models.dense, c = res.models.compressed;
  let drawn = 0;
  for (const [title, keys] of GROUPS) {
    const present = keys.filter((k) => metas[k] && d.median[k] !== undefined && c.median[k] !== undefined);
    if (!present.length) continue;
    const group = el("div", {class: "charts", "data-group": title.toLowerCase()});
    for (const k of present) {
      group.append(chart(metas[k], d.median[k], c.median[k], (d.runs || []).map((r) => r[k]),
                         (c.runs || []).map((r) => r[k])));
      drawn++;
    }
    box.append(el("h3", {}, title), group);
  }
  const tbody = table.querySelector("tbody");
  for (const meta of res.metrics || []) {
    const r = res.ratios ? res.ratios[meta.key] : undefined;
    const unit = unitOf(meta);
    tbody.append(el("tr", {"data-metric": meta.key},
      el("td", {}, meta.label + (unit ? " (" + unit + ")" : "")),
      el("td", {class: "num"}, fmtValue(meta, d.median[meta.key])),
      el("td", {class: "num"}, fmtValue(meta, c.median[meta.key])),
      el("td", {class: "num " + (r === undefined ? "muted" : ratioIsGood(meta, r) ? "good" : "bad")},
         r === undefined ? "–" : r.toFixed(3) + "x")));
  }
  table.hidden = false;
  $("#legend").hidden = drawn === 0;
  box.dataset.run = run.id;
  box.dataset.charts = String(drawn);
  box.dataset.state = "drawn";
}
function chart(meta, dense, comp, denseRuns, compRuns) {
  const W = 250, H = 200, top = 46, bottom = 26, barW = 64, xs = [40, 146];
  const values = [dense, comp, ...denseRuns, ...compRuns].filter((v) => typeof v === "number" && Number.isFinite(v));
  const max = Math.max(...values, 0) || 1;
  const scale = (H - top - bottom) / (max * 1.1);
  const ratio = dense ? comp / dense : NaN;
  const svg = svgEl("svg", {class: "chart", width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img",
    "aria-label": meta.label + ": dense " + fmtValue(meta, dense) + ", compressed " + fmtValue(meta, comp),
    "data-metric": meta.key, "data-dense": dense, "data-compressed": comp,
    "data-ratio": Number.isFinite(ratio) ? ratio : "",
    "data-better": meta.better});
  const unit = unitOf(meta);
  const fullTitle = meta.label + (unit ? " (" + unit + ")" : "");
  svg.append(svgEl("title", {}, fullTitle));
  svg.append(svgEl("text", {class: "title", x: 10, y: 16},
                   fullTitle.length > 36 ? fullTitle.slice(0, 34) + "…" : fullTitle));
  if (Number.isFinite(ratio)) {
    svg.append(svgEl("text", {class: "ratio " + (ratioIsGood(meta, ratio) ? "good" : "bad"), x: 10, y: 33},
      ratio.toFixed(2) + "x " + (meta.better === "lower" ? "(lower is better)" : "(higher is better)")));
  }
  const base = H - bottom;
  const models = [["dense", dense, "var(--dense)", "#8c8c8c", denseRuns],
                  ["compressed", comp, "var(--compressed)", "#1f77b4", compRuns]];
  models.forEach(([name, v, _css, color, reps], i) => {
    const h = Math.max(1, v * scale);
    svg.append(svgEl("rect", {class: "bar bar-" + name, "data-model": name, "data-value": v, x: xs[i], y: base - h,
                              width: barW, height: h, fill: color, rx: 2}));
    svg.append(svgEl("text", {x: xs[i] + barW / 2, y: base - h - 4, "text-anchor": "middle"}, fmtValue(meta, v)));
    svg.append(svgEl("text", {x: xs[i] + barW / 2, y: base + 16, "text-anchor": "middle", class: "muted"}, name));
    reps.forEach((rv, j) => {
      if (typeof rv !== "number") return;
      const off = reps.length > 1 ? (j / (reps.length - 1) - 0.5) * (barW * 0.5) : 0;
      svg.append(svgEl("circle", {class: "pt", "data-model": name, cx: xs[i] + barW / 2 + off, cy: base - rv * scale,
                                  r: 2.5, fill: "#1d2430", "fill-opacity": 0.55}));
    });
  });
  svg.append(svgEl("line", {x1: 20, x2: W - 20, y1: base, y2: base, stroke: "#98a2b3"}));
  return svg;
}

// ---- new run ----------------------------------------------------------------------------------------
$("#new-run-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const f = new FormData(ev.target);
  const body = {dense: f.get("dense"), compressed: f.get("compressed"), engine: f.get("engine"),
    workload: {num_prompts: +f.get("num_prompts"), input_len: +f.get("input_len"), output_len: +f.get("output_len"),
               repeats: +f.get("repeats")}};
  if (f.get("label")) body.label = f.get("label");
  if (f.get("allow_mismatch")) body.allow_mismatch = true;
  const msg = $("#new-run-msg");
  try {
    const run = await api("/runs", {method: "POST",
                                    headers: {"Content-Type": "application/json", "Accept": "application/json"},
                                    body: JSON.stringify(body)});
    msg.className = "muted"; msg.textContent = "queued run " + run.id;
    select(run.id);
    refreshList();
  } catch (err) {
    msg.className = "error"; msg.textContent = err.message;
  }
});
window.addEventListener("hashchange", () => {
  const id = (location.hash.match(/run=([A-Za-z0-9_-]+)/) || [])[1];
  if (id && id !== selected) select(id);
});
refreshList();
</script>
</body>
</html>
""")

UNAUTHORIZED_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>a3-bench-server: token needed</title></head>
<body style="font: 15px system-ui, sans-serif; margin: 40px">
<h1 style="font-size: 18px">a3-bench-server needs its token</h1>
<p>Open <code>/?token=YOUR_TOKEN</code> once (the server's <code>--token</code> or <code>A3_BENCH_TOKEN</code>); the
page then remembers it in a cookie. API clients send <code>Authorization: Bearer YOUR_TOKEN</code>.</p>
</body></html>
"""
