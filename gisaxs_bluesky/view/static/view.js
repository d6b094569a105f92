// gisaxs-bluesky live view: draws with plotly.js (served from the plotly wheel), updates from
// server-sent events (/api/events) fed by Tiled streaming or polling on the server side.
"use strict";
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                 "#7f7f7f", "#bcbd22", "#17becf"];
const view = window.gisaxsView = {
  key: null, rawUid: null, motor: "x", points: null, seenAt: {}, nFrames: 0, loads: 0,
  loadMs: null, status: null, frames: {}, bins: [], lastEventAt: null,
};
const $ = (id) => document.getElementById(id);
const colour = (b) => (b < 0 ? "#aaaaaa" : PALETTE[b % PALETTE.length]);
const fmt = (v, d = 2) => (v === null || v === undefined ? "" : (typeof v === "number" ? v.toFixed(d) : String(v)));
const esc = (s) => String(s ?? "").replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));

function banner(msg, ok = false, el = $("banner")) {
  if (!msg) { el.hidden = true; return; }
  el.hidden = false; el.textContent = msg; el.className = ok ? "banner ok" : "banner";
}

async function getJSON(url, opts) {
  const r = await fetch(url, opts);
  let body = null;
  try { body = await r.json(); } catch (e) { body = {error: `HTTP ${r.status} from ${url}`}; }
  if (!r.ok) { const err = new Error(body.error || body.detail || `HTTP ${r.status}`); err.status = r.status; throw err; }
  return body;
}

function showStatus(s) {
  view.status = s;
  const m = $("mode");
  const how = s.mode === "streaming" ? "live: Tiled streaming (websocket subscription)"
                                     : `live: polling every ${s.poll_interval_s} s`;
  m.textContent = how; m.title = s.mode_reason || "";
  m.className = "badge " + s.mode + (s.error ? " error" : "");
  m.dataset.mode = s.mode;
  if (s.error) banner(`Tiled problem (retrying): ${s.error}`); else if ($("banner").dataset.kind === "tiled") banner(null);
  $("banner").dataset.kind = s.error ? "tiled" : "";
  $("qserver").textContent = s.qserver
    ? `Accepted points are queued in the Queue Server at ${s.qserver} as plan ${s.plan}([${s.detectors.join(", ")}], motors, positions); `
      + (s.auto_budget === null ? "nothing is queued without an approval." : `auto-approval is ON: up to ${s.auto_budget} points per run without a person.`)
    : "No Queue Server configured (start the view with --qserver tcp://HOST:60615): decisions can be recorded, accepting needs a Queue Server.";
  $("embedding").querySelector('option[value="umap"]').textContent = s.umap ? "UMAP" : "UMAP (not installed)";
}

async function loadRuns() {
  let data;
  // a failed listing is a Tiled problem too: the next good status clears it
  try { data = await getJSON("api/runs"); } catch (e) { banner(e.message); $("banner").dataset.kind = "tiled"; return; }
  showStatus(data);
  const sel = $("run-picker"); const keep = view.key;
  sel.innerHTML = "";
  for (const r of data.runs) {
    const o = document.createElement("option");
    o.value = r.key; o.textContent = `scan ${r.scan_id ?? "?"} · ${r.raw_uid.slice(0, 8)} · ${r.model_id} · ${r.status} · ${r.n_frames} frames`;
    sel.appendChild(o);
  }
  const wanted = new URLSearchParams(location.search).get("run");
  if (wanted && !view.key && !view.triedWanted) { view.triedWanted = true; await loadRun(wanted); if (view.key) return; }
  if (!data.runs.length) { if (!wanted) $("run-info").textContent = "No binned runs in Tiled yet; waiting for the first one."; return; }
  let next = keep;
  if (wanted && !view.key) return;  // the asked-for run failed: keep its message on screen
  if ($("follow-latest").checked || !keep) next = data.runs[0].key;
  if (data.runs.some((r) => r.key === next)) sel.value = next;
  if (next !== view.key) await loadRun(next);
}

