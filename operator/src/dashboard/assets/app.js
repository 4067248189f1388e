// Trellis dashboard: polls /api/graph once a second, draws the service graph as SVG by hand,
// lists every edge in a table, and keeps the last minutes of each edge's numbers for the
// charts in the details pane. No library, no build step.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const HISTORY_MS = 5 * 60 * 1000;
const history = new Map(); // edge id -> [{t, rps, success, p99}]
let selected = null;       // {kind: "node"|"edge", id}
let latest = null;

const edgeId = (e) => e.source + "->" + e.destination;
const pct = (x) => (x == null ? "–" : (x * 100).toFixed(1) + " %");
const ms = (x) => (x == null ? "–" : x < 10 ? x.toFixed(2) + " ms" : x.toFixed(0) + " ms");
const rps = (x) => x.toFixed(1) + " rps";

function el(name, attrs, parent, ns) {
  const e = ns ? document.createElementNS(SVG, name) : document.createElement(name);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  if (parent) parent.appendChild(e);
  return e;
}
const svg = (name, attrs, parent) => el(name, attrs, parent, true);

function health(e) {
  if (e.transport === "refused") return "refused";
  if (e.transport === "plaintext") return "plaintext";
  if (e.success == null) return "idle";
  return e.success >= 0.99 ? "ok" : e.success >= 0.95 ? "warn" : "bad";
}

function edgeLabel(e) {
  const parts = [pct(e.success), rps(e.rps)];
  if (e.transport === "mtls") parts.push("mTLS");
  if (e.transport === "plaintext") parts.unshift("plaintext");
  if (e.transport === "refused") parts.unshift("\u2715 refused");
  return parts.join(" \u00b7 ");
}

// Columns by longest call depth; rows in order of appearance; namespaces boxed.
// A split's other backends are drawn as thin edges from the caller, labelled with weights.
function splitEdges(g) {
  const out = [];
  for (const e of g.edges) {
    for (const s of e.split) {
      if (s.backend !== e.destination) out.push({ source: e.source, destination: s.backend, parent: e, share: s });
    }
  }
  return out;
}

function layout(g) {
  const ids = new Set(g.nodes.map((n) => n.id));
  const all = g.edges.concat(splitEdges(g));
  for (const e of all) { ids.add(e.source); ids.add(e.destination); }
  const depth = new Map([...ids].map((id) => [id, 0]));
  for (let i = 0; i < ids.size; i++) {
    for (const e of all) {
      if (e.source !== e.destination && depth.get(e.destination) < depth.get(e.source) + 1) {
        depth.set(e.destination, Math.min(depth.get(e.source) + 1, ids.size));
      }
    }
  }
  const byNs = [...ids].sort((a, b) => (a.split(".")[1] || "").localeCompare(b.split(".")[1] || "") || a.localeCompare(b));
  const rows = new Map();
  const pos = new Map();
  for (const id of byNs) {
    const d = depth.get(id);
    const r = rows.get(d) || 0;
    rows.set(d, r + 1);
    pos.set(id, { x: 40 + d * 400, y: 60 + r * 110 });
  }
  return pos;
}

// A padlock drawn on the middle of an mTLS edge.
function padlock(parent, x, y) {
  const g = svg("g", { class: "padlock", transform: `translate(${x - 8},${y - 8})` }, parent);
  svg("circle", { cx: 8, cy: 8, r: 9 }, g);
  svg("path", { class: "shackle", d: "M5,7 V5 a3,3 0 0 1 6,0 V7" }, g);
  svg("rect", { x: 3.5, y: 7, width: 9, height: 6.5, rx: 1 }, g);
  return g;
}

