// Shared by every dashboard page: the API key (sessionStorage only, never a URL), calls to /v1 with it, the event
// stream reader, and small DOM helpers that only ever set text (never HTML) from API data.

const KEY = "mcs.apiKey";

export const apiKey = () => sessionStorage.getItem(KEY);
export const saveKey = (key) => sessionStorage.setItem(KEY, key);
export const forgetKey = () => sessionStorage.removeItem(KEY);

export class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

function authorization(key = apiKey()) {
  return { Authorization: `Bearer ${key}` };
}

async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not the API's JSON error body (a proxy's page): the status says enough
  }
  const error = body && body.error;
  if (error) return new ApiError(response.status, error.code, error.message, error.details);
  return new ApiError(response.status, "http_error", `the API answered ${response.status}`, null);
}

function sendToSignIn() {
  forgetKey();
  const next = location.pathname + location.search;
  location.assign(`/ui/signin?next=${encodeURIComponent(next)}`);
}

// A fetch of `path` on this origin with the key; `json` is sent as a JSON body. Answers the Response; a 401 (a
// revoked key) goes back to the sign-in page, other failures throw an ApiError carrying the API's code and message.
export async function request(path, { method = "GET", json, body, headers = {}, signal, key } = {}) {
  const sent = { ...authorization(key), ...headers };
  if (json !== undefined) {
    sent["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  const response = await fetch(path, { method, headers: sent, body, signal, cache: "no-store" });
  if (response.status === 401 && key === undefined) {
    sendToSignIn();
  }
  if (!response.ok) throw await failure(response);
  return response;
}

export async function api(path, options) {
  const response = await request(path, options);
  return response.status === 204 ? null : response.json();
}

// One SSE block ("id: 3\nevent: progress\ndata: {...}") as {id, type, data}; comments and `retry:` give null.
function parseEvent(block) {
  const event = { id: null, type: "message", data: [] };
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const cut = line.indexOf(":");
    const field = cut < 0 ? line : line.slice(0, cut);
    const value = cut < 0 ? "" : line.slice(cut + 1).replace(/^ /, "");
    if (field === "id") event.id = Number(value);
    else if (field === "event") event.type = value;
    else if (field === "data") event.data.push(value);
  }
  if (!event.data.length) return null;
  return { ...event, data: JSON.parse(event.data.join("\n")) };
}

// Server-Sent Events read with fetch(), because EventSource cannot send the Authorization header and the key must
// never go into a URL. Calls onEvent for each event; resolves when the server ends the stream.
export async function readEvents(path, onEvent, { lastEventId = 0, signal } = {}) {
  const headers = { Accept: "text/event-stream" };
  if (lastEventId) headers["Last-Event-ID"] = String(lastEventId);
  const response = await request(path, { headers, signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = parseEvent(buffer.slice(0, cut));
      buffer = buffer.slice(cut + 2);
      if (event) onEvent(event);
    }
  }
}

// --- the page ---

export const byId = (id) => document.getElementById(id);

// An element with text content and attributes; children may be elements or strings (set as text).
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  for (const child of children) node.append(child);
  return node;
}

export function notice(text) {
  byId("notice").textContent = text;
}

export function showError(error) {
  const box = byId("error");
  if (!error) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  const details = error.details ? ` ${JSON.stringify(error.details)}` : "";
  box.textContent = error instanceof ApiError ? `${error.message} (${error.code})${details}` : String(error);
  box.hidden = false;
}

export function bytes(count) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = count;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

export const when = (iso) => (iso ? new Date(iso).toLocaleString() : "");

export function formatValue(value) {
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toPrecision(4);
  if (value === null || value === undefined) return "";
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

const FOLD_AFTER = 6; // a nested object with more entries starts folded (per-layer errors: one per matrix)
const MAX_DEPTH = 2;

function metricValue(value, depth) {
  const nested = value !== null && typeof value === "object" && !Array.isArray(value);
  if (!nested || depth >= MAX_DEPTH) return formatValue(value);
  const list = el("dl", { class: "metrics" });
  fillMetrics(list, value, depth + 1);
  const count = Object.keys(value).length;
  return count > FOLD_AFTER ? el("details", {}, el("summary", {}, `${count} values`), list) : list;
}

// A <dl> of a metrics object; nested objects become nested lists, long ones folded.
export function fillMetrics(list, metrics, depth = 0) {
  list.replaceChildren();
  for (const [name, value] of Object.entries(metrics || {})) {
    list.append(el("dt", {}, name), el("dd", {}, metricValue(value, depth)));
  }
}

// Every page but sign-in: without a key go to sign in; wire the sign-out button. Answers whether the page may run.
export function signedIn() {
  if (!apiKey()) {
    sendToSignIn();
    return false;
  }
  byId("sign-out").addEventListener("click", () => {
    forgetKey();
    location.assign("/ui/signin");
  });
  return true;
}

// Run a page's async start, showing any error in the page's alert box instead of the console; <body data-ready>
// then says the page is built (tests wait for it).
export function start(main) {
  main().catch(showError).finally(() => { document.body.dataset.ready = "true"; });
}
