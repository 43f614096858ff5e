// chatq admin dashboard. The admin token lives in this tab's sessionStorage only.
// All job, log and guild text is set with textContent, never as HTML; the charts are SVG
// elements built here, nothing is loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const HOUR = 3600000;
let cursor = null;
let timer = null;
let chartTimer = null;

function token() { return sessionStorage.getItem("chatq.admin") || ""; }

async function api(path, options = {}) {
  const headers = { "content-type": "application/json" };
  if (token()) headers.authorization = "Bearer " + token();
  const response = await fetch(path, Object.assign({ headers }, options));
  let body = null;
  try { body = await response.json(); } catch (e) { /* empty */ }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : response.statusText;
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return body;
}

function svg(name, attrs, text) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  if (text != null) el.textContent = String(text);
  return el;
}

/** The key /v1/usage?group_by=hour gives the hour starting at `ms` (UTC). */
function hourKey(ms) { return new Date(ms).toISOString().slice(0, 13) + ":00Z"; }

/** Requests, failures and fallbacks per hour: one group of three bars per hour. */
function drawHours(buckets) {
  const chart = $("chart-hours");
  const [w, h, left, top, bottom] = [480, 160, 30, 8, 22];
  chart.setAttribute("viewBox", `0 0 ${w} ${h}`);
  const max = Math.max(1, ...buckets.map((b) => b.row.requests));
  const plot = h - top - bottom;
  const slot = (w - left - 4) / buckets.length;
  const y = (n) => top + plot - (n / max) * plot;
  const parts = [
    svg("line", { x1: left, y1: top + plot, x2: w - 4, y2: top + plot, stroke: "#d0d5dd" }),
    svg("text", { x: left - 4, y: top + 8, "text-anchor": "end" }, max),
    svg("text", { x: left - 4, y: top + plot, "text-anchor": "end" }, 0),
  ];
  buckets.forEach((b, i) => {
    const x = left + i * slot;
    const bar = (kind, n, dx, bw) => {
      const rect = svg("rect", { class: kind, x: x + dx, y: y(n), width: bw, height: top + plot - y(n), "data-hour": b.key, "data-value": n });
      rect.append(svg("title", {}, `${new Date(b.t).toLocaleString()}: ${n} ${kind}`));
      return rect;
    };
    parts.push(bar("requests", b.row.requests, slot * 0.1, slot * 0.4));
    parts.push(bar("failed", b.row.failed, slot * 0.5, slot * 0.2));
    parts.push(bar("fallback", b.row.fallback, slot * 0.7, slot * 0.2));
    const last = i === buckets.length - 1;
    if (i % 6 === 0 || last) {
      const label = new Date(b.t).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
      const at = last ? { x: x + slot, "text-anchor": "end" } : { x: x + slot / 2, "text-anchor": "middle" };
      parts.push(svg("text", Object.assign({ y: h - 6 }, at), label));
    }
  });
  chart.replaceChildren(...parts);
}

/** Upstream tokens (prompt + completion) by guild, the largest first. */
function drawGuilds(rows) {
  const chart = $("chart-guilds");
  const top8 = rows
    .map((r) => ({ key: r.key, tokens: r.prompt_tokens + r.completion_tokens }))
    .filter((r) => r.tokens > 0)
    .sort((a, b) => b.tokens - a.tokens)
    .slice(0, 8);
  const [w, rowH, labelW] = [480, 18, 110];
  const h = Math.max(40, top8.length * rowH + 8);
  chart.setAttribute("viewBox", `0 0 ${w} ${h}`);
  if (top8.length === 0) {
    chart.replaceChildren(svg("text", { x: 4, y: 20 }, "No upstream tokens in the last 24 hours"));
    return;
  }
  const max = top8[0].tokens;
  const parts = [];
  top8.forEach((r, i) => {
    const y = 4 + i * rowH;
    const bw = Math.max(1, ((w - labelW - 60) * r.tokens) / max);
    parts.push(svg("text", { x: labelW - 6, y: y + 12, "text-anchor": "end" }, r.key.length > 18 ? r.key.slice(0, 17) + "…" : r.key));
    const rect = svg("rect", { class: "tokens", x: labelW, y: y + 2, width: bw, height: rowH - 6, "data-guild": r.key, "data-value": r.tokens });
    rect.append(svg("title", {}, `${r.key}: ${r.tokens} tokens`));
    parts.push(rect, svg("text", { x: labelW + bw + 4, y: y + 12 }, r.tokens.toLocaleString()));
  });
  chart.replaceChildren(...parts);
}

