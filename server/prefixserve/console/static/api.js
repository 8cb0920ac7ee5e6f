// The console's calls to this server: same origin only, the API key as a Bearer token when one is set.

const KEY_STORAGE = "prefixserve-api-key";
let apiKey = sessionStorage.getItem(KEY_STORAGE) || "";

export function getKey() {
  return apiKey;
}

export function setKey(key) {
  apiKey = key.trim();
  if (apiKey) sessionStorage.setItem(KEY_STORAGE, apiKey);
  else sessionStorage.removeItem(KEY_STORAGE);
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers(extra = {}) {
  return apiKey ? { ...extra, Authorization: `Bearer ${apiKey}` } : extra;
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    const error = body.error;
    message = typeof error === "string" ? error : error?.message ?? JSON.stringify(body);
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, message);
}

// One JSON call. `body`: FormData (sent as multipart), an object (sent as JSON), or nothing.
export async function call(method, path, body) {
  const init = { method, headers: headers() };
  if (body instanceof FormData) {
    init.body = body;
  } else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers = headers({ "Content-Type": "application/json" });
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await errorOf(response);
  return response.status === 204 ? null : response.json();
}

// POST /generate_stream and yield each server-sent event's JSON as it arrives.
export async function* generateStream(body, signal) {
  const response = await fetch("/generate_stream", {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = JSON.parse(line.slice(5));
        if (data.error) throw new ApiError(0, data.error);
        yield data;
      }
    }
  }
}