async function loadRun(key) {
  const t0 = performance.now();
  let data;
  try { data = await getJSON(`api/run/${encodeURIComponent(key)}?embedding=${$("embedding").value}`); }
  catch (e) { banner(e.message); $("run-info").textContent = ""; return; }
  banner(data.notice || null);
  view.serverMs = data.server_ms;
  view.key = data.key; view.rawUid = data.metadata.raw_uid; view.motor = data.motor;
  view.points = data.points; view.nFrames = data.n_frames;
  view.embedding = data.embedding; view.unplaced = 0;
  const now = Date.now();
  for (const s of data.points.seq_num) if (!(s in view.seenAt)) view.seenAt[s] = now;
  $("sampling").textContent = data.sampling + ".";
  $("embedding-note").textContent = data.embedding_error ? data.embedding_error :
    (data.embedding === "umap" ? "UMAP of the identity latent (fitted on load)" :
     `PCA of the ${data.identity_dim}-dim identity latent (basis fitted on load, new frames projected onto it)`);
  showRunInfo(data.metadata, data);
  loadSuggestions();
  drawPlots(); drawSummary(data);
  view.loads += 1; view.loadMs = performance.now() - t0;
}

function showRunInfo(md, s) {
  $("run-info").innerHTML = `raw run <code>${esc(md.raw_uid)}</code> · scan ${esc(md.scan_id)} · model <code>${esc(md.model_id)}</code> · status <b id="run-status">${esc(md.status)}</b> · <span id="n-frames">${s.n_frames}</span> frames · <span id="n-outliers">${s.n_outliers}</span> outliers`
    + (md.n_errors ? ` · <b>${md.n_errors} errors recorded</b>` : "");
}

function hover(p, i) {
  return `seq_num ${p.seq_num[i]}<br>${view.motor} ${fmt(p.x[i], 3)}<br>bin ${p.bin_id[i]}<br>outlier score ${fmt(p.outlier_score[i])}`
    + (p.is_outlier[i] ? ` (${p.why[i]})` : "") + `<br>noise: ${p.noise[i] || "none"}`;
}

function drawPlots() {
  const p = view.points; if (!p) return;
  const idx = p.seq_num.map((_, i) => i);
  const out = idx.filter((i) => p.is_outlier[i]);
  const text = idx.map((i) => hover(p, i));
  const colours = p.bin_id.map(colour);
  const base = {mode: "markers", type: "scatter", hoverinfo: "text"};
  const ring = (xs, ys) => ({...base, x: out.map((i) => xs[i]), y: out.map((i) => ys[i]), text: out.map((i) => text[i]),
    name: "outlier", marker: {size: 13, color: "rgba(0,0,0,0)", line: {color: "red", width: 2}}});
  const layout = (xt, yt) => ({margin: {l: 50, r: 10, t: 10, b: 40}, xaxis: {title: {text: xt}}, yaxis: {title: {text: yt}},
    showlegend: true, legend: {orientation: "h", y: 1.08}, uirevision: view.key});
  Plotly.react("bins-plot", [
    {...base, x: p.x, y: p.bin_id, text, name: "frame", marker: {size: 7, color: colours}},
    ring(p.x, p.bin_id)], layout(view.motor, "bin id"), {displaylogo: false, responsive: true});
  Plotly.react("latent-plot", [
    {...base, x: p.pc1, y: p.pc2, text, name: "frame", marker: {size: 7, color: colours}},
    ring(p.pc1, p.pc2)], layout("component 1", "component 2"), {displaylogo: false, responsive: true});
}

