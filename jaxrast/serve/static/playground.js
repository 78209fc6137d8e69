// The jaxrast playground: base and RAST side by side, each RAST token shaded by KL(P_RAST ‖ P_base).
// Talks only to the server that served it (same origin): /v1/rast/... and /v1/completions.
import {ShiftView} from "/static/shift.js";

const $ = (id) => document.getElementById(id);

const state = {
  key: "",
  info: null,
  picked: null, // {source, id, question, answer}
  running: null, // AbortController of the run in flight
  cols: {},
};

// ---- requests ------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (state.key) h.Authorization = `Bearer ${state.key}`;
  return h;
}

async function failure(resp) {
  let message = `${resp.status} ${resp.statusText}`;
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON */ }
  if (resp.status === 401) askForKey(message);
  return new ApiError(resp.status, message);
}

async function api(path, body) {
  const init = body === undefined ? {headers: headers(false)}
    : {method: "POST", headers: headers(true), body: JSON.stringify(body)};
  const resp = await fetch(path, init);
  if (!resp.ok) throw await failure(resp);
  return resp.json();
}

// Server-sent events of a streamed completion: calls onEvent(chunk) per `data:` line.
async function stream(body, signal, onEvent) {
  const resp = await fetch("/v1/completions", {method: "POST", headers: headers(true), body: JSON.stringify(body),
    signal});
  if (!resp.ok) throw await failure(resp);
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

// ---- the API key ---------------------------------------------------------------------------

function askForKey(message) {
  const panel = $("key-panel");
  const wasHidden = panel.hidden;
  panel.hidden = false;
  $("key-status").textContent = state.key ? `The key was refused: ${message}` : "This server needs an API key.";
  $("model-line").textContent = "waiting for the API key";
  if (wasHidden || state.key) $("api-key").focus();
}

async function connect() {
  try {
    state.info = await api("/v1/rast/info");
  } catch (err) {
    if (!(err instanceof ApiError) || err.status !== 401) {
      $("model-line").textContent = `cannot reach the server: ${err.message}`;
    }
    return false;
  }
  if (state.key) {
    $("key-status").textContent = "Key accepted.";
    $("key-help").hidden = true;
  }
  const info = state.info;
  const pairs = info.pairs.length;
  $("model-line").textContent = `${info.model} · ${pairs} pair${pairs === 1 ? "" : "s"} · context ${info.max_len} ` +
    `positions · ${info.slots} slots`;
  buildLams(info.pairs);
  buildSources(info.sources);
  buildTemplates(info.templates);
  const max = $("max-tokens");
  max.max = String(info.max_len);
  if (Number(max.value) > info.max_len) max.value = String(info.max_len);
  $("controls").dataset.ready = "true";
  return true;
}

// ---- controls ------------------------------------------------------------------------------

function buildLams(pairs) {
  const box = $("lams");
  box.querySelectorAll(".lam").forEach((el) => el.remove());
  $("lams-empty").hidden = pairs.length > 0;
  for (const p of pairs) {
    const id = `lam-${p.index}`;
    const row = document.createElement("div");
    row.className = "field lam";
    const label = document.createElement("label");
    label.htmlFor = id;
    label.textContent = `pair ${p.index + 1} (default ${p.lam})`;
    const input = document.createElement("input");
    Object.assign(input, {type: "range", id, name: id, min: "0", max: String(Math.max(2, 2 * p.lam)), step: "0.05",
      value: String(p.lam)});
    input.dataset.pair = String(p.index);
    const out = document.createElement("output");
    out.htmlFor = id;
    out.id = `${id}-value`;
    const show = () => { out.textContent = Number(input.value).toFixed(2); };
    input.addEventListener("input", show);
    show();
    row.append(label, input, out);
    box.append(row);
  }
}

function option(value, text) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = text;
  return o;
}

function buildSources(sources) {
  const select = $("source");
  state.sources = Object.fromEntries(sources.map((s) => [s.name, s]));
  select.replaceChildren(...sources.map((s) => option(s.name, s.name)));
  loadProblems();
}

