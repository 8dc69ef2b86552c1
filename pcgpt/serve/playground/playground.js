// pcgpt playground: a client of the public API only (/v1/models, /v1/completions streamed with
// logprobs and uncertainty). Model output and prompts are text: they reach the page through
// textContent only, never as HTML.
"use strict";

const KEY_STORAGE = "pcgpt-api-key";
const TOP_ALTERNATIVES = 5;
const SIGNALS = {
  entropy: {name: "entropy", unit: "bits", pc: false},
  surprise: {name: "surprise", unit: "bits", pc: false},
  kl_settle: {name: "kl_settle", unit: "bits", pc: true},
  energy: {name: "energy", unit: "per free unit", pc: true},
  steps: {name: "settle steps", unit: "steps", pc: true},
};
const SAMPLING_FIELDS = ["temperature", "top_k", "top_p", "min_p", "repetition_penalty", "settle_steps"];
const ERROR_DRIVEN_FIELDS = ["mirostat_tau", "mirostat_eta", "precision_gain"];
const PRESETS = {
  "baseline-pc": [{model: "gpt"}, {model: "pc"}],
  "pc-settle": [{model: "pc", settle_steps: "0"}, {model: "pc", settle_steps: "4"}],
  "standard-ed": [{sampler: "standard", temperature: "0.8"}, {sampler: "error_driven", temperature: "0.8"}],
};

const $ = (id) => document.getElementById(id);
const state = {models: [], configs: [], columns: [], controller: null, pinned: null};

class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