function drawSummary(s) {
  const nf = $("n-frames"); if (nf) nf.textContent = s.n_frames;
  const no = $("n-outliers"); if (no) no.textContent = s.n_outliers;
  view.nFrames = s.n_frames;
  view.bins = s.bins;
  const cards = $("bins");
  const seen = new Set();
  for (const b of s.bins) {
    seen.add(String(b.bin_id));
    let card = cards.querySelector(`[data-bin="${b.bin_id}"]`);
    if (!card) {
      card = document.createElement("div"); card.className = "bin-card"; card.dataset.bin = b.bin_id;
      card.innerHTML = `<div class="head"></div><div class="frame"></div><p class="caption note"></p>`;
      cards.appendChild(card);
    }
    const xr = b.x_range ? ` · ${view.motor} ${fmt(b.x_range[0], 1)}–${fmt(b.x_range[1], 1)}` : "";
    card.querySelector(".head").innerHTML = `<b style="color:${colour(b.bin_id)}">bin ${b.bin_id}</b> · ${b.count} frames${xr}<br>`
      + `${esc(b.structure || "structure ?")} · radius ${fmt(b.radius_nm, 1)} nm · distance ${fmt(b.distance_nm, 1)} nm<br>medoid seq_num ${b.medoid_seq}`;
    if (card.dataset.medoid !== String(b.medoid_seq)) { card.dataset.medoid = b.medoid_seq; loadFrame(card, b); }
  }
  for (const card of [...cards.children]) if (!seen.has(card.dataset.bin)) card.remove();
  $("bins-note").textContent = s.n_bins > s.bins.length ? `${s.n_bins} bins; the ${s.bins.length} most populated are shown.` : `${s.n_bins} bins.`;
  $("outliers").innerHTML = "<tr><th>seq_num</th><th>" + esc(view.motor) + "</th><th>bin</th><th>score</th><th>why</th><th>noise</th></tr>"
    + (s.outliers.length ? s.outliers.map((o) => `<tr><td>${o.seq_num}</td><td>${fmt(o.x, 3)}</td><td>${o.bin_id}</td><td>${fmt(o.outlier_score)}</td><td>${esc(o.why)}</td><td>${esc(o.noise)}</td></tr>`).join("")
       : `<tr><td colspan="6">none</td></tr>`);
  $("noise").innerHTML = "<tr><th>noise kind</th><th>frames (p ≥ 0.5)</th></tr>"
    + s.noise.map((n) => `<tr><td>${esc(n.kind)}</td><td>${n.frames}</td></tr>`).join("");
}

async function loadFrame(card, b) {
  const div = card.querySelector(".frame");
  const cap = card.querySelector(".caption");
  try {
    const f = await getJSON(`api/run/${encodeURIComponent(view.key)}/frame/${b.medoid_seq}`);
    view.frames[b.bin_id] = f;
    const q = f.coords === "q";
    const unit = q ? " nm⁻¹" : "";
    div.className = "frame";
    Plotly.react(div, [{z: f.z, x: f.x, y: f.y, type: "heatmap", colorscale: "Viridis", showscale: false,
                        hoverongaps: false,
                        hovertemplate: `${q ? "q_par" : "col"} %{x:.3f}${unit}<br>${q ? "q_z" : "row"} %{y:.3f}${unit}<br>${esc(f.value)} %{z}<extra></extra>`}],
      {margin: {l: 42, r: 4, t: 4, b: 34}, font: {size: 9},
       xaxis: {title: {text: f.x_title, standoff: 2}, showgrid: false, zeroline: false},
       yaxis: {title: {text: f.y_title, standoff: 2}, showgrid: false, zeroline: false, autorange: q ? true : "reversed",
               ...(q ? {scaleanchor: "x"} : {})}},
      {displayModeBar: false, staticPlot: false});
    cap.dataset.image = f.image; cap.dataset.coords = f.coords;
    cap.textContent = `${f.image === "denoised" ? `denoised by ${f.model_id}` : "raw frame"}, ${f.value}; `
      + (q ? `q axes from ${f.geometry_source}; ` : "") + f.binning + "."
      + (f.notes.length ? " " + f.notes.join("; ") + "." : "");
  } catch (e) { div.textContent = e.message; div.className = "frame note"; }
}

