// The status page's one script: fetch status.json every two seconds and draw it with DOM calls
// (textContent only: addresses and configuration values are never read as HTML).
"use strict";

const REFRESH_MS = 2000;
const SHOWN_WINDOW = 1; // index into doc.decisions: the 5-minute window in the upstream table

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "class") node.className = v;
    else if (k === "width") node.style.width = v; // CSSOM: the page's policy forbids style attributes
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : String(c));
  return node;
}

function duration(secs) {
  if (secs < 60) return `${Math.round(secs)} s`;
  if (secs < 5400) return `${Math.round(secs / 60)} min`;
  if (secs < 172800) return `${(secs / 3600).toFixed(1)} h`;
  return `${(secs / 86400).toFixed(1)} d`;
}

function chars(n) {
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} k`;
  return String(n);
}

function pct(x) { return x > 0 && x < 0.001 ? "< 0.1 %" : `${(100 * x).toFixed(1)} %`; }

function windowName(w) {
  const name = duration(w.secs);
  return w.span_secs + 1 < w.secs ? `${name} (${duration(w.span_secs)} since start)` : name;
}

function upstreamState(u) {
  if (u.ejected) return el("span", { class: "state ejected" }, `ejected, ${Math.ceil(u.ejected_secs_left)} s left`);
  if (!u.active_ok) return el("span", { class: "state down" }, "down (health checks)");
  const s = el("span", { class: "state healthy" }, "healthy");
  if (u.check_failures) s.append(` (${u.check_failures} check failed)`);
  return s;
}

function reasons(counts) {
  const names = Object.keys(counts || {}).sort();
  if (!names.length) return "none";
  const frag = document.createDocumentFragment();
  for (const r of names) frag.append(el("span", { class: "reason" }, `${r} ${counts[r]}`));
  return frag;
}

function drawUpstreams(doc) {
  const w = doc.decisions[SHOWN_WINDOW];
  for (const s of document.querySelectorAll(".window-name")) s.textContent = windowName(w);
  const body = document.querySelector("#upstreams tbody");
  body.replaceChildren(...doc.upstreams.map((u) => el("tr", { "data-upstream": u.address },
    el("td", {}, el("code", {}, u.address)),
    el("td", {}, upstreamState(u)),
    el("td", { class: "n inflight" }, u.inflight),
    el("td", { class: "n workers" }, u.workers || "–"),
    el("td", { class: "n" }, chars(u.tree_characters)),
    el("td", { class: "n" }, pct(u.tree_share), el("span", { class: "bar", width: `${Math.round(60 * u.tree_share)}px` })),
    el("td", { class: "n" }, pct(u.budget_used)),
    el("td", { class: "n observed", title: `${u.observed_responses} sampled responses` },
      u.observed_hit_ratio === null ? "–" : pct(u.observed_hit_ratio)),
    el("td", { class: "decisions" }, reasons(w.by_upstream[u.address])),
  )));
}

function drawReasons(doc) {
  const head = document.querySelector("#reasons thead tr");
  head.replaceChildren(el("th", {}, "reason"), ...doc.decisions.map((w) => el("th", { class: "n" }, `last ${windowName(w)}`)));
  const totals = doc.decisions.map((w) => {
    const t = {};
    for (const counts of Object.values(w.by_upstream)) for (const [r, n] of Object.entries(counts)) t[r] = (t[r] || 0) + n;
    return t;
  });
  const names = [...new Set(totals.flatMap((t) => Object.keys(t)))].sort();
  const rows = names.map((r) => el("tr", { "data-reason": r }, el("td", {}, el("code", {}, r)), ...totals.map((t) => el("td", { class: "n" }, t[r] || 0))));
  const all = totals.map((t) => Object.values(t).reduce((a, b) => a + b, 0));
  rows.push(el("tr", { "data-reason": "all" }, el("th", {}, "all"), ...all.map((n) => el("th", { class: "n" }, n))));
  document.querySelector("#reasons tbody").replaceChildren(...rows);
}

// The session kinds of status.json, in the order and words the page shows them.
const SESSION_ROWS = [
  ["continues", "continue a conversation, kept where its history is"],
  ["moved", "continue a conversation, moved by load"],
  ["new_over_threshold", "start a session, matched over the threshold"],
  ["new", "start a session, matched at most the threshold"],
  ["load_only", "were decided by load alone"],
];

function drawSessions(doc) {
  const head = document.querySelector("#sessions thead tr");
  head.replaceChildren(el("th", {}, `requests that (threshold ${doc.cache_threshold})`),
    ...doc.decisions.map((w) => el("th", { class: "n" }, `last ${windowName(w)}`)));
  const rows = SESSION_ROWS.map(([kind, words]) => el("tr", { "data-kind": kind }, el("td", {}, words),
    ...doc.decisions.map((w) => el("td", { class: "n" }, w.sessions[kind]))));
  // the share of new sessions over the threshold: what the routers behind pile onto one worker
  rows.push(el("tr", { "data-kind": "new_over_share" }, el("th", {}, "new sessions over the threshold"),
    ...doc.decisions.map((w) => {
      const fresh = w.sessions.new_over_threshold + w.sessions.new;
      return el("th", { class: "n" }, fresh ? pct(w.sessions.new_over_threshold / fresh) : "–");
    })));
  document.querySelector("#sessions tbody").replaceChildren(...rows);
}

function drawSync(doc) {
  const box = document.getElementById("sync");
  const s = doc.sync;
  if (!s) {
    box.replaceChildren(el("p", {}, `This replica (${doc.replica}) runs alone: no --sync-url.`));
    return;
  }
  const state = s.warming ? el("span", { class: "state warming" }, "warming up")
    : s.connected ? el("span", { class: "state healthy" }, "connected") : el("span", { class: "state disconnected" }, "disconnected: routing on its own view");
  const line = el("p", { id: "sync-state" }, `This replica: `, el("code", {}, s.replica), ` · link to NATS `, state,
    s.server ? ` (${s.server}, subject ${s.subject})` : ` (subject ${s.subject})`,
    ` · event ${s.seq} · snapshots loaded ${s.snapshots_loaded}`);
  const rows = s.peers.map((p) => el("tr", { "data-peer": p.replica },
    el("td", {}, el("code", {}, p.replica)), el("td", { class: "n" }, `${p.heard_secs_ago} s ago`),
    el("td", { class: "n" }, p.seq), el("td", { class: "n" }, p.inflight),
    el("td", {}, s.snapshots_due.includes(p.replica) ? "snapshot due (events missed)" : "in step")));
  const table = el("table", { id: "peers" },
    el("thead", {}, el("tr", {}, el("th", {}, "peer"), el("th", { class: "n" }, "last heard"), el("th", { class: "n" }, "event"), el("th", { class: "n" }, "in flight"), el("th", {}, "view"))),
    el("tbody", {}, ...(rows.length ? rows : [el("tr", {}, el("td", { colspan: "5" }, "no peer heard from"))])));
  const gone = s.peers_gone ? el("p", { class: "note" }, `${s.peers_gone} peer(s) dropped after falling silent.`) : "";
  box.replaceChildren(line, table, gone);
}

function drawConfig(doc) {
  const rows = Object.keys(doc.config).sort().map((k) => {
    const v = doc.config[k];
    return el("tr", {}, el("td", {}, `--${k.replaceAll("_", "-")}`), el("td", {}, el("code", {}, Array.isArray(v) ? v.join(", ") : v === null ? "" : String(v))));
  });
  document.querySelector("#config tbody").replaceChildren(...rows);
}

function draw(doc) {
  document.getElementById("version").textContent = `v${doc.version}`;
  const healthy = doc.upstreams.filter((u) => u.healthy).length;
  document.getElementById("summary").textContent =
    `replica ${doc.replica} · up ${duration(doc.uptime_secs)} · ${healthy} of ${doc.upstreams.length} upstreams healthy · updated ${new Date().toLocaleTimeString()}`;
  drawUpstreams(doc);
  drawReasons(doc);
  drawSessions(doc);
  drawSync(doc);
  const t = doc.tree;
  document.getElementById("tree").textContent =
    `${chars(t.stored_characters)} characters in ${t.nodes} nodes; budget ${chars(t.max_tree_size)} characters per upstream.`;
  drawConfig(doc);
}

async function refresh() {
  const error = document.getElementById("error");
  try {
    const resp = await fetch("status.json", { cache: "no-store" });
    if (!resp.ok) throw new Error(`status.json answered ${resp.status}`);
    draw(await resp.json());
    error.hidden = true;
  } catch (e) {
    error.textContent = `Not updated: ${e.message}. Retrying.`;
    error.hidden = false;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
