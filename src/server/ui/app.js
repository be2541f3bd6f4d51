// parley's chat page: conversations over the WebSocket protocol (PROTOCOL §5). The socket
// carries every turn; a dropped socket is reopened, each conversation shown is subscribed again
// from the last seq seen, and messages not yet acked are sent again with their client_id (the
// server stores each once). No HTML from a model or a user is ever inserted as markup.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY = "parley.key";
  const PENDING = "parley.pending";

  const state = {
    key: localStorage.getItem(KEY) || "",
    ws: null,
    open: false,
    retry: 500,
    conv: null,          // the conversation shown
    lastSeq: 0,          // the newest seq of it rendered
    streaming: null,     // reply_to of the reply streaming now
    replies: new Map(),  // reply_to → the <li> of its reply
    ackedHere: new Set(), // user seqs acked on the current socket (their deltas all came here)
    shown: new Set(),    // seqs rendered
    pending: loadPending(), // client_id → {conversation, content}
    after: null,         // listing cursor
  };

  function loadPending() {
    try {
      return new Map(Object.entries(JSON.parse(sessionStorage.getItem(PENDING) || "{}")));
    } catch (_) {
      return new Map();
    }
  }
  function savePending() {
    sessionStorage.setItem(PENDING, JSON.stringify(Object.fromEntries(state.pending)));
  }

  // ---- HTTP ----

  async function api(path, options = {}) {
    const headers = Object.assign({ "content-type": "application/json" }, options.headers || {});
    if (state.key) headers.authorization = "Bearer " + state.key;
    const resp = await fetch(path, Object.assign({}, options, { headers }));
    if (resp.status === 401) {
      askKey();
      throw new Error("unauthorized");
    }
    const body = resp.status === 204 ? null : await resp.json().catch(() => null);
    if (!resp.ok) {
      const err = (body && body.error) || { code: "internal", message: resp.statusText };
      showError({ code: err.code, message: err.message, retry_after_ms: retryAfter(resp) });
      throw new Error(err.code);
    }
    return body;
  }

  function retryAfter(resp) {
    const s = Number(resp.headers.get("retry-after"));
    return Number.isFinite(s) && s > 0 ? s * 1000 : undefined;
  }

  // ---- errors, as people read them ----

  function describe(e) {
    const secs = e.retry_after_ms ? Math.max(1, Math.ceil(e.retry_after_ms / 1000)) : null;
    switch (e.code) {
      case "rate_limited":
        return "Too many requests right now" + (secs ? " — try again in " + secs + " s." : " — try again shortly.");
      case "quota_exceeded":
        return "This key's quota is used up" + (secs ? " — it renews in " + secs + " s." : ".");
      case "unauthorized": return "The server refused the API key. Set another with “API key…”.";
      case "forbidden": return "This key may not do that: " + e.message;
      case "too_large": return "That message is too long for this model's context window.";
      case "blocked": return "A guardrail blocked this message: " + e.message;
      case "upstream_unavailable": return "The model provider cannot be reached right now; try again in a moment.";
      case "upstream_error": return "The model provider answered with an error: " + e.message;
      case "upstream_interrupted": return "The reply was cut off: the provider's stream broke. What arrived is kept.";
      case "not_found": return "Not found: " + e.message;
      case "bad_request": return "The server could not take that: " + e.message;
      default: return "Something went wrong on the server (" + (e.code || "error") + "): " + (e.message || "");
    }
  }

  let errorTimer = null;
  function showError(e) {
    const box = $("error");
    box.textContent = describe(e);
    box.dataset.code = e.code || "";
    box.hidden = false;
    clearTimeout(errorTimer);
    errorTimer = setTimeout(() => { box.hidden = true; }, 15000);
  }

  // ---- the key ----

  function askKey() {
    const d = $("key-dialog");
    $("key-input").value = state.key;
    if (!d.open) d.showModal();
  }
  $("key-button").addEventListener("click", askKey);
  $("key-form").addEventListener("submit", (ev) => {
    const how = ev.submitter ? ev.submitter.value : "save";
    state.key = how === "clear" ? "" : $("key-input").value.trim();
    if (state.key) localStorage.setItem(KEY, state.key); else localStorage.removeItem(KEY);
    reconnect();
    loadModels();
    loadConversations(true);
  });

  // ---- the socket ----

  function wsUrl() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const token = state.key ? "?access_token=" + encodeURIComponent(state.key) : "";
    return proto + "//" + location.host + "/v1/ws" + token;
  }

  function setStatus(text, ok) {
    const s = $("status");
    s.textContent = text;
    s.classList.toggle("ok", !!ok);
  }

  function connect() {
    const ws = new WebSocket(wsUrl());
    state.ws = ws;
    setStatus("connecting…");
    ws.onopen = () => {
      state.open = true;
      state.retry = 500;
      setStatus("connected", true);
      if (state.conv) subscribe(state.conv, state.lastSeq);
      // What was sent but never acked goes again; its client_id makes that safe.
      for (const [cid, p] of state.pending) send({ type: "user_message", conversation: p.conversation, client_id: cid, content: p.content, options: p.options });
    };
    ws.onmessage = (ev) => {
      let f;
      try { f = JSON.parse(ev.data); } catch (_) { return; }
      onFrame(f);
    };
    ws.onclose = (ev) => {
      if (state.ws !== ws) return;
      state.open = false;
      // Deltas sent while the socket is down are lost: the reply is read back when it is done.
      const cut = state.streaming != null && state.replies.get(state.streaming);
      if (cut) cut._gap = true;
      state.ackedHere = new Set();
      updateButtons();
      if (ev.code === 1008) {
        setStatus("key refused");
        askKey();
        return;
      }
      setStatus("reconnecting…");
      setTimeout(connect, state.retry);
      state.retry = Math.min(state.retry * 2, 5000);
    };
  }

  function reconnect() {
    const old = state.ws;
    state.ws = null;
    if (old) old.close();
    connect();
  }

  function send(frame) {
    if (state.open && state.ws) state.ws.send(JSON.stringify(frame));
  }

  function subscribe(conv, after) {
    send({ type: "subscribe", conversation: conv, after_seq: after });
  }

  // ---- frames ----

  function onFrame(f) {
    if (f.conversation && f.conversation !== state.conv && f.type !== "created") {
      if (f.type === "ack" || f.type === "error") forgetPending(f.client_id);
      return;
    }
    switch (f.type) {
      case "subscribed": break;
      case "message": renderStored(f); break;
      case "ack": onAck(f); break;
      case "delta": onDelta(f); break;
      case "done": onDone(f); break;
      case "notice": break;
      case "error": onError(f); break;
      default: break;
    }
  }

  function forgetPending(cid) {
    if (cid && state.pending.delete(cid)) savePending();
  }

  function onAck(f) {
    forgetPending(f.client_id);
    state.ackedHere.add(f.seq);
    const mine = document.querySelector('[data-client-id="' + CSS.escape(f.client_id) + '"]');
    if (mine) {
      mine.classList.remove("pending");
      mine.dataset.seq = f.seq;
      state.shown.add(f.seq);
      state.lastSeq = Math.max(state.lastSeq, f.seq);
    } else if (!state.shown.has(f.seq)) {
      // Another tab or client sent it: show it as stored.
      fetchMessages(f.seq - 1, 1);
    }
    // A repeated ack (a message sent again after a reconnect) of a turn already answered.
    if (!state.shown.has(f.seq + 1)) state.streaming = f.seq;
    updateButtons();
  }

  function replyItem(replyTo) {
    let li = state.replies.get(replyTo);
    if (!li) {
      li = messageItem("assistant");
      li.dataset.replyTo = replyTo;
      li._text = "";
      // Joined mid-reply (another tab, a reload, a socket opened after the ack): the part
      // before is read back from the store when the reply is done.
      li._gap = !state.ackedHere.has(replyTo);
      state.replies.set(replyTo, li);
      $("messages").appendChild(li);
    }
    return li;
  }

  function onDelta(f) {
    const li = replyItem(f.reply_to);
    li._text += f.text;
    li.querySelector(".body").innerHTML = Markdown.render(li._text);
    state.streaming = f.reply_to;
    updateButtons();
    scrollDown();
  }

  async function onDone(f) {
    // A reply already shown from the store (a repeated done after a resend) only gets its badges.
    const known = state.shown.has(f.seq) && document.querySelector('.msg.assistant[data-seq="' + f.seq + '"]');
    if (known) {
      renderMeta(known, f);
      if (state.streaming === f.reply_to) state.streaming = null;
      updateButtons();
      return;
    }
    const li = replyItem(f.reply_to);
    li.dataset.seq = f.seq;
    state.shown.add(f.seq);
    state.lastSeq = Math.max(state.lastSeq, f.seq);
    if (f.tool_calls) renderCalls(li, f.tool_calls);
    if (li._gap) {
      // Part of it streamed while the socket was down: the stored reply is the whole of it.
      li._gap = false;
      try {
        const page = await api("/v1/conversations/" + f.conversation + "/messages?after_seq=" + (f.seq - 1) + "&limit=1");
        const m = page && page.data[0];
        if (m && m.seq === f.seq && typeof m.content === "string") li._text = m.content;
      } catch (_) { /* shown as far as it came */ }
    }
    li.querySelector(".body").innerHTML = Markdown.render(li._text || "");
    renderMeta(li, f);
    li.classList.add("done");
    if (state.streaming === f.reply_to) state.streaming = null;
    updateButtons();
    scrollDown();
    loadConversations(true);
  }

  function onError(f) {
    if (f.client_id) {
      forgetPending(f.client_id);
      const mine = document.querySelector('[data-client-id="' + CSS.escape(f.client_id) + '"]');
      if (mine && mine.classList.contains("pending")) mine.classList.add("failed");
    }
    if (f.reply_to && state.streaming === f.reply_to) state.streaming = null;
    if (f.reply_to) {
      const li = state.replies.get(f.reply_to);
      if (li) renderMeta(li, { finish_reason: "error" });
    }
    updateButtons();
    showError(f);
  }

  // ---- rendering ----

  function messageItem(role) {
    const li = document.createElement("li");
    li.className = "msg " + role;
    const body = document.createElement("div");
    body.className = "body";
    li.appendChild(body);
    return li;
  }

  function renderContent(li, content) {
    const body = li.querySelector(".body");
    if (typeof content === "string") {
      body.innerHTML = li.classList.contains("assistant") ? Markdown.render(content) : "";
      if (!li.classList.contains("assistant")) body.textContent = content;
      return;
    }
    // Parts: text as text, images by their URL (https: or data:image only).
    body.textContent = "";
    for (const part of content || []) {
      if (part.type === "text") {
        const p = document.createElement("p");
        p.textContent = part.text;
        body.appendChild(p);
      } else if (part.type === "image_url" && part.image_url) {
        const url = String(part.image_url.url || "");
        if (/^https:\/\//i.test(url) || /^data:image\/(png|jpeg|gif|webp);base64,/i.test(url)) {
          const img = document.createElement("img");
          img.src = url;
          img.alt = "image";
          img.referrerPolicy = "no-referrer";
          body.appendChild(img);
        }
      }
    }
  }

  function renderCalls(li, calls) {
    for (const c of calls) {
      const div = document.createElement("div");
      div.className = "tool-call";
      const fn = c.function || {};
      div.textContent = "🔧 " + (fn.name || "tool") + "(" + (fn.arguments || "") + ")";
      li.insertBefore(div, li.querySelector(".meta"));
    }
  }

  function badge(text, cls) {
    const b = document.createElement("span");
    b.className = "badge" + (cls ? " " + cls : "");
    b.textContent = text;
    return b;
  }

  // Costs are in the price table's currency; small ones keep their significant digits.
  function formatCost(c) {
    if (c === 0) return "0";
    return c >= 0.01 ? c.toFixed(4) : c.toPrecision(2);
  }

  function renderMeta(li, m) {
    let meta = li.querySelector(".meta");
    if (!meta) {
      meta = document.createElement("div");
      meta.className = "meta";
      li.appendChild(meta);
    }
    meta.textContent = "";
    if (m.cached) meta.appendChild(badge("cached", "cached"));
    if (m.tier) meta.appendChild(badge("tier " + m.tier));
    if (m.model) meta.appendChild(badge(m.model));
    if (m.usage) meta.appendChild(badge(m.usage.prompt_tokens + " + " + m.usage.completion_tokens + " tokens"));
    if (m.cost != null && !m.cached) meta.appendChild(badge("cost " + formatCost(m.cost)));
    if (m.ttft_ms != null) meta.appendChild(badge(m.ttft_ms + " ms to first token"));
    const fr = m.finish_reason;
    if (fr && fr !== "stop" && fr !== "tool_calls") meta.appendChild(badge(fr, "warn"));
  }

  function renderStored(m) {
    if (state.shown.has(m.seq)) return;
    state.shown.add(m.seq);
    state.lastSeq = Math.max(state.lastSeq, m.seq);
    if (m.client_id) forgetPending(m.client_id);
    // A message this page sent (acked while the socket was down): it is already shown.
    const mine = m.client_id && document.querySelector('[data-client-id="' + CSS.escape(m.client_id) + '"]');
    if (mine) {
      forgetPending(m.client_id);
      mine.classList.remove("pending");
      mine.dataset.seq = m.seq;
      return;
    }
    // A reply that was streaming when the socket dropped: its stored text replaces the part seen.
    const partial = m.role === "assistant" && state.replies.get(m.seq - 1);
    if (partial && !partial.dataset.seq) {
      partial.dataset.seq = m.seq;
      partial._text = typeof m.content === "string" ? m.content : "";
      partial.querySelector(".body").innerHTML = Markdown.render(partial._text);
      renderMeta(partial, m);
      partial.classList.add("done");
      if (state.streaming === m.seq - 1) state.streaming = null;
      updateButtons();
      return;
    }
    const li = messageItem(m.role);
    li.dataset.seq = m.seq;
    if (m.client_id) li.dataset.clientId = m.client_id;
    if (m.role === "assistant") {
      li._text = typeof m.content === "string" ? m.content : "";
      li.dataset.replyTo = m.seq - 1;
      li.classList.add("done");
      state.replies.set(m.seq - 1, li);
    }
    renderContent(li, m.content);
    if (m.tool_calls && m.tool_calls.length) renderCalls(li, m.tool_calls);
    if (m.role === "tool") {
      const label = document.createElement("small");
      label.textContent = "tool result" + (m.tool_call_id ? " for " + m.tool_call_id : "");
      li.prepend(label);
    }
    if (m.role === "assistant") renderMeta(li, m);
    // Keep seq order when a replay and live frames interleave.
    const list = $("messages");
    const after = [...list.children].find((x) => Number(x.dataset.seq) > m.seq);
    list.insertBefore(li, after || null);
    scrollDown();
  }

  function scrollDown() {
    const list = $("messages");
    list.scrollTop = list.scrollHeight;
  }

  function updateButtons() {
    const has = !!state.conv;
    $("input").disabled = !has;
    $("send").disabled = !has;
    $("cancel").disabled = !has || state.streaming == null;
  }

  // ---- conversations ----

  async function fetchMessages(after, limit) {
    if (!state.conv) return;
    const conv = state.conv;
    const page = await api("/v1/conversations/" + conv + "/messages?after_seq=" + after + "&limit=" + limit);
    if (conv !== state.conv || !page) return;
    for (const m of page.data) renderStored(m);
  }

  const ID = /^conv_[0-9a-f]{32}$/;

  async function openConversation(id) {
    if (!ID.test(id)) return;
    state.conv = id;
    state.lastSeq = 0;
    state.streaming = null;
    state.replies = new Map();
    state.shown = new Set();
    state.ackedHere = new Set();
    $("messages").textContent = "";
    location.hash = id;
    for (const b of document.querySelectorAll("#conversations button")) {
      b.setAttribute("aria-current", b.dataset.id === id ? "true" : "false");
    }
    updateButtons();
    let info = null;
    try {
      info = await api("/v1/conversations/" + id);
    } catch (_) {
      state.conv = null;
      updateButtons();
      return;
    }
    $("title").textContent = title(info);
    let after = 0;
    for (;;) {
      const page = await api("/v1/conversations/" + id + "/messages?after_seq=" + after + "&limit=500");
      if (state.conv !== id) return;
      for (const m of page.data) renderStored(m);
      if (page.data.length < 500) break;
      after = page.data[page.data.length - 1].seq;
    }
    // Live from here (and whatever was stored meanwhile).
    subscribe(id, state.lastSeq);
    // Messages of this conversation not yet acked (a reload mid-send): show them pending.
    for (const [cid, p] of state.pending) if (p.conversation === id) showPending(cid, p.content);
    $("input").focus();
  }

  function title(c) {
    const t = c && c.metadata && c.metadata.title;
    return t ? String(t) : c ? c.model + " · " + new Date(c.created_at * 1000).toLocaleString() : "";
  }

  async function loadConversations(reset) {
    if (reset) state.after = null;
    let page;
    try {
      page = await api("/v1/conversations?limit=30" + (state.after ? "&after=" + state.after : ""));
    } catch (_) {
      return;
    }
    const ul = $("conversations");
    if (reset) ul.textContent = "";
    for (const c of page.data) {
      const li = document.createElement("li");
      const b = document.createElement("button");
      b.type = "button";
      b.dataset.id = c.id;
      b.setAttribute("aria-current", c.id === state.conv ? "true" : "false");
      b.textContent = title(c);
      const small = document.createElement("small");
      small.textContent = c.model + " · " + c.id.slice(0, 13);
      b.appendChild(small);
      b.addEventListener("click", () => openConversation(c.id));
      li.appendChild(b);
      ul.appendChild(li);
    }
    state.after = page.has_more ? page.last_id : null;
    $("more").hidden = !page.has_more;
  }
  $("more").addEventListener("click", () => loadConversations(false));

  async function loadModels() {
    let list;
    try {
      list = await api("/v1/models");
    } catch (_) {
      return;
    }
    const sel = $("model");
    const keep = sel.value;
    sel.textContent = "";
    for (const m of list.data) {
      const o = document.createElement("option");
      o.value = o.textContent = m.id;
      sel.appendChild(o);
    }
    if (keep) sel.value = keep;
  }

  $("new-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = { model: $("model").value || undefined };
    const system = $("system").value.trim();
    if (system) body.system = system;
    let c;
    try {
      c = await api("/v1/conversations", { method: "POST", body: JSON.stringify(body) });
    } catch (_) {
      return;
    }
    await loadConversations(true);
    await openConversation(c.id);
  });

  // ---- sending ----

  function showPending(cid, content) {
    if (document.querySelector('[data-client-id="' + CSS.escape(cid) + '"]')) return;
    const li = messageItem("user");
    li.classList.add("pending");
    li.dataset.clientId = cid;
    renderContent(li, content);
    $("messages").appendChild(li);
    scrollDown();
  }

  function sendMessage() {
    const text = $("input").value;
    if (!text.trim() || !state.conv) return;
    const cid = crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random();
    const p = { conversation: state.conv, content: text };
    state.pending.set(cid, p);
    savePending();
    showPending(cid, text);
    $("input").value = "";
    send({ type: "user_message", conversation: state.conv, client_id: cid, content: text });
    // Name an untitled conversation after its first message.
    if (state.lastSeq === 0) {
      api("/v1/conversations/" + state.conv, { method: "GET" }).then((c) => {
        if (c && !(c.metadata && c.metadata.title)) $("title").textContent = text.slice(0, 60);
      }).catch(() => {});
    }
  }

  $("composer").addEventListener("submit", (ev) => { ev.preventDefault(); sendMessage(); });
  $("input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      sendMessage();
    }
  });
  function cancel() {
    if (state.conv && state.streaming != null) send({ type: "cancel", conversation: state.conv });
  }
  $("cancel").addEventListener("click", cancel);
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && !$("key-dialog").open) cancel();
  });

  // For tests and for people debugging a flaky network: drop the socket as a network would.
  window.parley = { dropSocket: () => state.ws && state.ws.close(), state };

  // ---- start ----

  connect();
  loadModels();
  loadConversations(true).then(() => {
    const id = location.hash.slice(1);
    if (id) openConversation(id);
  });
  updateButtons();
})();