async function drawCharts() {
  try {
    const start = Math.floor(Date.now() / HOUR) * HOUR - 23 * HOUR;
    const hours = await api("/v1/usage?group_by=hour&since=" + start);
    const byKey = new Map(hours.data.map((r) => [r.key, r]));
    const empty = { requests: 0, failed: 0, fallback: 0 };
    const buckets = Array.from({ length: 24 }, (_, i) => {
      const t = start + i * HOUR;
      return { t, key: hourKey(t), row: byKey.get(hourKey(t)) || empty };
    });
    drawHours(buckets);
    drawGuilds((await api("/v1/usage?group_by=guild&since=" + start)).data);
  } catch (e) {
    $("error").textContent = e.message;
  }
}

// ---------------------------------------------------------------- guild settings

const NUMBER_FIELDS = ["temperature", "max_tokens", "daily_token_quota", "cache_ttl_secs", "history_turns"];

/** A form value as JSON: null when empty, a number when it reads as one, else the text as
 * typed (the server then says which field is wrong). */
function value(id) {
  const v = $(id).value.trim();
  if (v === "") return null;
  return /^-?\d+(\.\d+)?$/.test(v) ? Number(v) : v;
}

function settingsFromForm() {
  const settings = {
    personality: $("g-personality").value || null,
    model: value("g-model"),
    instructions: $("g-instructions").value.trim() || null,
  };
  for (const f of NUMBER_FIELDS) settings[f] = value("g-" + f);
  const limit = value("g-limit");
  if (limit !== null) settings.rate_limit = { limit, window_secs: value("g-window") ?? 60 };
  const allowed = $("g-allowed").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (allowed.length) settings.allowed_personalities = allowed;
  return settings;
}

function fillForm(guild) {
  const s = guild ? guild.settings : {};
  $("g-id").value = guild ? guild.guild_id : "";
  $("g-personality").value = s.personality || "";
  $("g-model").value = s.model || "";
  $("g-instructions").value = s.instructions || "";
  for (const f of NUMBER_FIELDS) $("g-" + f).value = s[f] ?? "";
  $("g-limit").value = s.rate_limit ? s.rate_limit.limit : "";
  $("g-window").value = s.rate_limit ? s.rate_limit.window_secs : "";
  $("g-allowed").value = (s.allowed_personalities || []).join(", ");
}

async function loadGuilds() {
  const guilds = await api("/v1/guilds");
  fill("guilds", guilds.data.map((g) => {
    const s = g.settings;
    const tr = document.createElement("tr");
    tr.dataset.guild = g.guild_id;
    const edit = document.createElement("td");
    const b = document.createElement("button");
    b.type = "button";
    b.className = "secondary";
    b.textContent = "Edit";
    b.addEventListener("click", () => fillForm(g));
    edit.appendChild(b);
    tr.append(cell(g.guild_id), cell(s.personality || "default"), cell(s.model || "default"),
      cell(s.rate_limit ? `${s.rate_limit.limit} / ${s.rate_limit.window_secs} s` : "default"),
      cell(s.daily_token_quota ?? "unlimited"), cell(s.cache_ttl_secs != null ? s.cache_ttl_secs + " s" : "default"),
      cell(s.history_turns ?? 10), edit,
      button("Remove", () => api("/v1/guilds/" + encodeURIComponent(g.guild_id), { method: "DELETE" })));
    return tr;
  }));
}

async function loadPersonalities() {
  const models = await api("/v1/models");
  const names = models.data.map((m) => m.id).filter((id) => id.startsWith("chatq-")).map((id) => id.slice(6));
  const select = $("g-personality");
  select.replaceChildren(select.options[0], ...names.map((n) => {
    const o = document.createElement("option");
    o.value = n;
    o.textContent = n;
    return o;
  }));
}

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  return td;
}

function button(label, onClick) {
  const td = document.createElement("td");
  const b = document.createElement("button");
  b.type = "button";
  b.className = "secondary";
  b.textContent = label;
  b.addEventListener("click", async () => {
    b.disabled = true;
    try { await onClick(); $("error").textContent = ""; } catch (e) { $("error").textContent = e.message; }
    refresh();
  });
  td.appendChild(b);
  return td;
}

function fill(tbody, rows) {
  $(tbody).replaceChildren(...rows);
}

