// The local chat page: a list of chats, one long poll of /api/events for all of them,
// posts messages, card answers and new chats.
// The token comes from the URL fragment (never sent to the server) or the prompt, and
// is kept in this browser's localStorage; the address keeps only `#chat=<open chat>`.
// Replies come rendered from Markdown by the server (raw HTML off: web_console.py); files
// are sent as base64 with a message and downloaded with the token (fetch, then a blob).
// The other views (status, usage, approvals, errors) are console.js's.
// A chat is unread while an agent's reply or card in it is newer than what was on
// screen when it was last open (kept per chat in localStorage, in server time).
"use strict";
(() => {
  const CHAT_NAME = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;
  const $ = (id) => document.getElementById(id);
  const status = $("status"), typing = $("typing"), logs = $("logs"), list = $("chats");
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  let token = null, next = 0, boot = null, first = true, typingTimer = null;
  let initial = true;        // the page's first batch of events (the chats' history)
  let needChats = true;      // fetch /api/chats before the next poll
  const chats = new Map();   // name → {name, agents, last, lastAgent, log, nodes, cards}
  const seenKey = "nanoclaw-seen";
  const firstVisit = localStorage.getItem(seenKey) === null;
  const seen = JSON.parse(localStorage.getItem(seenKey) || "{}");  // chat → server time
  let open = readFragment() || "local";

  function readFragment() {
    const params = new URLSearchParams(location.hash.slice(1));
    if (params.get("token")) localStorage.setItem("nanoclaw-token", params.get("token"));
    const c = params.get("chat");
    return c && CHAT_NAME.test(c) ? c : null;
  }

  function writeFragment() {   // the token never stays in the address; the view stays
    const view = new URLSearchParams(location.hash.slice(1)).get("view");
    history.replaceState(null, "", location.pathname + "#chat=" + encodeURIComponent(open) +
      (view ? "&view=" + encodeURIComponent(view) : ""));
  }

  function askToken() {
    const dlg = $("login");
    if (dlg.open) return;
    dlg.showModal();
    $("login-form").onsubmit = () => {
      token = $("token").value.trim();
      localStorage.setItem("nanoclaw-token", token);
      needChats = true;
    };
  }

  async function api(path, body) {
    const opts = { headers: { Authorization: "Bearer " + token } };
    if (body !== undefined) {
      opts.method = "POST";
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    const r = await fetch(path, opts);
    if (r.status === 401) { askToken(); throw new Error("unauthorized"); }
    const data = await r.json();
    if (!r.ok) { const e = new Error(data.error || r.statusText); e.status = r.status; throw e; }
    return data;
  }
  window.nanoclaw = { api };   // for console.js

  // ---- chats --------------------------------------------------------------------------
  function chatOf(name) {
    let c = chats.get(name);
    if (c) return c;
    const log = document.createElement("main");
    log.className = "log";
    log.dataset.chat = name;
    log.hidden = name !== open;
    logs.appendChild(log);
    c = { name, agents: null, last: 0, lastAgent: 0, log, nodes: new Map(), cards: new Map() };
    chats.set(name, c);
    return c;
  }

  function isUnread(c) { return c.name !== open && c.lastAgent > (seen[c.name] || 0); }

  function markSeen(c) {
    if (c.lastAgent > (seen[c.name] || 0)) {
      seen[c.name] = c.lastAgent;
      localStorage.setItem(seenKey, JSON.stringify(seen));
    }
  }

  function agentNames(c) {
    if (c.agents === null) return "";
    return c.agents.length ? c.agents.map((a) => a.name).join(", ") : "no agent";
  }

  function when(at) {
    if (!at) return "";
    const d = new Date(at * 1000), now = new Date();
    return d.toDateString() === now.toDateString()
      ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
      : d.toLocaleDateString([], { month: "short", day: "numeric" });
  }

  function drawList() {
    const sorted = [...chats.values()].sort((a, b) => (b.last - a.last) || a.name.localeCompare(b.name));
    list.replaceChildren(...sorted.map((c) => {
      const li = document.createElement("li");
      const b = document.createElement("button");
      b.type = "button";
      b.className = "chat" + (c.name === open ? " open" : "") + (isUnread(c) ? " unread" : "");
      b.dataset.chat = c.name;
      if (c.name === open) b.setAttribute("aria-current", "true");
      const top = document.createElement("span"); top.className = "top";
      const n = document.createElement("span"); n.className = "name"; n.textContent = c.name;
      const t = document.createElement("span"); t.className = "when"; t.textContent = when(c.last);
      top.append(n, t);
      const ag = document.createElement("span"); ag.className = "agents"; ag.textContent = agentNames(c);
      b.append(top, ag);
      if (isUnread(c)) {
        const dot = document.createElement("span");
        dot.className = "badge"; dot.textContent = "new"; dot.setAttribute("aria-label", "unread");
        b.appendChild(dot);
      }
      b.onclick = () => switchTo(c.name);
      li.appendChild(b);
      return li;
    }));
    const c = chatOf(open);
    $("chat-title").textContent = c.name;
    const names = agentNames(c);
    $("chat-agents").textContent = names ? "with " + names : "";
    const unread = [...chats.values()].filter(isUnread).length;
    document.title = unread ? `(${unread}) NanoClaw` : "NanoClaw";
  }

  function switchTo(name) {
    open = name;
    const c = chatOf(name);
    for (const x of chats.values()) x.log.hidden = x !== c;
    markSeen(c);
    typing.hidden = true;
    writeFragment();
    drawList();
    scroll(c);
    $("text").focus();
  }

  async function loadChats() {
    const data = await api("/api/chats");
    for (const x of data.chats) {
      const c = chatOf(x.name);
      c.agents = x.agents;
      c.last = Math.max(c.last, x.last_activity || 0);
    }
    drawList();
  }

  // ---- events -------------------------------------------------------------------------
  function scroll(c) { c.log.scrollTop = c.log.scrollHeight; }

  function setBody(body, text, html) {   // html: the server's safe rendering of Markdown
    if (typeof html === "string") {
      body.classList.add("md");
      body.innerHTML = html;
      body.querySelectorAll("a").forEach((a) => { a.target = "_blank"; a.rel = "noopener noreferrer"; });
    } else {
      body.textContent = text;
    }
  }

  async function download(url, name) {   // with the token, which a plain link cannot carry
    try {
      const r = await fetch(url, { headers: { Authorization: "Bearer " + token } });
      if (!r.ok) throw new Error("HTTP " + r.status);
      const href = URL.createObjectURL(await r.blob());
      const a = document.createElement("a");
      a.href = href; a.download = name; document.body.appendChild(a); a.click(); a.remove();
      setTimeout(() => URL.revokeObjectURL(href), 10000);
    } catch (e) {
      status.textContent = "download failed: " + e.message; status.classList.add("bad");
    }
  }

  function bubble(c, cls, text, id, html) {
    const el = document.createElement("div");
    el.className = "msg " + cls;
    const body = document.createElement("div");
    body.className = "body";
    setBody(body, text, html);
    el.appendChild(body);
    if (id) { el.dataset.id = id; c.nodes.set(id, el); }
    c.log.appendChild(el);
    return el;
  }

  function render(ev) {
    const c = chatOf(ev.chat || "local");
    if (c.agents === null) needChats = true;   // a chat this page has not listed yet
    const here = c.name === open;
    if (ev.type === "typing") {
      if (!here) return;
      typing.hidden = false;
      clearTimeout(typingTimer);
      typingTimer = setTimeout(() => { typing.hidden = true; }, 8000);
      return;
    }
    c.last = Math.max(c.last, ev.at || 0);
    if ((ev.type === "reply" || ev.type === "card") && c.nodes.has(ev.id)) return;  // shown
    if (ev.type === "reply" || ev.type === "card") {
      c.lastAgent = Math.max(c.lastAgent, ev.at || 0);
      if (here) typing.hidden = true;
      if (here || (firstVisit && initial)) markSeen(c);   // a first visit starts all read
    }
    if (ev.type === "message") {
      if (!c.nodes.has(ev.id)) attachedNames(bubble(c, "me", ev.text, ev.id), ev.files);
    } else if (ev.type === "reply") {
      const el = bubble(c, "agent", ev.text, ev.id, ev.html);
      for (const l of ev.links || []) {
        const a = document.createElement("a");
        a.href = l.url; a.textContent = l.label; a.target = "_blank"; a.rel = "noopener";
        el.appendChild(document.createElement("br")); el.appendChild(a);
      }
      for (const f of ev.files || []) {
        const a = document.createElement("a");
        a.className = "file";
        if (f.url) {
          a.href = "#"; a.onclick = (e) => { e.preventDefault(); download(f.url, f.name); };
        } else {
          a.href = "data:application/octet-stream;base64," + f.data;
          a.download = f.name;
        }
        a.textContent = "📎 " + f.name;
        el.appendChild(document.createElement("br")); el.appendChild(a);
      }
    } else if (ev.type === "card") {
      const el = document.createElement("div");
      el.className = "card";
      el.dataset.question = ev.question_id;
      if (ev.title) { const h = document.createElement("h2"); h.textContent = ev.title; el.appendChild(h); }
      const p = document.createElement("p"); p.textContent = ev.question; el.appendChild(p);
      ev.options.forEach((label, i) => {
        const b = document.createElement("button");
        b.type = "button"; b.textContent = label;
        b.onclick = () => answer(c.name, ev.question_id, i, el);
        el.appendChild(b);
      });
      c.cards.set(ev.question_id, el);
      c.nodes.set(ev.id, el);
      c.log.appendChild(el);
    } else if (ev.type === "answered") {
      const el = c.cards.get(ev.question_id);
      if (el) settle(el, ev.label);
    } else if (ev.type === "edit") {
      const el = c.nodes.get(ev.id);
      if (el) setBody(el.querySelector(".body"), ev.text, ev.html);
    } else if (ev.type === "reaction") {
      const el = c.nodes.get(ev.id);
      if (el) {
        let r = el.querySelector(".reactions");
        if (!r) { r = document.createElement("div"); r.className = "reactions"; el.appendChild(r); }
        r.textContent += ev.emoji;
      }
    }
    if (here) scroll(c);
  }

  function settle(el, label) {
    el.querySelectorAll("button").forEach((b) => { b.disabled = true; });
    if (!el.querySelector(".chosen")) {
      const c = document.createElement("div");
      c.className = "chosen"; c.textContent = "✓ " + label;
      el.appendChild(c);
    }
  }

  async function answer(chat, qid, index, el) {
    el.querySelectorAll("button").forEach((b) => { b.disabled = true; });
    try {
      await api("/api/answer", { chat, question_id: qid, index });
    } catch (e) {
      el.querySelectorAll("button").forEach((b) => { b.disabled = false; });
      status.textContent = "answer failed: " + e.message; status.classList.add("bad");
    }
  }

  function restart() {   // the worker restarted: its seqs start again, so redraw from 0
    for (const c of chats.values()) {
      c.log.replaceChildren(); c.nodes.clear(); c.cards.clear(); c.lastAgent = 0;
    }
    next = 0; first = true; needChats = true;
  }

  async function poll() {   // one long poll for every chat
    for (;;) {
      if (!token) { await sleep(500); token = localStorage.getItem("nanoclaw-token"); continue; }
      try {
        if (needChats) { needChats = false; await loadChats(); }
        const data = await api(`/api/events?after=${next}&wait=${first ? 0 : 25}`);
        status.textContent = "connected as " + data.user; status.classList.remove("bad");
        if (boot !== null && data.boot !== boot) { boot = data.boot; restart(); continue; }
        boot = data.boot;
        for (const ev of data.events) render(ev);
        if (initial) localStorage.setItem(seenKey, JSON.stringify(seen));
        first = initial = false;
        next = data.next;
        drawList();
      } catch (e) {
        needChats = true;
        status.textContent = "reconnecting…"; status.classList.add("bad");
        await sleep(1000);
      }
    }
  }

  function attachedNames(el, names) {
    for (const n of names || []) {
      const s = document.createElement("div");
      s.className = "file"; s.textContent = "📎 " + n;
      el.appendChild(s);
    }
    return el;
  }

  function readFile(f) {   // base64 of one file
    return new Promise((resolve, reject) => {
      const r = new FileReader();
      r.onload = () => resolve(String(r.result).split(",", 2)[1] || "");
      r.onerror = () => reject(r.error);
      r.readAsDataURL(f);
    });
  }

  function showAttached() {
    const picked = [...$("files").files];
    $("attached").hidden = !picked.length;
    $("attached").textContent = picked.map((f) => "📎 " + f.name).join("  ");
  }

  async function send(ev) {
    ev.preventDefault();
    const box = $("text");
    const text = box.value, c = chatOf(open), picked = [...$("files").files];
    if (!text.trim() && !picked.length) return;
    let files;
    try {
      files = await Promise.all(picked.map(async (f) =>
        ({ name: f.name, type: f.type || "application/octet-stream", data: await readFile(f) })));
    } catch (e) {
      status.textContent = "cannot read the file: " + e.message; status.classList.add("bad");
      return;
    }
    const id = "web-" + Date.now() + "-" + Math.random().toString(36).slice(2, 8);
    attachedNames(bubble(c, "me", text, id), picked.map((f) => f.name));
    box.value = "";
    $("files").value = "";
    showAttached();
    scroll(c);
    const body = files.length ? { chat: c.name, text, id, files } : { chat: c.name, text, id };
    for (let i = 0; i < 5; i++) {   // at least once; the id makes a resend harmless
      try { await api("/api/send", body); return; }
      catch (e) {
        if (e.status === 400) { status.textContent = "not sent: " + e.message; status.classList.add("bad"); return; }
        status.textContent = "send failed, retrying…"; status.classList.add("bad");
        await sleep(1000);
      }
    }
  }

  // ---- a new chat ---------------------------------------------------------------------
  function newError(msg) {
    const p = $("new-error");
    p.textContent = msg || ""; p.hidden = !msg;
  }

  async function openNewChat() {
    const dlg = $("new-chat-dialog"), sel = $("new-agent");
    $("new-name").value = ""; newError("");
    dlg.showModal();
    $("new-name").focus();
    try {
      const data = await api("/api/agents");
      sel.replaceChildren(...data.agents.map((a) =>
        new Option(a.name === a.folder ? a.name : `${a.name} (${a.folder})`, a.id)));
      if (!data.agents.length) newError("there is no agent group yet");
    } catch (e) { newError("cannot list the agents: " + e.message); }
  }

  async function createChat(ev) {
    ev.preventDefault();
    const name = $("new-name").value.trim(), agent = $("new-agent").value;
    newError("");
    $("new-create").disabled = true;
    try {
      const data = await api("/api/chats", agent ? { name, agent } : { name });
      const c = chatOf(data.chat.name);
      c.agents = data.chat.agents;
      c.last = Math.max(c.last, data.chat.last_activity || 0);
      $("new-chat-dialog").close();
      switchTo(c.name);
    } catch (e) {
      newError(e.message);
    } finally {
      $("new-create").disabled = false;
    }
  }

  $("new-chat").addEventListener("click", openNewChat);
  $("new-chat-form").addEventListener("submit", createChat);
  $("new-cancel").addEventListener("click", () => $("new-chat-dialog").close());
  $("composer").addEventListener("submit", send);
  $("files").addEventListener("change", showAttached);
  $("text").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  window.addEventListener("hashchange", () => {
    const c = readFragment();
    token = localStorage.getItem("nanoclaw-token");
    switchTo(c || open);
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && token) loadChats().catch(() => { needChats = true; });
  });
  // ---- WhatsApp Web's login code, while `nanoclaw channels login whatsapp` waits ----
  async function watchWhatsApp() {
    for (;;) {
      await sleep(3000);
      if (!token || document.hidden) continue;
      try {
        const wa = await api("/api/whatsapp");
        if (wa.qr) $("wa-qr").src = wa.qr;
        $("wa-login").hidden = !wa.qr;
      } catch (e) { /* the chat's own poll reports a lost connection */ }
    }
  }

  token = localStorage.getItem("nanoclaw-token");
  if (!token) askToken();
  writeFragment();
  chatOf(open);
  drawList();
  poll();
  watchWhatsApp();
})();
