// One job: its state from GET /v1/jobs/{id}, then live from its event stream (read with fetch(), resumed with
// Last-Event-ID after a dropped connection), per-step metrics, artifact downloads and, where the API has one, the
// job's report.
import {
  ApiError, api, byId, bytes, el, fillMetrics, formatValue, notice, readEvents, request, showError, signedIn, start,
} from "./api.js";

const jobId = byId("main").dataset.jobId;
const jobPath = `/v1/jobs/${encodeURIComponent(jobId)}`;
const ENDED = ["succeeded", "failed", "cancelled"];
const RECONNECT_MS = 2000;
const leaving = new AbortController();
let lastEventId = 0;

function showProgress(fraction) {
  byId("job-progress").value = fraction;
  byId("job-percent").textContent = `${Math.round(fraction * 100)}%`;
}

function stepRow(step) {
  const metrics = el("dl", { class: "metrics" });
  fillMetrics(metrics, step.metrics);
  const notes = el("ul", {}, ...(step.notes || []).map((note) => el("li", {}, note)));
  return el("tr", { id: `step-${step.index}` }, el("td", {}, String(step.index)), el("td", {}, step.type),
    el("td", { class: "step-status" }, step.status), el("td", {}, metrics), el("td", {}, notes));
}

function showSteps(steps) {
  byId("steps").tBodies[0].replaceChildren(...steps.map(stepRow));
}

function updateStep(index, changes) {
  const row = byId(`step-${index}`);
  if (!row) return;
  const step = { index, type: row.cells[1].textContent, status: row.querySelector(".step-status").textContent,
    metrics: null, notes: [], ...changes };
  row.replaceWith(stepRow(step));
}

async function download(artifact, button) {
  button.disabled = true;
  notice(`Downloading ${artifact.name}…`);
  try {
    const response = await request(`/v1/artifacts/${encodeURIComponent(artifact.id)}`);
    const blob = await response.blob();
    await verify(blob, artifact);
    const link = el("a", { href: URL.createObjectURL(blob), download: artifact.name });
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
  } catch (error) {
    notice("");
    showError(error);
  } finally {
    button.disabled = false;
  }
}

// The sha256 of what arrived against the artifact's (its ETag); crypto.subtle exists on https and localhost only.
async function verify(blob, artifact) {
  if (!globalThis.crypto || !crypto.subtle) {
    notice(`Downloaded ${artifact.name} (${bytes(blob.size)}); check its sha256: ${artifact.sha256}`);
    return;
  }
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", await blob.arrayBuffer()));
  const hex = Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
  if (hex !== artifact.sha256) throw new Error(`${artifact.name} arrived damaged (sha256 ${hex}); download it again`);
  notice(`Downloaded ${artifact.name} (${bytes(blob.size)}), sha256 verified.`);
}

function showArtifacts(artifacts) {
  if (!artifacts.length) return;
  byId("artifacts").replaceChildren(...artifacts.map((artifact) => {
    const button = el("button", { type: "button" }, `Download ${artifact.name} (${bytes(artifact.size_bytes)})`);
    button.addEventListener("click", () => download(artifact, button));
    return el("li", {}, button);
  }));
}

function showJob(job) {
  byId("job-status").textContent = job.cancel_requested && !ENDED.includes(job.status)
    ? `${job.status} (cancel requested)` : job.status;
  byId("job-model").textContent = job.model_id || "(deleted)";
  byId("job-message").textContent = job.message || "";
  showProgress(job.status === "succeeded" ? 1 : job.progress);
  showSteps(job.steps);
  fillMetrics(byId("job-metrics"), job.metrics);
  byId("job-error").hidden = !job.error;
  byId("job-error-text").textContent = job.error ? `${job.error.message} (${job.error.code})` : "";
  byId("cancel-job").hidden = ENDED.includes(job.status) || job.cancel_requested;
  showArtifacts(job.artifacts);
}

// The link to the report viewer, where this API serves GET /v1/jobs/{id}/report: looked up in its OpenAPI document
// rather than by asking for the report, which renders its charts (the viewer asks once).
async function showReport() {
  const openapi = await (await fetch("/openapi.json", { cache: "no-store" })).json();
  if (!openapi.paths || !openapi.paths["/v1/jobs/{job_id}/report"]) return;
  byId("report-link").href = `/ui/jobs/${encodeURIComponent(jobId)}/report`;
  byId("report").hidden = false;
}

async function ended(job) {
  showJob(job);
  notice(`The job ${job.status}.`);
  await showReport().catch(showError);
}

function onEvent(event) {
  if (event.id) lastEventId = event.id;
  const data = event.data;
  if (event.type === "progress") {
    showProgress(data.progress);
    byId("job-message").textContent = data.message || "";
  } else if (event.type === "status") {
    byId("job-status").textContent = data.status;
  } else if (event.type === "step.started") {
    updateStep(data.index, { status: "running" });
  } else if (event.type === "step.finished") {
    updateStep(data.index, { status: "succeeded", metrics: data.metrics, notes: data.notes });
  } else if (event.type === "done") {
    byId("job-status").textContent = formatValue(data.status);
    if (data.status === "succeeded") showProgress(1);
  }
  return event.type === "done";
}

// Follow the stream until `done`; a dropped connection resumes after the last event seen.
async function follow() {
  let done = false;
  while (!done && !leaving.signal.aborted) {
    try {
      await readEvents(`${jobPath}/events`, (event) => { done = onEvent(event) || done; },
        { lastEventId, signal: leaving.signal });
    } catch (error) {
      if (leaving.signal.aborted) return;
      if (!retryable(error)) throw error;
      notice(`Lost the event stream (${error.message}); reconnecting…`);
    }
    if (!done) await new Promise((resolve) => setTimeout(resolve, RECONNECT_MS));
  }
  if (done) await ended(await api(jobPath));
}

// A dropped connection, an overloaded or restarting API: worth another try. A 404 (the job was deleted) is not.
function retryable(error) {
  return !(error instanceof ApiError) || error.status >= 500 || [408, 429].includes(error.status);
}

async function cancel() {
  showError(null);
  try {
    showJob(await api(`${jobPath}/cancel`, { method: "POST" }));
  } catch (error) {
    showError(error);
  }
}

if (signedIn()) {
  addEventListener("pagehide", () => leaving.abort());
  byId("cancel-job").addEventListener("click", cancel);
  start(async () => {
    const job = await api(jobPath);
    document.title = `Job ${job.id} · Model compression service`;
    showJob(job);
    if (ENDED.includes(job.status)) {
      await ended(job);
      return;
    }
    notice("Following the job's events…");
    follow().catch(showError);
  });
}
