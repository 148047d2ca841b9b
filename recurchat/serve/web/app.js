/* recurchat chat page logic: sends the conversation to /v1/chat/completions with stream + return_depths, parses
   the SSE stream from fetch(), renders each token as <span class="tok" data-depth> tinted by recursion depth, draws
   a per-message depth bar chart (inline SVG) and a colour legend.
   Served at /web/app.js by `recurchat serve --ckpt DIR`; exercised by `pytest tests/serve/test_web.py`. */
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: "recurchat", rMax: 16, meanRecur: 4, history: [], abort: null };

// Viridis stops: perceptually ordered, so "deeper" always reads as "darker/cooler" at a glance.
const STOPS = [[253, 231, 37], [94, 201, 98], [33, 145, 140], [59, 82, 139], [68, 1, 84]];

function depthRGB(depth, max) {
  if (!(depth > 0)) return [200, 200, 200];  // depth 0: a standard (non-recursive) model
  const t = max <= 1 ? 0 : Math.min(1, Math.max(0, (depth - 1) / (max - 1)));
  const x = t * (STOPS.length - 1), i = Math.min(STOPS.length - 2, Math.floor(x)), f = x - i;
  return STOPS[i].map((c, k) => Math.round(c + f * (STOPS[i + 1][k] - c)));
}
// Tokens sit on a translucent tint so the text stays readable on the darkest colours.
const tint = (d, max) => `rgba(${depthRGB(d, max).join(",")}, 0.45)`;
const solid = (d, max) => `rgb(${depthRGB(d, max).join(",")})`;

// One scale for the whole page (1 … max(r_max, the chosen depth)), so a colour means the same depth in every message.
function scaleMax() {
  const chosen = $("mode-exit").checked ? +$("max-recur").value : +$("num-recur").value;
  return Math.max(1, state.rMax, chosen || 0);
}

function recolor() {
  const max = scaleMax();
  document.querySelectorAll("span.tok").forEach((s) => { s.style.backgroundColor = tint(+s.dataset.depth, max); });
  document.querySelectorAll(".msg.assistant").forEach((m) => drawChart(m.querySelector("svg"), m.depths ?? [], max));
}

function drawLegend() {
  const max = scaleMax(), legend = $("legend");
  legend.replaceChildren();
  const step = Math.ceil(max / 16);  // at most 16 swatches
  for (let d = 1; d <= max; d += step) {
    const s = document.createElement("span");
    s.className = "swatch";
    s.dataset.depth = d;
    s.textContent = d;
    s.style.background = solid(d, max);
    s.style.color = d > max / 2 ? "#fff" : "#000";
    legend.append(s);
  }
  const note = document.createElement("div");
  note.className = "legend-note";
  note.textContent = "recursions per token: light = shallow, dark = deep";
  legend.append(note);
  recolor();
}

// ring:K is defined at a fixed depth only (the server refuses it with an exit criterion): offer it only then
function syncKv() {
  const exit = $("mode-exit").checked;
  for (const opt of $("kv").options) if (opt.value.startsWith("ring:")) opt.disabled = exit;
  if (exit && $("kv").value.startsWith("ring:")) $("kv").value = "full";
}

function recursionBody() {
  if ($("mode-exit").checked) {
    return { exit: `${$("exit-kind").value}:${$("exit-threshold").value}`, max_recur: +$("max-recur").value };
  }
  return { num_recur: +$("num-recur").value };
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  if (role === "assistant") {
    div.innerHTML = '<div class="body"></div><svg class="depth-chart" height="40"></svg><div class="meta"></div>';
  } else {
    div.textContent = text;
  }
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function addTokens(msg, text, depths, max) {
  const span = document.createElement("span");
  span.className = "tok";
  const d = depths.length ? Math.max(...depths) : 0;  // a chunk of several tokens shows its deepest
  span.dataset.depth = d;
  span.dataset.depths = depths.join(",");
  span.title = `depth ${depths.join(", ")}`;
  span.style.backgroundColor = tint(d, max);
  span.textContent = text;
  msg.querySelector(".body").append(span);
}

function drawChart(svg, depths, max) {
  const n = depths.length, width = Math.max(60, Math.min(640, n * 6)), h = 40, bw = width / Math.max(1, n);
  svg.setAttribute("width", width);
  svg.setAttribute("viewBox", `0 0 ${width} ${h}`);
  svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg";
  depths.forEach((d, i) => {
    const r = document.createElementNS(ns, "rect"), bh = Math.max(1, (h - 2) * Math.min(d, max) / max);
    r.setAttribute("x", (i * bw).toFixed(2));
    r.setAttribute("y", (h - bh).toFixed(2));
    r.setAttribute("width", Math.max(0.5, bw - 0.5).toFixed(2));
    r.setAttribute("height", bh.toFixed(2));
    r.setAttribute("fill", solid(d, max));
    const t = document.createElementNS(ns, "title");
    t.textContent = `token ${i + 1}: depth ${d}`;
    r.append(t);
    svg.append(r);
  });
}

function showError(text) {
  const div = addMessage("error", text);
  $("status").textContent = "error";
  return div;
}

// Yields each SSE event's data payload ("data: …" lines) as the bytes arrive.
async function* sseData(response) {
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data) yield data;
    }
  }
}

