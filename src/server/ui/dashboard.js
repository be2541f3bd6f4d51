// parley's operator dashboard: every number comes from an endpoint a script could call too —
// `/admin/providers`, `/admin/usage` and `/metrics` — read again every two seconds.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY = "parley.adminKey";
  let key = localStorage.getItem(KEY) || "";

  // The key is typed into a password field, never shown.
  $("admin-key").addEventListener("click", () => {
    $("key-input").value = key;
    $("key-dialog").showModal();
  });
  $("key-form").addEventListener("submit", (ev) => {
    const how = ev.submitter ? ev.submitter.value : "save";
    key = how === "clear" ? "" : $("key-input").value.trim();
    if (key) localStorage.setItem(KEY, key); else localStorage.removeItem(KEY);
    refresh();
  });

  async function get(path, text) {
    const headers = key ? { authorization: "Bearer " + key } : {};
    const resp = await fetch(path, { headers });
    if (!resp.ok) {
      const body = await resp.json().catch(() => null);
      const err = new Error((body && body.error && body.error.message) || resp.statusText);
      err.status = resp.status;
      throw err;
    }
    return text ? resp.text() : resp.json();
  }

  // Prometheus text → [{name, labels, value}].
  function parseMetrics(text) {
    const out = [];
    for (const line of text.split("\n")) {
      if (!line || line.startsWith("#")) continue;
      const m = line.match(/^([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)$/);
      if (!m) continue;
      const labels = {};
      if (m[3]) {
        for (const l of m[3].matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
      }
      out.push({ name: m[1], labels, value: Number(m[4]) });
    }
    return out;
  }

  const sum = (ms, name, f) => ms.filter((m) => m.name === name && (!f || f(m.labels))).reduce((a, m) => a + m.value, 0);

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    if (cls) td.className = cls;
    if (text instanceof Node) td.appendChild(text); else td.textContent = text;
    tr.appendChild(td);
  }

  function fill(id, rows) {
    const body = $(id).querySelector("tbody");
    body.textContent = "";
    for (const r of rows) {
      const tr = document.createElement("tr");
      for (const c of r) {
        if (typeof c === "object" && c && !(c instanceof Node)) cell(tr, c.text, c.cls);
        else cell(tr, c, typeof c === "number" ? "num" : undefined);
      }
      body.appendChild(tr);
    }
  }

  const fmt = (n, d = 0) => (n == null || Number.isNaN(n) ? "–" : Number(n).toLocaleString(undefined, { maximumFractionDigits: d, minimumFractionDigits: d }));

  async function providers() {
    const v = await get("/admin/providers");
    const rows = [];
    for (const p of v.data) {
      for (const d of p.deployments) {
        const b = document.createElement("span");
        b.className = "breaker-" + d.breaker;
        b.textContent = d.breaker.replace("_", "-");
        b.dataset.provider = p.name;
        rows.push([
          p.name, "#" + d.key_index, b,
          { text: fmt(d.in_flight) + (d.max_concurrency ? " / " + d.max_concurrency : ""), cls: "num" },
          p.queued,
          { text: d.rpm_capacity ? fmt(d.rpm_available) + " / " + fmt(d.rpm_capacity) : "∞", cls: "num" },
          { text: d.tpm_capacity ? fmt(d.tpm_available) + " / " + fmt(d.tpm_capacity) : "∞", cls: "num" },
          { text: fmt(100 * d.error_rate, 1) + " %", cls: "num" },
          { text: d.ttft_ms == null ? "–" : fmt(d.ttft_ms) + " ms", cls: "num" },
          d.served,
        ]);
      }
    }
    fill("providers", rows);
  }

  async function metrics() {
    const ms = parseMetrics(await get("/metrics", true));
    $("sockets").textContent = fmt(sum(ms, "parley_ws_connections"));
    $("live").textContent = fmt(sum(ms, "parley_live_conversations"));
    $("turns").textContent = fmt(sum(ms, "parley_turns_total"));
    const hits = sum(ms, "parley_cache_lookups_total", (l) => l.result === "hit");
    $("cache").textContent = fmt(hits) + " / " + fmt(sum(ms, "parley_cache_lookups_total"));
    const redis = ms.find((m) => m.name === "parley_redis_up");
    $("redis").textContent = redis ? (redis.value ? "up" : "DOWN") : "not used";
    fill("errors", ms.filter((m) => m.name === "parley_errors_total").map((m) => [m.labels.provider, m.labels.code, m.value]));
    fill("guards", ms.filter((m) => m.name === "parley_cache_near_misses_total").map((m) => [m.labels.guard, m.value]));
    fill("tiers", ms.filter((m) => m.name === "parley_tier_decisions_total").map((m) => [m.labels.route, m.labels.tier, m.labels.reason, m.value]));
  }

  async function usage() {
    const tenant = $("tenant").value.trim();
    const from = new Date(Date.now() - 13 * 86400e3).toISOString().slice(0, 10);
    const q = "from=" + from + (tenant ? "&tenant=" + encodeURIComponent(tenant) : "");
    const [days, models] = await Promise.all([
      get("/admin/usage?group_by=day&" + q),
      get("/admin/usage?group_by=model&" + q),
    ]);
    fill("by-model", models.data.map((r) => [r.group, r.requests, r.cached_requests, r.total_tokens, { text: fmt(r.cost, 4), cls: "num" }]));
    draw(days.data);
  }

  // Cost per day as bars, requests as a line; drawn on a canvas, no library.
  function draw(rows) {
    const c = $("chart");
    const g = c.getContext("2d");
    const css = getComputedStyle(document.documentElement);
    const fg = css.getPropertyValue("--fg").trim() || "#000";
    const accent = css.getPropertyValue("--accent").trim() || "#24c";
    g.clearRect(0, 0, c.width, c.height);
    const days = [];
    for (let i = 13; i >= 0; i--) days.push(new Date(Date.now() - i * 86400e3).toISOString().slice(0, 10));
    const by = new Map(rows.map((r) => [r.group, r]));
    const cost = days.map((d) => (by.get(d) || {}).cost || 0);
    const reqs = days.map((d) => (by.get(d) || {}).requests || 0);
    const maxC = Math.max(...cost, 1e-9), maxR = Math.max(...reqs, 1);
    const pad = 30, w = (c.width - 2 * pad) / days.length, h = c.height - 2 * pad;
    g.font = "11px system-ui";
    g.fillStyle = fg;
    g.fillText("cost (bars, max " + maxC.toFixed(4) + ") · requests (line, max " + maxR + ")", pad, 16);
    days.forEach((d, i) => {
      const bh = (cost[i] / maxC) * h;
      g.fillStyle = accent;
      g.fillRect(pad + i * w + 3, pad + h - bh, w - 6, bh);
      g.fillStyle = fg;
      if (i % 2 === 0) g.fillText(d.slice(5), pad + i * w + 2, c.height - 10);
    });
    g.strokeStyle = fg;
    g.beginPath();
    reqs.forEach((r, i) => {
      const x = pad + i * w + w / 2, y = pad + h - (r / maxR) * h;
      if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
    });
    g.stroke();
  }

  async function refresh() {
    const box = $("error");
    try {
      await Promise.all([providers(), metrics(), usage()]);
      box.hidden = true;
      $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    } catch (e) {
      box.textContent = e.status === 401
        ? "The admin key was refused: set it with “Admin key…”."
        : "Could not read the server: " + e.message;
      box.hidden = false;
    }
  }

  $("tenant").addEventListener("change", refresh);
  // The next refresh is due two seconds after the last one ended (a slow server is never asked
  // again before it answered).
  (async function loop() {
    await refresh();
    setTimeout(loop, 2000);
  })();
})();