function drawGraph(g) {
  const root = document.getElementById("graph");
  root.replaceChildren();
  const defs = svg("defs", {}, root);
  const marker = svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "10", refY: "5", markerWidth: "7", markerHeight: "7", orient: "auto-start-reverse" }, defs);
  svg("path", { d: "M0,0 L10,5 L0,10 z", fill: "#5a6b85" }, marker);
  const pos = layout(g);
  const W = 150, H = 44;
  let maxX = 0, maxY = 0;
  for (const p of pos.values()) { maxX = Math.max(maxX, p.x + W); maxY = Math.max(maxY, p.y + H); }
  root.setAttribute("viewBox", `0 0 ${maxX + 40} ${maxY + 40}`);

  const nodes = new Map(g.nodes.map((n) => [n.id, n]));
  const namespaces = new Map();
  for (const [id, p] of pos) {
    const ns = id.split(".")[1] || "";
    const b = namespaces.get(ns) || { x0: Infinity, y0: Infinity, x1: -Infinity, y1: -Infinity };
    namespaces.set(ns, { x0: Math.min(b.x0, p.x), y0: Math.min(b.y0, p.y), x1: Math.max(b.x1, p.x + W), y1: Math.max(b.y1, p.y + H) });
  }
  for (const [ns, b] of namespaces) {
    svg("rect", { class: "ns-box", x: b.x0 - 18, y: b.y0 - 30, width: b.x1 - b.x0 + 36, height: b.y1 - b.y0 + 48, rx: 10 }, root);
    svg("text", { class: "ns-label", x: b.x0 - 8, y: b.y0 - 12, text: "namespace " + ns }, root);
  }

  const curve = (a, b) => {
    const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2;
    const mx = (x1 + x2) / 2;
    return { d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`, mx, my: (y1 + y2) / 2 };
  };
  for (const s of splitEdges(g)) {
    const a = pos.get(s.source), b = pos.get(s.destination);
    if (!a || !b) continue;
    const c = curve(a, b);
    const grp = svg("g", { class: "edge split", "data-split": s.source + "->" + s.destination }, root);
    svg("path", { d: c.d, "marker-end": "url(#arrow)" }, grp);
    svg("text", { x: c.mx, y: c.my + 16, "text-anchor": "middle", text: `split of ${s.parent.destination.split(".")[0]}: weight ${s.share.weight}, ${pct(s.share.observed)}` }, grp);
    grp.addEventListener("click", () => select("edge", edgeId(s.parent)));
  }
  for (const e of g.edges) {
    const a = pos.get(e.source), b = pos.get(e.destination);
    if (!a || !b) continue;
    const c = curve(a, b);
    const grp = svg("g", { class: "edge " + health(e) + (isSelected("edge", edgeId(e)) ? " selected" : ""), "data-edge": edgeId(e), "data-transport": e.transport }, root);
    svg("path", { d: c.d, "marker-end": "url(#arrow)" }, grp);
    svg("text", { class: "edge-label", x: c.mx, y: c.my - 12, "text-anchor": "middle", text: edgeLabel(e) }, grp);
    if (e.transport === "mtls") padlock(grp, c.mx, c.my);
    if (e.split.length) {
      const own = e.split.find((s) => s.backend === e.destination);
      if (own) svg("text", { x: c.mx, y: c.my + 16, "text-anchor": "middle", class: "split-label", text: `split: weight ${own.weight}, ${pct(own.observed)}` }, grp);
    }
    grp.addEventListener("click", () => select("edge", edgeId(e)));
  }

  for (const [id, p] of pos) {
    const n = nodes.get(id) || { id, name: id.split(".")[0], namespace: id.split(".")[1] || "", meshed: false };
    const grp = svg("g", { class: "node" + (n.meshed ? "" : " unmeshed") + (isSelected("node", id) ? " selected" : ""), "data-node": id, transform: `translate(${p.x},${p.y})` }, root);
    svg("rect", { width: W, height: H, rx: 6 }, grp);
    svg("text", { x: 10, y: 18, text: n.name }, grp);
    svg("text", { class: "sub", x: 10, y: 35, text: n.meshed ? "meshed" + (n.refusedRps > 0 ? ` \u00b7 refusing ${n.refusedRps.toFixed(1)}/s` : "") : "no sidecar" }, grp);
    grp.addEventListener("click", () => select("node", id));
  }
}

function drawTable(g) {
  const body = document.querySelector("#edges tbody");
  body.replaceChildren();
  for (const e of g.edges) {
    const tr = el("tr", { class: "edge-row " + e.transport, "data-edge": edgeId(e), "data-transport": e.transport }, body);
    el("td", { text: e.source }, tr);
    el("td", { text: e.destination }, tr);
    el("td", { class: "transport", text: e.transport === "mtls" ? "mTLS" : e.transport === "refused" ? "plaintext, refused" : "plaintext" }, tr);
    el("td", { text: e.rps.toFixed(1) }, tr);
    el("td", { class: "success", text: pct(e.success) }, tr);
    el("td", { text: ms(e.p50Ms) }, tr);
    el("td", { text: ms(e.p99Ms) }, tr);
    el("td", { text: e.split.map((s) => `${s.backend} ${s.weight}` + (s.observed == null ? "" : ` (${pct(s.observed)})`)).join(", ") }, tr);
    tr.addEventListener("click", () => select("edge", edgeId(e)));
  }
}

function chart(parent, title, points, fmt) {
  el("div", { text: title }, parent);
  const w = 300, h = 60;
  const c = svg("svg", { class: "chart", width: w, height: h, viewBox: `0 0 ${w} ${h}` }, parent);
  const vals = points.filter((p) => p.v != null);
  if (vals.length < 2) { svg("text", { x: 6, y: 34, text: "collecting…" }, c); return; }
  const t0 = vals[0].t, t1 = vals[vals.length - 1].t;
  const max = Math.max(...vals.map((p) => p.v), 1e-9);
  const pts = vals.map((p) => `${((p.t - t0) / Math.max(t1 - t0, 1)) * (w - 8) + 4},${h - 6 - (p.v / max) * (h - 18)}`).join(" ");
  svg("polyline", { points: pts }, c);
  svg("text", { x: 4, y: 10, text: "max " + fmt(max) + " · now " + fmt(vals[vals.length - 1].v) }, c);
}

function dl(parent, rows) {
  const d = el("dl", {}, parent);
  for (const [k, v] of rows) { el("dt", { text: k }, d); el("dd", { text: v }, d); }
}

function drawDetails(g) {
  const pane = document.getElementById("details");
  if (!selected) return;
  pane.replaceChildren();
  if (selected.kind === "edge") {
    const e = g.edges.find((x) => edgeId(x) === selected.id);
    if (!e) return;
    el("h2", { text: e.source + " \u2192 " + e.destination }, pane);
    dl(pane, [["transport", e.transport], ["requests/s", e.rps.toFixed(2)], ["success", pct(e.success)], ["p50", ms(e.p50Ms)], ["p99", ms(e.p99Ms)], ["requests since start", String(e.totalRequests)]]);
    if (e.split.length) dl(pane, e.split.map((s) => ["split " + s.backend, `weight ${s.weight}, observed ${pct(s.observed)}`]));
    const h = history.get(selected.id) || [];
    chart(pane, "requests/s", h.map((p) => ({ t: p.t, v: p.rps })), (v) => v.toFixed(1));
    chart(pane, "success rate", h.map((p) => ({ t: p.t, v: p.success })), pct);
    chart(pane, "p99 latency", h.map((p) => ({ t: p.t, v: p.p99 })), ms);
  } else {
    const n = g.nodes.find((x) => x.id === selected.id) || { id: selected.id };
    el("h2", { text: n.id }, pane);
    dl(pane, [["sidecar", n.meshed ? "yes" : "no"], ["identity", n.identity || "–"], ["PeerAuthentication", n.peerAuthentication || "–"], ["inbound refused/s", (n.refusedRps || 0).toFixed(1)]]);
    el("div", { text: "TrafficPolicy" }, pane);
    el("pre", { text: n.trafficPolicy ? JSON.stringify(n.trafficPolicy, null, 2) : "none" }, pane);
    for (const e of g.edges.filter((x) => x.source === n.id || x.destination === n.id)) {
      const h = history.get(edgeId(e)) || [];
      chart(pane, edgeId(e) + " requests/s", h.map((p) => ({ t: p.t, v: p.rps })), (v) => v.toFixed(1));
    }
  }
}

function isSelected(kind, id) { return selected && selected.kind === kind && selected.id === id; }
function select(kind, id) { selected = { kind, id }; if (latest) render(latest); }

function render(g) {
  document.getElementById("source").textContent = "source: " + g.source;
  document.getElementById("updated").textContent = "updated " + new Date(g.atMs).toLocaleTimeString() + ` (rates over ${g.windowSecs.toFixed(0)} s)`;
  const err = document.getElementById("error");
  err.hidden = !g.error;
  err.textContent = g.error || "";
  drawGraph(g);
  drawTable(g);
  drawDetails(g);
}

async function poll() {
  try {
    const r = await fetch("/api/graph", { cache: "no-store" });
    const g = await r.json();
    for (const e of g.edges) {
      const h = history.get(edgeId(e)) || [];
      h.push({ t: g.atMs, rps: e.rps, success: e.success, p99: e.p99Ms });
      while (h.length && h[0].t < g.atMs - HISTORY_MS) h.shift();
      history.set(edgeId(e), h);
    }
    latest = g;
    render(g);
    document.body.dataset.loaded = "true";
  } catch (e) {
    const err = document.getElementById("error");
    err.hidden = false;
    err.textContent = "cannot read /api/graph: " + e;
  }
}

poll();
setInterval(poll, 1000);
