// Upload a model: one archive goes to POST /v1/models (multipart, with upload progress from XMLHttpRequest, which
// fetch() does not report); the files of a folder go through the resumable upload (/v1/uploads: manifest with each
// file's sha256, one PUT per file, complete).
import { ApiError, api, apiKey, byId, bytes, el, notice, request, showError, signedIn, start } from "./api.js";

const ARCHIVE = /\.(zip|tar\.gz|tgz)$/i;

function showProgress(sent, size) {
  byId("upload-progress").value = size ? sent / size : 0;
  notice(`Uploaded ${bytes(sent)} of ${bytes(size)}…`);
}

function errorOf(xhr) {
  try {
    const { code, message, details } = JSON.parse(xhr.responseText).error;
    return new ApiError(xhr.status, code, message, details);
  } catch {
    return new ApiError(xhr.status, "http_error", `the API answered ${xhr.status || "nothing"}`, null);
  }
}

function uploadArchive(file, name) {
  const form = new FormData();
  form.append("file", file, file.name);
  if (name) form.append("name", name);
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/v1/models");
    xhr.setRequestHeader("Authorization", `Bearer ${apiKey()}`);
    xhr.responseType = "text";
    xhr.upload.addEventListener("progress", (event) => showProgress(event.loaded, event.total));
    xhr.addEventListener("load", () => {
      if (xhr.status === 201) resolve(JSON.parse(xhr.responseText));
      else reject(errorOf(xhr));
    });
    xhr.addEventListener("error", () => reject(new Error("the upload was interrupted")));
    xhr.send(form);
  });
}

async function sha256(file) {
  const digest = await crypto.subtle.digest("SHA-256", await file.arrayBuffer());
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

async function uploadFolder(files, name) {
  if (!globalThis.crypto || !crypto.subtle) {
    throw new Error("Sending a folder's files needs the page on https or localhost (for sha256); upload an archive.");
  }
  const manifest = [];
  for (const file of files) manifest.push({ path: file.name, size: file.size, sha256: await sha256(file) });
  const upload = await api("/v1/uploads", { method: "POST", json: { name: name || undefined, files: manifest } });
  const size = manifest.reduce((sum, file) => sum + file.size, 0);
  let sent = 0;
  for (const file of files) {
    const headers = { "Content-Type": "application/octet-stream" };
    const path = `/v1/uploads/${upload.id}/files/${encodeURIComponent(file.name)}`;
    await request(path, { method: "PUT", body: file, headers });
    sent += file.size;
    showProgress(sent, size);
  }
  return api(`/v1/uploads/${upload.id}/complete`, { method: "POST" });
}

function showModel(model) {
  const facts = { Id: model.id, Name: model.name, Architecture: model.architecture, Size: bytes(model.size_bytes) };
  const rows = Object.entries(facts).flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, value)]);
  byId("uploaded-model").replaceChildren(...rows);
  byId("submit-link").href = `/ui/submit?model=${encodeURIComponent(model.id)}`;
  byId("uploaded").hidden = false;
  notice(`Uploaded model ${model.id}.`);
}

async function submit(event) {
  event.preventDefault();
  showError(null);
  byId("uploaded").hidden = true;
  const files = Array.from(byId("model-file").files);
  const name = byId("model-name").value.trim();
  const button = event.submitter || byId("upload-form").querySelector("button");
  button.disabled = true;
  try {
    const single = files.length === 1 && ARCHIVE.test(files[0].name);
    showModel(await (single ? uploadArchive(files[0], name) : uploadFolder(files, name)));
    byId("upload-progress").value = 1;
  } catch (error) {
    notice("");
    showError(error);
  } finally {
    button.disabled = false;
  }
}

if (signedIn()) {
  start(async () => byId("upload-form").addEventListener("submit", submit));
}
