// chatq chat page. All user and bot text goes into the page with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const history = []; // the conversation, newest last; the last 10 go with each request
const MAX_HISTORY = 10;

for (const id of ["user", "guild", "personality", "token"]) {
  const saved = sessionStorage.getItem("chatq." + id);
  if (saved) $(id).value = saved;
  $(id).addEventListener("change", () => sessionStorage.setItem("chatq." + id, $(id).value));
}

function headers() {
  const h = { "content-type": "application/json" };
  const token = $("token").value.trim();
  if (token) h.authorization = "Bearer " + token;
  const guild = $("guild").value.trim();
  if (guild) h["x-guild-id"] = guild;
  return h;
}

async function loadModels() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (!r.ok) return;
    const body = await r.json();
    const select = $("personality");
    const current = select.value || sessionStorage.getItem("chatq.personality") || "chatq-helpful";
    select.textContent = "";
    for (const m of body.data) {
      if (!m.id.startsWith("chatq-")) continue;
      const option = document.createElement("option");
      option.value = m.id;
      option.textContent = m.id.slice(6) + " — " + m.description;
      select.appendChild(option);
    }
    select.value = current;
    if (body.chatq && body.chatq.upstream === "fallback") $("offline").classList.remove("hidden");
  } catch (e) {
    showError("Cannot reach the server.");
  }
}

function showError(text) {
  $("error").textContent = text;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? ($("user").value || "you") : "bot";
  const body = document.createElement("span");
  body.className = "body";
  body.textContent = text;
  div.append(who, body);
  $("log").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return body;
}

async function errorText(response) {
  let message = response.statusText;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (e) { /* not JSON */ }
  if (response.status === 429) {
    const wait = response.headers.get("retry-after");
    return "You are sending messages too fast. You can send again in " + (wait || "a few") + " seconds.";
  }
  return message;
}

async function send(text) {
  const user = $("user").value.trim();
  if (!user) { showError("Pick a name first."); $("user").focus(); return; }
  showError("");
  $("send").disabled = true;
  const messages = history.slice(-MAX_HISTORY).concat([{ role: "user", content: text }]);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({ model: $("personality").value || "chatq-helpful", messages, stream: true, user }),
    });
    if (!response.ok) { showError(await errorText(response)); return; }
    bubble("user", text);
    $("text").value = "";
    const out = bubble("assistant", "");
    let reply = "";
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (!frame.startsWith("data: ")) continue;
        const data = frame.slice(6);
        if (data === "[DONE]") continue;
        const event = JSON.parse(data);
        if (event.error) { showError(event.error.message); continue; }
        const delta = event.choices && event.choices[0] && event.choices[0].delta;
        if (delta && delta.content) {
          reply += delta.content;
          out.textContent = reply;
        }
      }
    }
    history.push({ role: "user", content: text }, { role: "assistant", content: reply || "…" });
    while (history.length > MAX_HISTORY) history.shift();
  } catch (e) {
    showError("The connection to the server failed: " + e.message);
  } finally {
    $("send").disabled = false;
    $("text").focus();
  }
}

$("compose").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("text").value.trim();
  if (text) send(text);
});

$("text").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("compose").requestSubmit();
  }
});

$("token").addEventListener("change", loadModels);
loadModels();
