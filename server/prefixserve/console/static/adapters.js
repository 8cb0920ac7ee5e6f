// Adapters: list, inspect, delete, upload (files, a dropped directory, or an archive), make from a text.

import { ApiError, call } from "./api.js";
import { $, button, cell, say } from "./ui.js";

const ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"];
const ARCHIVE = /\.(zip|tar|tar\.gz|tgz)$/;
let chosenFiles = [];
let onListChange = () => {};
let report = (action) => action();

function path(id) {
  return `/v1/adapters/${encodeURIComponent(id)}`;
}

// Every adapter of this tenant, following the pagination cursor.
export async function listAdapters() {
  const all = [];
  let after = null;
  do {
    const query = after ? `?limit=1000&after=${encodeURIComponent(after)}` : "?limit=1000";
    const page = await call("GET", `/v1/adapters${query}`);
    all.push(...page.data);
    after = page.next_cursor;
  } while (after);
  return all;
}

export async function refreshAdapters() {
  let adapters;
  try {
    adapters = await listAdapters();
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      $("#key-box").hidden = false;
      $("#api-key").focus();
      say("This server has API keys: enter yours above.", true);
      return null;
    }
    throw error;
  }
  const body = $("#adapter-table tbody");
  body.replaceChildren(...(adapters.length ? adapters.map(row) : [emptyRow()]));
  onListChange(adapters.map((a) => a.id));
  return adapters;
}

function emptyRow() {
  const tr = document.createElement("tr");
  const td = cell("No adapters yet: upload one below, or make one from a text.");
  td.colSpan = 6;
  tr.append(td);
  return tr;
}

function row(adapter) {
  const tr = document.createElement("tr");
  tr.dataset.id = adapter.id;
  const updated = new Date(adapter.updated_at * 1000).toLocaleString();
  tr.append(cell(adapter.id), cell(adapter.method), cell(adapter.num_virtual_tokens), cell(`${(adapter.size_bytes / 1024).toFixed(1)} KB`));
  tr.append(cell(updated));
  const actions = document.createElement("td");
  actions.append(
    button("inspect", () => report(() => inspect(adapter.id))),
    button("delete", (e) => report(() => remove(adapter.id, e.target))),
  );
  tr.append(actions);
  return tr;
}

async function inspect(id) {
  const box = $("#inspect");
  box.hidden = false;
  box.textContent = JSON.stringify(await call("GET", path(id)), null, 2);
}

// Two clicks: the first turns the button into a confirmation.
async function remove(id, target) {
  if (target.dataset.armed !== "yes") {
    target.dataset.armed = "yes";
    target.textContent = `really delete ${id}?`;
    return;
  }
  await call("DELETE", path(id));
  say(`deleted ${id}`);
  $("#inspect").hidden = true;
  await refreshAdapters();
}

function showChosen() {
  const names = chosenFiles.map((f) => f.name).join(", ");
  $("#dropped").textContent = names ? `to upload: ${names}` : "";
}

// A dropped directory is read for its two PEFT files; anything else dropped is taken as files.
async function filesFromDrop(dataTransfer) {
  const entries = [...dataTransfer.items].map((item) => item.webkitGetAsEntry?.()).filter(Boolean);
  const directory = entries.find((entry) => entry.isDirectory);
  if (!directory) return { files: [...dataTransfer.files], name: null };
  const children = await new Promise((resolve, reject) => directory.createReader().readEntries(resolve, reject));
  const wanted = children.filter((entry) => entry.isFile && ADAPTER_FILES.includes(entry.name));
  const files = await Promise.all(wanted.map((entry) => new Promise((resolve, reject) => entry.file(resolve, reject))));
  return { files, name: directory.name };
}

function defaultId(name) {
  const idBox = $("#upload-id");
  if (!idBox.value && name) idBox.value = name.replace(ARCHIVE, "").replace(/[^A-Za-z0-9._-]/g, "-");
}

async function upload(event) {
  event.preventDefault();
  const id = $("#upload-id").value.trim();
  if (!id) return say("Give the adapter an id first.", true);
  if (!chosenFiles.length) return say("Choose or drop the adapter's files first.", true);
  const form = new FormData();
  for (const file of chosenFiles) form.append("files", file, file.name);
  const created = await call("PUT", path(id), form);
  say(`stored ${created.id}: ${created.num_virtual_tokens} virtual tokens (${created.method}), sha256 ${created.sha256.slice(0, 12)}…`);
  chosenFiles = [];
  $("#upload-id").value = "";
  $("#upload-files").value = "";
  showChosen();
  await refreshAdapters();
}

async function makeFromText(event) {
  event.preventDefault();
  const id = $("#text-id").value.trim();
  const body = { from_text: $("#text-body").value, chat_template: $("#text-chat").checked };
  const created = await call("PUT", path(id), body);
  say(`made ${created.id} from the text: ${created.num_virtual_tokens} virtual tokens`);
  $("#text-id").value = "";
  await refreshAdapters();
}

// `report` shows a failed action's message in the status line instead of losing it in the JS console.
export function setUpAdapters(reporter, listChanged) {
  report = reporter;
  onListChange = listChanged;
  const zone = $("#drop-zone");
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    report(async () => {
      const { files, name } = await filesFromDrop(e.dataTransfer);
      chosenFiles = files;
      defaultId(name ?? (files.length === 1 ? files[0].name : null));
      showChosen();
    });
  });
  $("#upload-files").addEventListener("change", (e) => {
    chosenFiles = [...e.target.files];
    if (chosenFiles.length === 1) defaultId(chosenFiles[0].name);
    showChosen();
  });
  $("#upload-form").addEventListener("submit", (e) => report(() => upload(e)));
  $("#text-form").addEventListener("submit", (e) => report(() => makeFromText(e)));
  $("#refresh").addEventListener("click", () => report(refreshAdapters));
}
