// Small DOM helpers. Text from the server (ids, generated text, errors) only ever goes in as textContent.

export const $ = (selector, root = document) => root.querySelector(selector);

export function say(message, isError = false) {
  const status = $("#status");
  status.textContent = message;
  status.classList.toggle("error", isError);
}

export function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

export function button(label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.addEventListener("click", onClick);
  return b;
}
