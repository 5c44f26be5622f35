import { ApiError, byId, notice, request, saveKey, showError, start } from "./api.js";

// Where to go after signing in: a dashboard path only (an absolute or protocol-relative `next` is ignored).
function nextPage() {
  const next = new URLSearchParams(location.search).get("next") || "";
  return /^\/ui\/[^/]/.test(next) || next === "/ui" ? next : "/ui/jobs";
}

async function signIn(event) {
  event.preventDefault();
  showError(null);
  const key = byId("api-key").value.trim();
  notice("Checking the key…");
  try {
    await request("/v1/models?page_size=1", { key });
  } catch (error) {
    notice("");
    const unknown = error instanceof ApiError && error.status === 401;
    showError(unknown ? new Error("This API key is unknown or revoked.") : error);
    byId("api-key").focus();
    return;
  }
  saveKey(key);
  location.assign(nextPage());
}

start(async () => {
  byId("signin-form").addEventListener("submit", signIn);
  byId("api-key").focus();
});
