// chatq admin dashboard. The admin token lives in this tab's sessionStorage only.
// All job and log text is set with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let cursor = null;
let timer = null;

function token() { return sessionStorage.getItem("chatq.admin") || ""; }

async function api(path, options = {}) {
  const headers = { "content-type": "application/json" };
  if (token()) headers.authorization = "Bearer " + token();
  const response = await fetch(path, Object.assign({ headers }, options));
  let body = null;
  try { body = await response.json(); } catch (e) { /* empty */ }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : response.statusText;
    throw new Error(message);
  }
  return body;
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

async function open() {
  try {
    await api("/v1/queue/stats");
  } catch (e) {
    $("error").textContent = e.message;
    return;
  }
  $("error").textContent = "";
  $("login").classList.add("hidden");
  $("panel").classList.remove("hidden");
  await refresh();
  await loadLog(false);
  clearInterval(timer);
  timer = setInterval(refresh, 2000);
}

$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem("chatq.admin", $("token").value.trim());
  open();
});
$("pause").addEventListener("click", async () => { await api("/v1/queue/pause", { method: "POST" }).catch((e) => { $("error").textContent = e.message; }); refresh(); });
$("resume").addEventListener("click", async () => { await api("/v1/queue/resume", { method: "POST" }).catch((e) => { $("error").textContent = e.message; }); refresh(); });
$("filter").addEventListener("submit", (e) => { e.preventDefault(); loadLog(false); });
$("more").addEventListener("click", () => loadLog(true));

if (sessionStorage.getItem("chatq.admin") !== null) open();
