// The jobs, models and datasets pages: one page of the API's list at a time, newest first, with the filters of the
// page's form (the job status goes to the API; a name filter applies to the page shown).
import { api, byId, bytes, el, formatValue, notice, signedIn, start, when } from "./api.js";

const PAGE_SIZE = 20;
const kind = document.body.dataset.page;
let page = 1;
let total = 0;

const link = (href, text) => el("a", { href }, text);

// An import shows its bytes so far, or why it failed; an upload is ready.
function modelStatus(model) {
  if (model.status === "failed") return `failed: ${(model.error && model.error.message) || "see the API"}`;
  const progress = model.progress || {};
  if (model.status !== "importing" || !progress.bytes_total) return model.status;
  return `importing ${Math.floor((100 * progress.bytes_done) / progress.bytes_total)}% of ${bytes(progress.bytes_total)}`;
}

const ROWS = {
  jobs: (job) => [
    link(`/ui/jobs/${encodeURIComponent(job.id)}`, job.id),
    job.status,
    `${Math.round(job.progress * 100)}%`,
    job.steps.map((step) => step.type).join(", "),
    job.model_id || "",
    when(job.created_at),
  ],
  models: (model) => [
    model.id, model.name, modelStatus(model), model.architecture, formatValue(model.num_parameters),
    bytes(model.size_bytes), when(model.created_at),
    model.status === "ready" ? link(`/ui/submit?model=${encodeURIComponent(model.id)}`, `Compress ${model.name}`) : "",
  ],
  datasets: (dataset) => [
    dataset.id, dataset.name, dataset.format, formatValue(dataset.num_samples), bytes(dataset.size_bytes),
    when(dataset.created_at),
  ],
};

function query() {
  const params = new URLSearchParams({ page: String(page), page_size: String(PAGE_SIZE) });
  const status = byId("status-filter");
  if (status && status.value) params.set("status", status.value);
  return params;
}

function shown(items) {
  const filter = byId("name-filter");
  const wanted = filter ? filter.value.trim().toLowerCase() : "";
  return wanted ? items.filter((item) => item.name.toLowerCase().includes(wanted)) : items;
}

async function load() {
  notice("Loading…");
  const result = await api(`/v1/${kind}?${query()}`);
  total = result.total;
  const rows = shown(result.items).map((item) => el("tr", {}, ...ROWS[kind](item).map((cell) => el("td", {}, cell))));
  byId("list").tBodies[0].replaceChildren(...rows);
  const pages = Math.max(1, Math.ceil(total / PAGE_SIZE));
  byId("page-label").textContent = `Page ${page} of ${pages}`;
  byId("previous-page").disabled = page <= 1;
  byId("next-page").disabled = page >= pages;
  notice(rows.length ? `${total} in all.` : "Nothing to show.");
}

async function turn(step) {
  page += step;
  await load();
}

if (signedIn()) {
  start(async () => {
    const status = new URLSearchParams(location.search).get("status");
    if (status && byId("status-filter")) byId("status-filter").value = status;
    byId("filter-form").addEventListener("submit", (event) => {
      event.preventDefault();
      page = 1;
      start(load);
    });
    byId("previous-page").addEventListener("click", () => start(() => turn(-1)));
    byId("next-page").addEventListener("click", () => start(() => turn(1)));
    await load();
  });
}
