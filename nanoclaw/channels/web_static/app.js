// The local chat page: long-polls /api/events, posts messages and card answers.
// The token comes from the URL fragment (never sent to the server) or the prompt,
// and is kept in this browser's localStorage.
"use strict";
(() => {
  const chat = "local";
  const $ = (id) => document.getElementById(id);
  const log = $("log"), status = $("status"), typing = $("typing");
  let token = null, next = 0, typingTimer = null, first = true;
  const nodes = new Map();   // message id → element (for edits and reactions)
  const cards = new Map();   // question id → card element

  function readToken() {
    const m = location.hash.match(/token=([^&]+)/);
    if (m) {
      localStorage.setItem("nanoclaw-token", decodeURIComponent(m[1]));
      history.replaceState(null, "", location.pathname);
    }
    return localStorage.getItem("nanoclaw-token");
  }

  function askToken() {
    const dlg = $("login");
    if (dlg.open) return;
    dlg.showModal();
    $("login-form").onsubmit = () => {
      token = $("token").value.trim();
      localStorage.setItem("nanoclaw-token", token);
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
    if (!r.ok) throw new Error(data.error || r.statusText);
    return data;
  }

  function scroll() { log.scrollTop = log.scrollHeight; }

  function bubble(cls, text, id) {
    const el = document.createElement("div");
    el.className = "msg " + cls;
    const body = document.createElement("div");
    body.className = "body";
    body.textContent = text;
    el.appendChild(body);
    if (id) { el.dataset.id = id; nodes.set(id, el); }
    log.appendChild(el);
    return el;
  }

  function render(ev) {
    if (ev.type === "typing") {
      typing.hidden = false;
      clearTimeout(typingTimer);
      typingTimer = setTimeout(() => { typing.hidden = true; }, 8000);
      return;
    }
    if (ev.type === "message") {
      if (!nodes.has(ev.id)) bubble("me", ev.text, ev.id);
    } else if (ev.type === "reply") {
      typing.hidden = true;
      const el = bubble("agent", ev.text, ev.id);
      for (const l of ev.links || []) {
        const a = document.createElement("a");
        a.href = l.url; a.textContent = l.label; a.target = "_blank"; a.rel = "noopener";
        el.appendChild(document.createElement("br")); el.appendChild(a);
      }
      for (const f of ev.files || []) {
        const a = document.createElement("a");
        a.href = "data:application/octet-stream;base64," + f.data;
        a.download = f.name; a.textContent = "📎 " + f.name;
        el.appendChild(document.createElement("br")); el.appendChild(a);
      }
    } else if (ev.type === "card") {
      typing.hidden = true;
      const el = document.createElement("div");
      el.className = "card";
      el.dataset.question = ev.question_id;
      if (ev.title) { const h = document.createElement("h2"); h.textContent = ev.title; el.appendChild(h); }
      const p = document.createElement("p"); p.textContent = ev.question; el.appendChild(p);
      ev.options.forEach((label, i) => {
        const b = document.createElement("button");
        b.type = "button"; b.textContent = label;
        b.onclick = () => answer(ev.question_id, i, el);
        el.appendChild(b);
      });
      cards.set(ev.question_id, el);
      nodes.set(ev.id, el);
      log.appendChild(el);
    } else if (ev.type === "answered") {
      const el = cards.get(ev.question_id);
      if (el) settle(el, ev.label);
    } else if (ev.type === "edit") {
      const el = nodes.get(ev.id);
      if (el) el.querySelector(".body").textContent = ev.text;
    } else if (ev.type === "reaction") {
      const el = nodes.get(ev.id);
      if (el) {
        let r = el.querySelector(".reactions");
        if (!r) { r = document.createElement("div"); r.className = "reactions"; el.appendChild(r); }
        r.textContent += ev.emoji;
      }
    }
    scroll();
  }

  function settle(el, label) {
    el.querySelectorAll("button").forEach((b) => { b.disabled = true; });
    if (!el.querySelector(".chosen")) {
      const c = document.createElement("div");
      c.className = "chosen"; c.textContent = "✓ " + label;
      el.appendChild(c);
    }
  }

  async function answer(qid, index, el) {
    el.querySelectorAll("button").forEach((b) => { b.disabled = true; });
    try {
      await api("/api/answer", { chat, question_id: qid, index });
    } catch (e) {
      el.querySelectorAll("button").forEach((b) => { b.disabled = false; });
      status.textContent = "answer failed: " + e.message; status.classList.add("bad");
    }
  }

  async function poll() {
    for (;;) {
      if (!token) { await new Promise((r) => setTimeout(r, 500)); token = localStorage.getItem("nanoclaw-token"); continue; }
      try {
        const data = await api(`/api/events?chat=${chat}&after=${next}&wait=${first ? 0 : 25}`);
        first = false;
        status.textContent = "connected as " + data.user; status.classList.remove("bad");
        for (const ev of data.events) render(ev);
        next = data.next;
      } catch (e) {
        status.textContent = "reconnecting…"; status.classList.add("bad");
        await new Promise((r) => setTimeout(r, 1000));
      }
    }
  }

  async function send(ev) {
    ev.preventDefault();
    const box = $("text");
    const text = box.value;
    if (!text.trim()) return;
    const id = "web-" + Date.now() + "-" + Math.random().toString(36).slice(2, 8);
    bubble("me", text, id);
    box.value = "";
    scroll();
    for (let i = 0; i < 5; i++) {   // at least once; the id makes a resend harmless
      try { await api("/api/send", { chat, text, id }); return; }
      catch (e) { status.textContent = "send failed, retrying…"; status.classList.add("bad");
                  await new Promise((r) => setTimeout(r, 1000)); }
    }
  }

  $("composer").addEventListener("submit", send);
  $("text").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  token = readToken();
  if (!token) askToken();
  poll();
})();
