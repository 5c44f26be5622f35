// The job's report (GET /v1/jobs/{id}/report: one self-contained HTML page), fetched with the key and shown in a
// frame sandboxed without scripts; it can also be saved as a file that opens anywhere.
import { byId, notice, request, signedIn, start } from "./api.js";

const jobId = byId("main").dataset.jobId;

function fitHeight(frame) {
  // sandboxed without scripts but same-origin: this page may measure it
  frame.style.height = `${frame.contentDocument.documentElement.scrollHeight + 24}px`;
}

function offerSave(html) {
  const button = byId("save-report");
  button.addEventListener("click", () => {
    const link = document.createElement("a");
    link.href = URL.createObjectURL(new Blob([html], { type: "text/html" }));
    link.download = `report-${jobId}.html`;
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
  });
  button.disabled = false;
}

if (signedIn()) {
  start(async () => {
    byId("job-link").href = `/ui/jobs/${encodeURIComponent(jobId)}`;
    document.title = `Report of job ${jobId} · Model compression service`;
    notice("Loading the report…");
    const html = await (await request(`/v1/jobs/${encodeURIComponent(jobId)}/report`)).text();
    const frame = byId("report-frame");
    const loaded = new Promise((resolve) => frame.addEventListener("load", resolve, { once: true }));
    frame.srcdoc = html;
    await loaded;
    fitHeight(frame);
    offerSave(html);
    notice("");
  });
}