function buildTemplates(templates) {
  const select = $("template");
  state.templates = templates;
  select.replaceChildren(...Object.keys(templates).map((name) => option(name, name === "none" ? "none: the problem as is"
    : name)));
}

async function loadProblems() {
  const source = $("source").value;
  const select = $("problem");
  $("source-note").textContent = state.sources[source] ? `${state.sources[source].label}.` : "";
  select.replaceChildren(option("", "— type your own prompt —"));
  state.picked = null;
  try {
    const res = await api(`/v1/rast/problems?source=${encodeURIComponent(source)}`);
    select.append(...res.problems.map((p) => option(p.id, `${p.id}: ${p.label}`)));
    select.dataset.source = source;
  } catch (err) {
    $("form-status").textContent = err.message;
  }
}

// str.format-style: {question} and the doubled braces of a Python template.
function render(template, row) {
  return template.replace(/\{\{|\}\}|\{(\w+)\}/g, (m, field) => {
    if (m === "{{") return "{";
    if (m === "}}") return "}";
    return field in row ? String(row[field]) : m;
  });
}

async function pickProblem() {
  const id = $("problem").value;
  const source = $("source").value;
  if (!id) {
    state.picked = null;
    showGold();
    return;
  }
  try {
    const row = await api(`/v1/rast/problem?source=${encodeURIComponent(source)}&id=${encodeURIComponent(id)}`);
    state.picked = {source, ...row};
    applyTemplate();
    showGold();
  } catch (err) {
    $("form-status").textContent = err.message;
  }
}

function renderedPrompt() {
  const template = state.templates ? state.templates[$("template").value] : "{question}";
  return state.picked ? render(template || "{question}", state.picked) : null;
}

function applyTemplate() {
  if (state.picked) $("prompt").value = renderedPrompt();
}

function showGold() {
  const p = state.picked;
  $("gold-line").textContent = p ? `Gold answer of ${p.source} ${p.id}: ${[].concat(p.answer).join(" or ")}` : "";
}

function number(id, fallback) {
  const raw = $(id).value.trim();
  return raw === "" ? fallback : Number(raw);
}

function settings() {
  const body = {model: state.info.model, prompt: $("prompt").value, max_tokens: number("max-tokens", 64),
    temperature: number("temperature", 1), top_p: number("top-p", 1), stream: true,
    stream_options: {include_usage: true}};
  const seed = number("seed", null);
  if (seed !== null) body.seed = seed;
  return body;
}

function lams() {
  return [...document.querySelectorAll("#lams .lam input")].map((el) => Number(el.value));
}

// ---- the columns ---------------------------------------------------------------------------

function column(name) {
  return {name, section: $(`col-${name}`), out: $(`${name}-out`), status: $(`${name}-status`), text: "",
    shift: null, tokens: null, finish: null, error: null, verdict: null};
}

function setState(col, value, message) {
  col.section.dataset.state = value;
  col.out.setAttribute("aria-busy", value === "running" ? "true" : "false");
  col.status.textContent = message || "";
  col.status.classList.toggle("error", value === "error");
}

async function runColumn(col, body, signal) {
  setState(col, "running", "streaming…");
  try {
    await stream(body, signal, (chunk) => {
      if (chunk.usage) col.tokens = chunk.usage.completion_tokens;
      for (const c of chunk.choices || []) {
        if (c.text) {
          col.text += c.text;
          col.out.append(c.text);
        }
        if (c.finish_reason) col.finish = c.finish_reason;
        if (c.shift) col.shift = c.shift;
      }
    });
    col.section.dataset.text = col.text;
    if (col.shift) state.view.render(col.text, col.shift, threshold());
    setState(col, "done", `finished: ${col.finish || "?"}`);
  } catch (err) {
    col.error = err.name === "AbortError" ? "stopped" : err.message;
    setState(col, "error", col.error);
  }
}