// --- the API ---------------------------------------------------------------------------------

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function apiError(response) {
  let message = `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (e) { /* not JSON: keep the status */ }
  return new ApiError(message, response.status);
}

async function loadModels() {
  const response = await fetch("v1/models", {headers: headers()});
  if (response.status === 401) {
    askForKey((await apiError(response)).message);
    return;
  }
  if (!response.ok) throw await apiError(response);
  $("key-form").hidden = true;
  state.models = (await response.json()).data;
  for (const config of state.configs) fillModels(config);
  $("run").disabled = state.models.length === 0;
}

function askForKey(message) {
  sessionStorage.removeItem(KEY_STORAGE);
  $("key-form").hidden = false;
  $("key-error").textContent = message;
  $("api-key").value = "";
  $("api-key").focus();
  $("run").disabled = true;
}

// Reads a completion's server-sent events; calls onChunk with each parsed chunk.
async function streamCompletion(body, signal, onChunk) {
  const response = await fetch("v1/completions", {method: "POST", headers: headers(), body: JSON.stringify(body), signal});
  if (!response.ok) throw await apiError(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(chunk.error.message, 500);
        onChunk(chunk);
      }
    }
  }
}

// --- configurations --------------------------------------------------------------------------

function makeConfig(label) {
  const node = $("config-template").content.firstElementChild.cloneNode(true);
  node.querySelector("legend").textContent = label;
  const fields = {};
  for (const el of node.querySelectorAll("[data-field]")) {
    fields[el.dataset.field] = el;
    if (el.tagName !== "SPAN") el.id = `${el.dataset.field}-${label.slice(-1).toLowerCase()}`;
  }
  const config = {label, node, fields};
  fields.model.addEventListener("change", () => updateConfig(config));
  fields.sampler.addEventListener("change", () => updateConfig(config));
  $("configs").append(node);
  return config;
}

function fillModels(config) {
  const select = config.fields.model;
  const previous = select.value;
  select.replaceChildren();
  for (const m of state.models) {
    const option = document.createElement("option");
    option.value = m.id;
    const kind = m.model_type === "pc" ? "PC" : "baseline";
    option.textContent = `${m.id} (${kind}, ${formatCount(m.parameters)} params, ctx ${m.context_length})`;
    select.append(option);
  }
  if (state.models.some((m) => m.id === previous)) select.value = previous;
  else if (config === state.configs[1] && state.models.length > 1) select.value = state.models[1].id;
  updateConfig(config);
}

function modelCard(config) {
  return state.models.find((m) => m.id === config.fields.model.value);
}

function updateConfig(config) {
  const card = modelCard(config);
  const pc = card && card.model_type === "pc";
  const settle = config.fields.settle_steps;
  settle.disabled = !pc;
  if (pc) {
    settle.max = card.max_settle_steps ?? 16;
    settle.placeholder = `default ${card.default_settle_steps ?? ""}`;
    config.fields["settle-note"].textContent = "";
  } else {
    settle.value = "";
    settle.placeholder = "";
    config.fields["settle-note"].textContent = "baseline GPT: it does not settle";
  }
  const errorDriven = config.fields.sampler.value === "error_driven";
  for (const name of ERROR_DRIVEN_FIELDS) config.fields[name].disabled = !errorDriven;
}

function applyPreset(name) {
  const preset = PRESETS[name];
  if (!preset) return;
  preset.forEach((values, i) => {
    const config = state.configs[i];
    for (const [field, value] of Object.entries(values)) {
      if (field === "model") {
        const m = state.models.find((card) => card.model_type === value);
        if (m) config.fields.model.value = m.id;
      } else {
        config.fields[field].value = value;
      }
    }
    if (!("settle_steps" in values)) config.fields.settle_steps.value = "";
    updateConfig(config);
  });
}

function requestBody(config) {
  const body = {
    model: config.fields.model.value, prompt: $("prompt").value, stream: true,
    stream_options: {include_usage: true}, logprobs: TOP_ALTERNATIVES, uncertainty: true,
    sampler: config.fields.sampler.value,
  };
  const number = (el) => (el.disabled || el.value.trim() === "" ? undefined : Number(el.value));
  body.max_tokens = number($("max_tokens"));
  body.seed = number($("seed"));
  for (const name of SAMPLING_FIELDS) body[name] = number(config.fields[name]);
  if (body.sampler === "error_driven") for (const name of ERROR_DRIVEN_FIELDS) body[name] = number(config.fields[name]);
  return body;
}

function describe(body) {
  const parts = [body.model];
  if (body.settle_steps !== undefined) parts.push(`T = ${body.settle_steps}`);
  parts.push(body.temperature === 0 ? "greedy" : `temperature ${body.temperature ?? 1}`);
  if (body.sampler === "error_driven") parts.push("error-driven");
  return parts.join(" · ");
}

// --- a run -----------------------------------------------------------------------------------

function makeColumn(body) {
  const node = $("column-template").content.firstElementChild.cloneNode(true);
  node.querySelector(".column-title").textContent = describe(body);
  node.querySelector(".prompt-text").textContent = body.prompt;
  const column = {
    body, node, tokens: [], text: "", started: 0, first: 0, last: 0, finish: null, usage: null,
    tokensEl: node.querySelector(".tokens"), statsEl: node.querySelector(".stats"),
    plotEl: node.querySelector(".plot"), plotLegendEl: node.querySelector(".plot-legend"),
    outputEl: node.querySelector(".output"), selected: -1,
  };
  column.outputEl.addEventListener("keydown", (e) => moveSelection(column, e));
  $("columns").append(node);
  return column;
}

function addChunk(column, chunk) {
  if (chunk.usage) column.usage = chunk.usage;
  const choice = chunk.choices && chunk.choices[0];
  if (!choice) return;
  if (choice.finish_reason) column.finish = choice.finish_reason;
  const lp = choice.logprobs || {tokens: [], top_logprobs: []};
  const uncertainty = choice.uncertainty || [];
  if (!choice.text && lp.tokens.length === 0) return;
  const now = performance.now();
  if (!column.first) column.first = now;
  column.last = now;
  // one span per token; where a chunk's text is not its tokens' texts joined (a character split
  // across byte-level tokens), one span holds the chunk's text for all of its tokens
  const joined = lp.tokens.join("");
  const groups = joined === choice.text ? lp.tokens.map((t, i) => [t, [i]]) : [[choice.text, lp.tokens.map((_, i) => i)]];
  for (const [text, indices] of groups) {
    const span = document.createElement("span");
    span.className = "token";
    span.textContent = text;
    const infos = indices.map((i) => ({text: lp.tokens[i], logprob: lp.token_logprobs[i], top: lp.top_logprobs[i] || {},
                                       u: uncertainty[i] || {}}));
    const token = {text, infos, span, start: column.text.length, index: column.tokens.length};
    span.dataset.index = String(token.index);
    column.tokens.push(token);
    column.text += text;
    column.tokensEl.append(span);
  }
}

function tokenCount(column) {
  return column.tokens.reduce((n, t) => n + t.infos.length, 0);
}

function showStats(column, status) {
  column.status = status;
  const n = tokenCount(column);
  const parts = [`${n} tokens`];
  if (column.first) parts.push(`TTFT ${Math.round(column.first - column.started)} ms`);
  if (n > 1 && column.last > column.first) parts.push(`${((n - 1) / ((column.last - column.first) / 1000)).toFixed(1)} tokens/s`);
  parts.push(status);
  column.statsEl.textContent = parts.join(" · ");
}

async function run() {
  hideTooltip();
  $("error").textContent = "";
  $("columns").replaceChildren();
  $("divergence").hidden = true;
  delete $("divergence").dataset.tokenA;
  delete $("divergence").dataset.tokenB;
  const compare = $("compare").checked;
  const configs = compare ? state.configs : state.configs.slice(0, 1);
  state.columns = configs.map((c) => makeColumn(requestBody(c)));
  $("columns").classList.toggle("two", compare);
  const controller = new AbortController();
  state.controller = controller;
  $("run").disabled = true;
  $("stop").disabled = false;
  let scheduled = false;
  const redraw = () => {
    if (scheduled) return;
    scheduled = true;
    requestAnimationFrame(() => { scheduled = false; render(); });
  };
  const one = async (column) => {
    column.started = performance.now();
    showStats(column, "running");
    try {
      await streamCompletion(column.body, controller.signal, (chunk) => { addChunk(column, chunk); redraw(); });
      showStats(column, `finished (${column.finish || "done"})`);
    } catch (e) {
      if (e.name === "AbortError") {
        showStats(column, "stopped");
      } else {
        showStats(column, "failed");
        showError(e);
        controller.abort();
      }
    }
  };
  await Promise.all(state.columns.map(one));
  render();
  state.controller = null;
  $("stop").disabled = true;
  $("run").disabled = state.models.length === 0;
  document.body.dataset.runs = String(Number(document.body.dataset.runs || 0) + 1);
}

function showError(e) {
  if (e instanceof ApiError && e.status === 401) askForKey(e.message);
  const previous = $("error").textContent;
  if (!previous.includes(e.message)) $("error").textContent = previous ? `${previous}\n${e.message}` : e.message;
}

// --- rendering: shading, divergence, plot ----------------------------------------------------

function signalValue(token, name) {
  // a span of several tokens shows the largest value of its tokens
  const values = token.infos.map((info) => info.u[name]).filter((v) => typeof v === "number");
  return values.length ? Math.max(...values) : undefined;
}

function render() {
  const name = $("signal").value;
  const signal = SIGNALS[name];
  let max = 0;
  for (const column of state.columns) for (const t of column.tokens) max = Math.max(max, signalValue(t, name) ?? 0);
  const available = state.columns.some((c) => c.tokens.some((t) => signalValue(t, name) !== undefined));
  for (const column of state.columns) {
    for (const t of column.tokens) {  // the DOM is written only where a token's shade changed
      const v = signalValue(t, name);
      const value = v === undefined ? "" : String(v);
      const shade = v === undefined || max <= 0 ? "" : `rgba(235, 96, 30, ${(0.08 + 0.72 * v / max).toFixed(3)})`;
      if (t.span.dataset.value !== value) t.span.dataset.value = value;
      if (t.shade !== shade) {
        t.shade = shade;
        t.span.style.backgroundColor = shade;
      }
    }
    if (column.first) showStats(column, column.status);
    drawPlot(column);
  }
  $("legend-name").textContent = available ? `${signal.name} (${signal.unit})` :
    `${signal.name}: not reported for ${signal.pc ? "a baseline model" : "this run"}`;
  $("legend-min").textContent = "0";
  $("legend-max").textContent = available ? formatNumber(max) : "";
  markDivergence();
}

function markDivergence() {
  const el = $("divergence");
  if (state.columns.length !== 2) return;
  const [a, b] = state.columns;
  if (el.dataset.tokenA !== undefined) return;  // texts only grow: a divergence found is final
  const n = Math.min(a.text.length, b.text.length);
  let at = 0;
  while (at < n && a.text[at] === b.text[at]) at++;
  if (at === n) {
    el.hidden = false;
    el.textContent = n === 0 ? "" : `identical over the first ${n} characters`;
    return;
  }
  const ta = a.tokens.find((t) => t.start + t.text.length > at);
  const tb = b.tokens.find((t) => t.start + t.text.length > at);
  ta.span.classList.add("diverge");
  tb.span.classList.add("diverge");
  el.hidden = false;
  el.dataset.tokenA = String(ta.index);
  el.dataset.tokenB = String(tb.index);
  el.textContent = `first divergence at character ${at}: token ${ta.index + 1} ${JSON.stringify(ta.text)} (A) vs ` +
                   `token ${tb.index + 1} ${JSON.stringify(tb.text)} (B)`;
}

const SERIES = [
  {name: "surprise", key: "surprise", className: "line-surprise"},
  {name: "entropy", key: "entropy", className: "line-entropy"},
  {name: "μ", key: "mu", className: "line-mu"},
];

function drawPlot(column) {
  const svg = column.plotEl;
  const infos = column.tokens.flatMap((t) => t.infos);
  const width = 600, height = 170, pad = 4;
  const series = SERIES.filter((s) => infos.some((i) => typeof i.u[s.key] === "number"));
  const tau = column.body.sampler === "error_driven" ? column.body.mirostat_tau : undefined;
  let ymax = 1;
  for (const s of series) for (const i of infos) ymax = Math.max(ymax, Math.min(i.u[s.key] ?? 0, 64));
  if (tau !== undefined) ymax = Math.max(ymax, tau);
  const x = (k) => pad + (infos.length > 1 ? k * (width - 2 * pad) / (infos.length - 1) : 0);
  const y = (v) => height - pad - Math.min(v, ymax) / ymax * (height - 2 * pad);
  svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg";
  const line = (className, points) => {
    const el = document.createElementNS(ns, "polyline");
    el.setAttribute("class", className);
    el.setAttribute("points", points);
    el.setAttribute("vector-effect", "non-scaling-stroke");
    svg.append(el);
  };
  for (const s of series) {
    line(s.className, infos.map((i, k) => `${x(k).toFixed(1)},${y(i.u[s.key] ?? 0).toFixed(1)}`).join(" "));
  }
  if (tau !== undefined) line("line-tau", `${pad},${y(tau)} ${width - pad},${y(tau)}`);
  column.plotLegendEl.replaceChildren();
  if (!infos.length) return;
  const keys = series.map((s) => [s.name, s.className]).concat(tau !== undefined ? [["target τ", "line-tau"]] : []);
  for (const [name, className] of keys) {
    const key = document.createElement("span");
    key.className = `key ${className}`;
    key.textContent = name;
    column.plotLegendEl.append(key);
  }
  const tauNote = column.body.sampler === "error_driven" && tau === undefined ?
    "; target τ: the checkpoint's (set mirostat_tau to draw it)" : "";
  column.plotLegendEl.append(` in bits, 0 to ${formatNumber(ymax)}, over ${infos.length} tokens${tauNote}`);
}

// --- tooltip ---------------------------------------------------------------------------------

function showTooltip(column, token) {
  const tip = $("tooltip");
  tip.replaceChildren();
  for (const info of token.infos) {
    const title = document.createElement("p");
    title.className = "tip-title";
    title.textContent = `${JSON.stringify(info.text)}  p = ${formatProbability(info.logprob)}`;
    tip.append(title);
    const top = document.createElement("table");
    top.className = "tip-top";
    for (const [text, logprob] of Object.entries(info.top).slice(0, TOP_ALTERNATIVES)) {
      const row = top.insertRow();
      row.insertCell().textContent = JSON.stringify(text);
      row.insertCell().textContent = formatProbability(logprob);
      if (text === info.text) row.className = "chosen";
    }
    tip.append(top);
    const fields = document.createElement("table");
    fields.className = "tip-fields";
    for (const [name, value] of Object.entries(info.u)) {
      const row = fields.insertRow();
      row.insertCell().textContent = name;
      row.insertCell().textContent = Array.isArray(value) ? value.map(formatNumber).join(", ") : formatNumber(value);
    }
    tip.append(fields);
  }
  tip.hidden = false;
  const box = token.span.getBoundingClientRect();
  const left = Math.max(4, Math.min(box.left + window.scrollX, window.scrollX + document.documentElement.clientWidth - tip.offsetWidth - 4));
  tip.style.left = `${left}px`;
  tip.style.top = `${box.bottom + window.scrollY + 4}px`;
  column.selected = token.index;
  for (const c of state.columns) for (const t of c.tokens) t.span.classList.toggle("selected", c === column && t === token);
}

function hideTooltip() {
  $("tooltip").hidden = true;
  state.pinned = null;
  for (const c of state.columns) for (const t of c.tokens) t.span.classList.remove("selected");
}

function tokenAt(target) {
  const span = target.closest && target.closest(".token");
  if (!span) return null;
  const column = state.columns.find((c) => c.node.contains(span));
  return column ? [column, column.tokens[Number(span.dataset.index)]] : null;
}

function moveSelection(column, e) {
  if (!["ArrowLeft", "ArrowRight", "Home", "End", "Escape"].includes(e.key) || column.tokens.length === 0) return;
  e.preventDefault();
  if (e.key === "Escape") return hideTooltip();
  const last = column.tokens.length - 1;
  let k = column.selected;
  if (e.key === "ArrowRight") k = Math.min(last, k + 1);
  if (e.key === "ArrowLeft") k = Math.max(0, k < 0 ? last : k - 1);
  if (e.key === "Home") k = 0;
  if (e.key === "End") k = last;
  state.pinned = column.tokens[k];
  showTooltip(column, column.tokens[k]);
}

// --- formatting ------------------------------------------------------------------------------

function formatNumber(v) {
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return String(v);
  if (v !== 0 && Math.abs(v) < 0.001) return v.toExponential(2);
  return v.toFixed(3);
}

function formatProbability(logprob) {
  if (typeof logprob !== "number") return "–";
  return `${(100 * Math.exp(logprob)).toFixed(2)}%`;
}

function formatCount(n) {
  if (typeof n !== "number") return "?";
  if (n >= 1e9) return `${(n / 1e9).toFixed(1)}B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)}M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(0)}K`;
  return String(n);
}

// --- start -----------------------------------------------------------------------------------

function start() {
  state.configs = [makeConfig("Configuration A"), makeConfig("Configuration B")];
  state.configs[1].node.hidden = true;
  $("compare").addEventListener("change", () => {
    state.configs[1].node.hidden = !$("compare").checked;
    $("preset-label").hidden = !$("compare").checked;
  });
  $("preset").addEventListener("change", () => applyPreset($("preset").value));
  $("signal").addEventListener("change", render);
  $("run").addEventListener("click", run);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !$("run").disabled) run();
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    $("key-error").textContent = "";
    sessionStorage.setItem(KEY_STORAGE, $("api-key").value);
    loadModels().catch(showError);
  });
  const results = document.querySelector(".results");
  results.addEventListener("mouseover", (e) => {
    const hit = tokenAt(e.target);
    if (hit && !state.pinned) showTooltip(...hit);
  });
  results.addEventListener("mouseout", (e) => {
    if (!state.pinned && tokenAt(e.target)) $("tooltip").hidden = true;
  });
  results.addEventListener("click", (e) => {  // a tap pins the tooltip; a second tap, or one elsewhere, closes it
    const hit = tokenAt(e.target);
    if (!hit || state.pinned === hit[1]) return hideTooltip();
    state.pinned = hit[1];
    showTooltip(...hit);
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") hideTooltip(); });
  loadModels().catch(showError);
}

document.addEventListener("DOMContentLoaded", start);