function applyRows(d) {
  if (d.key !== view.key || !view.points) return;
  const p = view.points;
  if (view.embedding === "umap") {
    // the rows' coordinates are PCA projections: a UMAP map places new frames only on a refit
    const n = d.points.seq_num.length;
    d.points.pc1 = Array(n).fill(null); d.points.pc2 = Array(n).fill(null);
    view.unplaced += n;
    $("embedding-note").textContent = `UMAP of the identity latent (fitted on load); ${view.unplaced} newer frames not on this map yet (refitted when the run has grown by half, or on reload)`;
  }
  for (const col of Object.keys(p)) if (d.points[col]) p[col].push(...d.points[col]);
  drawPlots(); drawSummary(d);
  const now = Date.now();
  for (const s of d.points.seq_num) if (!(s in view.seenAt)) view.seenAt[s] = now;
}

async function loadSuggestions() {
  if (!view.rawUid) return;
  let data;
  try { data = await getJSON(`api/suggestions/${encodeURIComponent(view.rawUid)}`); }
  catch (e) { $("suggestions").innerHTML = `<tr><td>${esc(e.message)}</td></tr>`; return; }
  const rows = data.suggestions;
  if (!rows.length) { $("suggestions").innerHTML = `<tr><td>${esc(data.notice || "no suggestions for this run yet")}</td></tr>`; return; }
  $("suggestions").innerHTML = "<tr><th>id</th><th>round</th><th>position</th><th>reason</th><th>priority</th><th>decision</th><th></th></tr>"
    + rows.map((s) => {
      const pos = Object.entries(s.position).map(([k, v]) => `${esc(k)}=${fmt(v, 3)}`).join(", ");
      const d = s.decision;
      const state = d ? `${d.decision} by ${esc(d.who)} at ${new Date(d.time * 1000).toLocaleTimeString()}` + (d.item_uid ? ` (queue item ${esc(d.item_uid.slice(0, 8))})` : "") : "undecided";
      const buttons = d ? "" : `<button data-act="accept" data-id="${s.suggestion_id}">accept</button> <button data-act="reject" data-id="${s.suggestion_id}">reject</button>`;
      return `<tr data-id="${s.suggestion_id}"><td><code>${s.suggestion_id}</code></td><td>${s.round}</td><td>${pos}</td><td>${esc(s.reason)}</td><td>${fmt(s.priority)}</td><td class="decision">${state}</td><td>${buttons}</td></tr>`;
    }).join("");
}

async function decide(sid, act) {
  const body = {raw_uid: view.rawUid, suggestion_id: sid, decision: act, who: $("who").value};
  try {
    const rec = await getJSON("api/decide", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    banner(`${rec.decision} ${sid}` + (rec.item_uid ? ` → queue item ${rec.item_uid}` : "") + `; decision stored in ${rec.stored}`, true, $("decision-msg"));
  } catch (e) { banner(e.message, false, $("decision-msg")); }
  loadSuggestions();
}

$("suggestions").addEventListener("click", (ev) => {
  const b = ev.target.closest("button[data-act]"); if (b) { b.disabled = true; decide(b.dataset.id, b.dataset.act); }
});
$("run-picker").addEventListener("change", (ev) => { $("follow-latest").checked = false; loadRun(ev.target.value); });
$("embedding").addEventListener("change", () => view.key && loadRun(view.key));
$("who").value = localStorage.getItem("gisaxs-who") || "";
$("who").addEventListener("change", () => localStorage.setItem("gisaxs-who", $("who").value));

function connectEvents() {
  const es = new EventSource("api/events");
  const on = (name, fn) => es.addEventListener(name, (ev) => { view.lastEventAt = Date.now(); fn(JSON.parse(ev.data)); });
  on("status", showStatus);
  on("runs", () => loadRuns());
  on("rows", applyRows);
  on("reload", (d) => { if (d.key === view.key) loadRun(view.key); });
  on("meta", (md) => { if (md.key === view.key) { const s = $("run-status"); if (s) s.textContent = md.status; } });
  on("suggestions", (d) => { if (d.raw_uid === view.rawUid) loadSuggestions(); });
  es.onerror = () => { view.disconnected = true; const m = $("mode"); m.textContent = "view server unreachable, reconnecting..."; m.className = "badge error"; };
  es.onopen = () => { if (view.disconnected && view.key) { view.disconnected = false; loadRun(view.key); } };
}

loadRuns().then(connectEvents);