function headers() {
  const h = { "Content-Type": "application/json" }, key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function send(text) {
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const msg = addMessage("assistant"), depths = [];
  msg.depths = depths;
  let reply = "", usage = null, finish = null;
  const started = performance.now();
  state.abort = new AbortController();
  $("send").disabled = true; $("stop").disabled = false;
  $("status").textContent = "generating…";
  try {
    const body = { model: state.model, messages: state.history, stream: true, return_depths: true,
                   temperature: +$("temperature").value, max_tokens: +$("max-tokens").value,
                   recursion: recursionBody(), kv_strategy: $("kv").value };
    const res = await fetch("v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
                                                      signal: state.abort.signal });
    if (!res.ok) {
      const err = await res.json().catch(() => ({}));
      msg.remove();
      state.history.pop();
      showError(`${res.status}: ${err.error?.message ?? res.statusText}`);
      return;
    }
    for await (const data of sseData(res)) {
      if (data === "[DONE]") break;
      const obj = JSON.parse(data);
      if (obj.error) { showError(obj.error.message); break; }
      const c = obj.choices?.[0];
      if (obj.usage) usage = obj.usage;
      if (!c) continue;
      const piece = c.delta?.content ?? "", ds = c.depths ?? [];
      if (piece || ds.length) {
        addTokens(msg, piece, ds, scaleMax());
        reply += piece;
        depths.push(...ds);
        drawChart(msg.querySelector("svg"), depths, scaleMax());
      }
      if (c.finish_reason) finish = c.finish_reason;
    }
  } catch (e) {
    if (e.name !== "AbortError") showError(String(e));
    finish = finish ?? "stopped";
  } finally {
    state.abort = null;
    $("send").disabled = false; $("stop").disabled = true;
  }
  state.history.push({ role: "assistant", content: reply });
  const secs = (performance.now() - started) / 1000, n = usage?.completion_tokens ?? depths.length;
  const mean = usage?.mean_depth ?? (depths.reduce((a, b) => a + b, 0) / Math.max(1, depths.length));
  msg.querySelector(".meta").textContent =
    `${n} tokens · mean depth ${(+mean).toFixed(2)} · max ${usage?.max_depth ?? Math.max(0, ...depths)} · ` +
    `${(n / secs).toFixed(1)} tok/s · ${finish ?? ""}`;
  msg.dataset.done = "1";
  $("status").textContent = "ready";
}

async function loadModel() {
  try {
    const res = await fetch("v1/models", { headers: headers() });
    if (!res.ok) { $("model-name").textContent = `models: ${res.status}`; return; }
    const card = (await res.json()).data[0];
    state.model = card.id;
    state.rMax = card.recursion?.r_max ?? state.rMax;
    state.meanRecur = card.recursion?.mean_recur ?? state.meanRecur;
    $("model-name").textContent = `${card.id} · ctx ${card.context_length} · r̄ ${state.meanRecur} · r_max ${state.rMax}`;
    $("num-recur").value = state.meanRecur;
    $("max-recur").value = state.rMax;
    $("max-tokens").value = Math.min(+$("max-tokens").value, card.context_length);
    drawLegend();
  } catch (e) {
    $("model-name").textContent = "server unreachable";
  }
}

function init() {
  $("api-key").value = localStorage.getItem("recurchat-api-key") ?? "";
  $("api-key").addEventListener("change", () => { localStorage.setItem("recurchat-api-key", $("api-key").value); loadModel(); });
  for (const id of ["mode-fixed", "mode-exit", "num-recur", "max-recur"]) $(id).addEventListener("input", drawLegend);
  for (const id of ["mode-fixed", "mode-exit"]) $(id).addEventListener("change", syncKv);
  syncKv();
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || state.abort) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => state.abort?.abort());
  $("clear").addEventListener("click", () => { state.history = []; $("messages").replaceChildren(); });
  drawLegend();
  loadModel();
  $("status").textContent = "ready";
}

init();