async function refresh() {
  try {
    const stats = await api("/v1/queue/stats");
    const counts = ["queued", "active", "delayed", "completed", "failed", "cancelled"].map((k) => {
      const div = document.createElement("div");
      div.className = "count";
      div.id = "count-" + k;
      const b = document.createElement("b");
      b.textContent = stats[k];
      div.append(b, document.createTextNode(k));
      return div;
    });
    $("counts").replaceChildren(...counts);
    const disk = stats.disk || {};
    let diskText = disk.free_bytes == null ? "" : " · disk " + (disk.free_bytes / 1073741824).toFixed(1) + " GiB free";
    if (disk.accepting_jobs === false) {
      diskText += " · NOT accepting new jobs: " +
        (disk.failure ? "recovering from a disk error" : "disk below the free-space reserve");
    }
    $("state").textContent = (stats.paused ? "Paused" : "Running") + " · " + stats.workers + " workers · " +
      (stats.upstream === "fallback" ? "offline fallback replies" : "model " + stats.model) + diskText;
    const failed = await api("/v1/jobs?state=failed&limit=20");
    fill("failed", failed.data.map((j) => {
      const tr = document.createElement("tr");
      tr.append(cell(j.id), cell(j.user_id), cell(j.error ? j.error.message : ""),
        button("Retry", () => api("/v1/chat/jobs/" + j.id + "/retry", { method: "POST" })));
      return tr;
    }));
    const queued = await api("/v1/jobs?state=queued&limit=20");
    const delayed = await api("/v1/jobs?state=delayed&limit=20");
    fill("queued", queued.data.concat(delayed.data).map((j) => {
      const tr = document.createElement("tr");
      tr.append(cell(j.id), cell(j.user_id), cell(j.status), cell(j.prompt),
        button("Cancel", () => api("/v1/chat/jobs/" + j.id, { method: "DELETE" })));
      return tr;
    }));
    await loadGuilds();
    const recent = await api("/v1/jobs?state=completed&limit=10");
    fill("recent", recent.data.map((j) => {
      const tr = document.createElement("tr");
      tr.append(cell(j.id), cell(j.user_id), cell(j.prompt), cell(j.result ? j.result.reply : ""));
      return tr;
    }));
  } catch (e) {
    $("error").textContent = e.message;
  }
}

async function loadLog(more) {
  const params = new URLSearchParams({ limit: "20" });
  if ($("f-user").value.trim()) params.set("user_id", $("f-user").value.trim());
  if ($("f-guild").value.trim()) params.set("guild_id", $("f-guild").value.trim());
  if (more && cursor) params.set("cursor", cursor);
  try {
    const page = await api("/v1/interactions?" + params);
    const rows = page.data.map((e) => {
      const tr = document.createElement("tr");
      tr.append(cell(new Date(e.timestamp).toLocaleString()), cell(e.user_id), cell(e.guild_id), cell(e.action),
        cell(e.prompt), cell(e.reply != null ? e.reply : e.error));
      return tr;
    });
    if (more) $("entries").append(...rows); else fill("entries", rows);
    cursor = page.next_cursor;
    $("more").classList.toggle("hidden", !cursor);
  } catch (e) {
    $("error").textContent = e.message;
  }
}

/** Opens the dashboard; `quietly` (at page load) asks for a token only if one is needed. */
async function open(quietly) {
  try {
    await api("/v1/queue/stats");
  } catch (e) {
    $("login").classList.remove("hidden");
    if (!(quietly && (e.status === 401 || e.status === 403))) $("error").textContent = e.message;
    return;
  }
  $("error").textContent = "";
  $("login").classList.add("hidden");
  $("panel").classList.remove("hidden");
  await loadPersonalities().catch((e) => { $("error").textContent = e.message; });
  await refresh();
  await loadLog(false);
  await drawCharts();
  clearInterval(timer);
  timer = setInterval(refresh, 2000);
  clearInterval(chartTimer);
  chartTimer = setInterval(drawCharts, 30000);
}

$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem("chatq.admin", $("token").value.trim());
  open(false);
});
$("guild-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const id = $("g-id").value.trim();
  try {
    await api("/v1/guilds/" + encodeURIComponent(id), { method: "PUT", body: JSON.stringify(settingsFromForm()) });
    $("error").textContent = "";
    $("guild-form").dataset.saved = id;
    await loadGuilds();
  } catch (err) {
    $("error").textContent = "Guild " + id + ": " + err.message;
  }
});
$("g-clear").addEventListener("click", () => fillForm(null));
$("pause").addEventListener("click", async () => { await api("/v1/queue/pause", { method: "POST" }).catch((e) => { $("error").textContent = e.message; }); refresh(); });
$("resume").addEventListener("click", async () => { await api("/v1/queue/resume", { method: "POST" }).catch((e) => { $("error").textContent = e.message; }); refresh(); });
$("filter").addEventListener("submit", (e) => { e.preventDefault(); loadLog(false); });
$("more").addEventListener("click", () => loadLog(true));

// Straight in where no token is needed (a loopback server without one, or a token this tab
// already gave); otherwise the token form shows.
open(true);
