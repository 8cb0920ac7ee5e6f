// The console's entry point: the model line, the API key, and generation in one or two panes at once.

import { ApiError, generateStream, getKey, setKey } from "./api.js";
import { refreshAdapters, setUpAdapters } from "./adapters.js";
import { $, say } from "./ui.js";

const BASE = ""; // the select value that means the base model, no adapter
let running = null; // the AbortController of the generation in progress

// Run an action; show its failure in the status line (and ask for a key on 401).
async function report(action) {
  try {
    return await action();
  } catch (error) {
    if (error.name === "AbortError") return say("stopped");
    if (error instanceof ApiError && error.status === 401) $("#key-box").hidden = false;
    say(error.message, true);
  }
}

function panes() {
  return [...document.querySelectorAll(".pane")].filter((pane) => !pane.hidden);
}

function fillSelects(ids) {
  for (const select of document.querySelectorAll("select.adapter")) {
    const keep = select.value;
    const base = new Option("base model (no adapter)", BASE);
    select.replaceChildren(base, ...ids.map((id) => new Option(id, id)));
    select.value = ids.includes(keep) ? keep : BASE;
  }
}

function parameters(adapterId) {
  const temperature = Number($("#temperature").value) || 0;
  return {
    adapter_id: adapterId || null,
    max_new_tokens: Number($("#max-new-tokens").value) || 64,
    ...(temperature > 0 ? { do_sample: true, temperature } : {}),
  };
}

// Stream one pane's generation into its output as the tokens come.
async function runPane(pane, prompt, signal) {
  const output = $(".output", pane);
  const meta = $(".meta", pane);
  const adapter = $("select.adapter", pane).value;
  output.textContent = "";
  output.classList.remove("error");
  pane.dataset.tokens = "0";
  meta.textContent = "waiting…";
  const started = performance.now();
  let first = null;
  try {
    for await (const event of generateStream({ inputs: prompt, parameters: parameters(adapter) }, signal)) {
      first ??= performance.now();
      pane.dataset.tokens = String(event.index);
      if (!event.token.special) output.append(event.token.text);
      if (event.details) {
        output.textContent = event.generated_text; // the server's text: stop sequences already cut
        const seconds = (performance.now() - started) / 1000;
        const ttft = (first - started) / 1000;
        meta.textContent = `${event.details.generated_tokens} tokens, finish: ${event.details.finish_reason}, ${seconds.toFixed(2)} s (first token ${ttft.toFixed(2)} s)`;
        pane.dataset.finish = event.details.finish_reason;
      }
    }
  } catch (error) {
    meta.textContent = error.name === "AbortError" ? "stopped" : `error: ${error.message}`;
    output.classList.toggle("error", error.name !== "AbortError");
    if (error instanceof ApiError && error.status === 401) $("#key-box").hidden = false;
  }
}

async function generate() {
  const prompt = $("#prompt").value;
  if (!prompt) return say("Type a prompt first.", true);
  running = new AbortController();
  $("#run").disabled = true;
  $("#stop").disabled = false;
  for (const pane of document.querySelectorAll(".pane")) delete pane.dataset.finish;
  say("generating…");
  try {
    await Promise.all(panes().map((pane) => runPane(pane, prompt, running.signal)));
    say("done");
  } finally {
    running = null;
    $("#run").disabled = false;
    $("#stop").disabled = true;
  }
}

async function showModel() {
  const response = await fetch("/info");
  if (!response.ok) return;
  const info = await response.json();
  $("#model-info").textContent = `model ${info.model_id} on ${info.model_device_type} (${info.model_dtype}), version ${info.version}`;
}

async function start() {
  setUpAdapters(report, fillSelects);
  fillSelects([]);
  const keyBox = $("#api-key");
  keyBox.value = getKey();
  if (getKey()) $("#key-box").hidden = false;
  keyBox.addEventListener("change", () => {
    setKey(keyBox.value);
    report(async () => {
      if (await refreshAdapters()) say("key accepted");
    });
  });
  $("#compare").addEventListener("change", (e) => {
    $("#pane-b").hidden = !e.target.checked;
  });
  $("#run").addEventListener("click", () => report(generate));
  $("#stop").addEventListener("click", () => running?.abort());
  $("#prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !running) report(generate);
  });
  await report(showModel);
  if (await report(refreshAdapters)) say("ready");
  document.body.dataset.ready = "yes";
}

start();
