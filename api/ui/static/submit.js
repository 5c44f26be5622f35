// Submit a job from a preset: {"model_id", "preset", "overrides"?, "queue"?} to POST /v1/jobs, then its page.
import { api, byId, el, notice, showError, signedIn, start } from "./api.js";

let presets = [];

function describe() {
  const preset = presets.find((p) => p.name === byId("preset-select").value);
  byId("preset-text").textContent = preset ? preset.summary : "";
  byId("preset-measured").textContent = preset ? `Measured: ${preset.measured}` : "";
  byId("preset-steps").textContent = preset ? JSON.stringify(preset.steps, null, 2) : "";
}

async function fillModels() {
  const wanted = new URLSearchParams(location.search).get("model");
  const items = (await api("/v1/models?page_size=100")).items.filter((m) => m.status === "ready");
  const options = items.map((m) => el("option", { value: m.id }, `${m.name} (${m.id}, ${m.architecture})`));
  byId("model-select").replaceChildren(...options);
  if (wanted) byId("model-select").value = wanted;
  if (!items.length) notice("No model yet: upload one first.");
}

async function fillPresets() {
  presets = await api("/v1/presets");
  byId("preset-select").replaceChildren(...presets.map((p) => el("option", { value: p.name }, p.name)));
  describe();
}

function body() {
  const job = { model_id: byId("model-select").value, preset: byId("preset-select").value };
  const overrides = byId("overrides").value.trim();
  if (overrides) {
    try {
      job.overrides = JSON.parse(overrides);
    } catch (error) {
      throw new Error(`Overrides are not JSON: ${error.message}`);
    }
  }
  if (byId("queue-select").value) job.queue = byId("queue-select").value;
  return job;
}

async function submit(event) {
  event.preventDefault();
  showError(null);
  try {
    const job = await api("/v1/jobs", { method: "POST", json: body() });
    location.assign(`/ui/jobs/${encodeURIComponent(job.id)}`);
  } catch (error) {
    showError(error);
  }
}

if (signedIn()) {
  start(async () => {
    byId("preset-select").addEventListener("change", describe);
    byId("submit-form").addEventListener("submit", submit);
    await Promise.all([fillModels(), fillPresets()]);
  });
}
