// The console's views beside the chats: status (workers, sessions, upstreams), usage (tokens
// per agent group and day, as an SVG chart with the budget line), the approvals waiting
// for the owner (answered here: the host's router decides, as for a click on the card)
// and the tail of logs/nanoclaw.error.log. Plain DOM; every text goes in as text.
// The open view is `view=` in the address's fragment, so a reload stays on it.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const VIEWS = ["chats", "status", "usage", "approvals", "errors"];
  const SVG = "http://www.w3.org/2000/svg";
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  let view = readView();
  const api = (path, body) => window.nanoclaw.api(path, body);
  const hasToken = () => !!localStorage.getItem("nanoclaw-token");

  function readView() {
    const v = new URLSearchParams(location.hash.slice(1)).get("view");
    return VIEWS.includes(v) ? v : "chats";
  }

  function show(v) {
    view = v;
    $("app").hidden = v !== "chats";
    for (const name of VIEWS.slice(1)) $("view-" + name).hidden = name !== v;
    document.querySelectorAll("#views button").forEach((b) => {
      if (b.dataset.view === v) b.setAttribute("aria-current", "page");
      else b.removeAttribute("aria-current");
    });
    const params = new URLSearchParams(location.hash.slice(1));
    params.delete("token");
    if (v === "chats") params.delete("view"); else params.set("view", v);
    history.replaceState(null, "", location.pathname + "#" + params.toString());
    refresh(v).catch(() => {});
  }

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "" : String(text);
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }

  function ago(stamp) {
    if (!stamp) return "";
    const s = Math.round((Date.now() - Date.parse(stamp)) / 1000);
    if (Number.isNaN(s)) return stamp;
    if (s < 0) return "in " + fmtSecs(-s);
    return fmtSecs(s) + " ago";
  }

  function fmtSecs(s) {
    if (s < 60) return s + " s";
    if (s < 3600) return Math.round(s / 60) + " min";
    if (s < 86400) return Math.round(s / 3600) + " h";
    return Math.round(s / 86400) + " d";
  }

  // ---- status -------------------------------------------------------------------------
  async function loadStatus() {
    const d = await api("/api/status");
    $("workers").tBodies[0].replaceChildren(...d.workers.map((w) => {
      const tr = document.createElement("tr");
      tr.dataset.worker = w.name;
      tr.className = "state-" + String(w.state).toLowerCase();
      cell(tr, w.name, "name");
      cell(tr, w.state, "state");
      cell(tr, w.pid, "pid");
      cell(tr, w.restarts, "restarts");
      cell(tr, w.last_exit, "last-exit");
      cell(tr, w.next_start_at ? ago(w.next_start_at) : "", "next-start");
      return tr;
    }));
    $("sessions").tBodies[0].replaceChildren(...d.sessions.map((s) => {
      const tr = document.createElement("tr");
      tr.dataset.session = s.id;
      cell(tr, s.agent === s.folder ? s.agent : `${s.agent} (${s.folder})`, "agent");
      cell(tr, (s.chat || "—") + (s.thread ? " / " + s.thread : ""), "chat");
      cell(tr, s.state, "state");
      cell(tr, ago(s.last_active), "last-active");
      cell(tr, s.id, "id");
      return tr;
    }));
    $("broker").textContent = d.broker.url
      ? `broker ${d.broker.url}, ${String(d.broker.state || "?").toLowerCase()}`
      : "broker not running";
    $("upstreams").tBodies[0].replaceChildren(...d.upstreams.map((u) => {
      const tr = document.createElement("tr");
      tr.dataset.upstream = u.name;
      cell(tr, u.name, "name");
      cell(tr, u.api, "api");
      cell(tr, u.url + (u.local ? " (this machine)" : ""), "url");
      cell(tr, u.used_by.length ? u.used_by.join(", ") : "no group", "used-by");
      const td = cell(tr, "", "check");
      const b = document.createElement("button");
      b.type = "button"; b.textContent = "Check";
      const out = document.createElement("span");
      b.onclick = async () => {
        b.disabled = true; out.textContent = " checking…";
        try {
          const r = await api("/api/upstreams/check", { name: u.name });
          out.textContent = r.ok ? " answers" : r.status
            ? ` answered HTTP ${r.status}${[401, 403].includes(r.status) ? " (check its key)" : ""}`
            : " unreachable: " + r.detail;
        } catch (e) { out.textContent = " " + e.message; }
        b.disabled = false;
      };
      td.append(b, out);
      return tr;
    }));
  }

  // ---- usage --------------------------------------------------------------------------
  function svg(tag, attrs, text) {
    const el = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
    if (text !== undefined) el.textContent = text;
    return el;
  }

  function chart(days, g) {
    const W = 640, H = 200, L = 56, B = 22, T = 10;
    const top = Math.max(1, ...g.tokens, g.budget || 0) * 1.1;
    const y = (v) => T + (H - T - B) * (1 - v / top);
    const bw = (W - L - 8) / days.length;
    const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img",
                           "data-group": g.folder,
                           "aria-label": `tokens per day for ${g.name}` });
    for (const f of [0, 0.5, 1]) {
      const v = Math.round(top / 1.1 * f);
      s.appendChild(svg("line", { x1: L, x2: W - 4, y1: y(v), y2: y(v), class: "grid" }));
      s.appendChild(svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, v.toLocaleString()));
    }
    days.forEach((d, i) => {
      const v = g.tokens[i], x = L + i * bw + 2;
      const r = svg("rect", { x, y: y(v), width: Math.max(1, bw - 4), height: (H - B) - y(v),
                              class: "bar" + (g.budget && v >= g.budget ? " over" : ""),
                              "data-day": d, "data-tokens": v });
      r.appendChild(svg("title", {}, `${d}: ${v.toLocaleString()} tokens, ${g.requests[i]} requests`));
      s.appendChild(r);
      if (days.length <= 14 || i % Math.ceil(days.length / 14) === 0)
        s.appendChild(svg("text", { x: x + (bw - 4) / 2, y: H - 6, "text-anchor": "middle" }, d.slice(5)));
    });
    if (g.budget) {
      s.appendChild(svg("line", { x1: L, x2: W - 4, y1: y(g.budget), y2: y(g.budget), class: "budget" }));
      s.appendChild(svg("text", { x: W - 6, y: y(g.budget) - 4, "text-anchor": "end", class: "budget-label" },
                        `budget ${g.budget.toLocaleString()}/day`));
    }
    return s;
  }

  async function loadUsage() {
    const d = await api("/api/usage?days=14");
    $("usage-tz").textContent = `(${d.days[0]} – ${d.days[d.days.length - 1]}, ${d.tz})`;
    $("usage-charts").replaceChildren(...d.groups.map((g) => {
      const box = document.createElement("div");
      box.className = "usage"; box.dataset.group = g.folder;
      const h = document.createElement("h3");
      h.textContent = g.name === g.folder ? g.name : `${g.name} (${g.folder})`;
      const total = document.createElement("span");
      total.className = "usage-total";
      const today = g.tokens[g.tokens.length - 1];
      total.textContent = `today ${today.toLocaleString()} tokens` +
        (g.budget ? ` of ${g.budget.toLocaleString()}` : ", no budget") +
        ` · ${g.tokens.reduce((a, b) => a + b, 0).toLocaleString()} in ${d.days.length} days`;
      total.dataset.today = String(today);
      box.append(h, total, chart(d.days, g));
      return box;
    }));
  }

  // ---- approvals ----------------------------------------------------------------------
  const answering = new Map();   // approval id → the label sent, until the host decides

  async function loadApprovals() {
    const d = await api("/api/approvals");
    const open = new Set(d.approvals.map((a) => a.id));
    for (const id of answering.keys()) if (!open.has(id)) answering.delete(id);
    const count = $("approvals-count");
    count.textContent = String(d.approvals.length);
    count.hidden = !d.approvals.length;
    $("approvals-none").hidden = d.approvals.length > 0;
    $("approvals").replaceChildren(...d.approvals.map((a) => {
      const el = document.createElement("div");
      el.className = "approval";
      el.dataset.approval = a.id;
      const h = document.createElement("h3"); h.textContent = a.title;
      const meta = document.createElement("div"); meta.className = "meta";
      meta.textContent = `${a.kind} · asked ${ago(a.created_at)}` +
        (a.expires_at ? ` · expires ${ago(a.expires_at)}` : "");
      const q = document.createElement("div"); q.className = "question";
      q.innerHTML = a.question_html;   // the server's rendering: raw HTML off (web_console.py)
      el.append(h, meta, q);
      const sent = answering.get(a.id);
      for (const o of a.options) {
        const b = document.createElement("button");
        b.type = "button"; b.textContent = o.label; b.dataset.option = o.value;
        b.disabled = !!sent;
        b.onclick = () => answerApproval(a.id, o, el);
        el.appendChild(b);
      }
      if (sent) {
        const p = document.createElement("div"); p.className = "chosen";
        p.textContent = `${sent}: sent, the host decides…`; el.appendChild(p);
      }
      return el;
    }));
  }

  async function answerApproval(id, option, el) {
    el.querySelectorAll("button").forEach((b) => { b.disabled = true; });
    try {
      await api("/api/approvals/answer", { id, option: option.value });
      answering.set(id, option.label);
    } catch (e) {
      const p = document.createElement("div"); p.className = "error"; p.textContent = e.message;
      el.appendChild(p);
    }
    await loadApprovals().catch(() => {});
  }

  // ---- errors -------------------------------------------------------------------------
  async function loadErrors() {
    const d = await api("/api/errors?lines=200");
    $("errors-file").textContent = d.file;
    $("errors-none").hidden = d.lines.length > 0;
    $("errors").replaceChildren(...d.lines.map((line) => {
      const div = document.createElement("div");
      div.className = /\bERROR\b|\bCRITICAL\b/.test(line) ? "line error" : "line";
      div.textContent = line;
      return div;
    }));
  }

  const LOADERS = { status: loadStatus, usage: loadUsage, approvals: loadApprovals, errors: loadErrors };

  async function refresh(v) {
    if (!hasToken() || !LOADERS[v]) return;
    await LOADERS[v]();
  }

  async function loop() {   // the open view every 2 s; the approvals' count every 5 s
    let n = 0;
    for (;;) {
      await sleep(2000);
      if (document.hidden || !hasToken()) continue;
      n += 1;
      try {
        if (view !== "chats") await refresh(view);
        if (view !== "approvals" && n % 3 === 1) await loadApprovals();
      } catch (e) { /* the chat's poll reports a lost connection */ }
    }
  }

  document.querySelectorAll("#views button").forEach((b) => {
    b.addEventListener("click", () => show(b.dataset.view));
  });
  window.addEventListener("hashchange", () => { if (readView() !== view) show(readView()); });
  show(view);
  if (view !== "approvals") loadApprovals().catch(() => {});
  loop();
})();