function threshold() {
  const t = Number($("threshold").value);
  return Number.isFinite(t) && t >= 0 ? t : 0;
}

// ---- a run ---------------------------------------------------------------------------------

function summarize() {
  const t = threshold();
  for (const col of Object.values(state.cols)) {
    const cell = (f) => document.querySelector(`#summary-table td[data-col="${col.name}"][data-field="${f}"]`);
    cell("tokens").textContent = col.error ? "—" : String(col.tokens ?? "—");
    cell("finish").textContent = col.error ? "error" : (col.finish || "—");
    if (col.name === "rast") {
      const kl = col.shift ? col.shift.kl : null;
      const above = kl ? kl.filter((x) => x > t).length : 0;
      cell("share").textContent = kl && kl.length ? `${(100 * above / kl.length).toFixed(1)} % (${above} of ${kl.length})`
        : "—";
      cell("share").dataset.share = kl && kl.length ? String(above / kl.length) : "";
    }
    const g = cell("grade");
    const v = col.verdict;
    if (v && v.correct !== undefined) {
      g.textContent = `${v.correct ? "✓ correct" : "✗ wrong"} (answer ${v.extracted ?? "none"})`;
      g.dataset.correct = String(v.correct);
    } else {
      g.textContent = v && v.note ? v.note : "—";
      delete g.dataset.correct;
    }
  }
}

async function gradeColumns(cols, prompt) {
  const p = state.picked;
  const done = cols.filter((c) => !c.error);
  if (!p || !done.length) return;
  if (prompt !== renderedPrompt()) {
    for (const c of done) c.verdict = {note: "not graded: the prompt is not the picked problem's"};
    return;
  }
  try {
    const res = await api("/v1/rast/grade", {source: p.source, id: p.id, completions: done.map((c) => c.text)});
    done.forEach((c, i) => { c.verdict = res.verdicts[i]; });
  } catch (err) {
    for (const c of done) c.verdict = {note: `grading failed: ${err.message}`};
  }
}

async function run(event) {
  if (event) event.preventDefault();
  if (!state.info || state.running) return;
  const prompt = $("prompt").value;
  if (!prompt) {
    $("form-status").textContent = "Write a prompt or pick a problem first.";
    $("prompt").focus();
    return;
  }
  state.view.clear();
  const controller = new AbortController();
  state.running = controller;
  state.cols = {base: column("base"), rast: column("rast")};
  for (const col of Object.values(state.cols)) {
    col.out.replaceChildren();
    delete col.section.dataset.text;
  }
  summarize();
  $("run").disabled = true;
  $("stop").disabled = false;
  $("controls").dataset.run = "running";
  $("form-status").textContent = "running both columns…";
  const body = settings();
  await Promise.all([
    runColumn(state.cols.base, {...body, mode: "base"}, controller.signal),
    runColumn(state.cols.rast, {...body, mode: "rast", lam: lams(), shift: true}, controller.signal),
  ]);
  const cols = Object.values(state.cols);
  const errors = [...new Set(cols.filter((c) => c.error).map((c) => c.error))];
  $("form-status").textContent = errors.length ? `Error: ${errors.join("; ")}` : "done";
  await gradeColumns(cols, prompt);
  summarize();
  state.running = null;
  $("run").disabled = false;
  $("stop").disabled = true;
  $("controls").dataset.run = "done";
}

// ---- wiring --------------------------------------------------------------------------------

function init() {
  $("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    state.key = $("api-key").value.trim();
    if (await connect()) $("prompt").focus();
  });
  $("controls").addEventListener("submit", run);
  $("stop").addEventListener("click", () => state.running && state.running.abort());
  $("source").addEventListener("change", loadProblems);
  $("problem").addEventListener("change", pickProblem);
  $("template").addEventListener("change", applyTemplate);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) run(event);
  });
  $("threshold").addEventListener("input", () => { state.view.mark(threshold()); summarize(); });
  state.view = new ShiftView($("rast-out"), $("tip"));
  connect();
}

document.addEventListener("DOMContentLoaded", init);
