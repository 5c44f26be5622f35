"""`mcs` as a user runs it (a subprocess) against the real API and worker: the verbs, --json output that is the
API's JSON, plain lines when piped, a bar on a terminal, and exit codes (0 succeeded, 1 failed, 2 usage,
3 cancelled)."""

import json
import os
import pty
import subprocess
import sys

import pytest

from tests.client.conftest import LONG, sha256, wait_running

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture()
def mcs(live, tmp_path):
    env = {**os.environ, "MCS_API_URL": live.url, "MCS_API_KEY": live.key, "MCS_CONFIG": str(tmp_path / "none.toml")}

    def run(*args: str, key: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        used = env if key else {k: v for k, v in env.items() if k != "MCS_API_KEY"}
        return subprocess.run([sys.executable, "-m", "cli.main", *args], env=used, capture_output=True, text=True,
                              timeout=timeout, cwd=tmp_path)

    return run


def recipe(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


INT8_YAML = "steps:\n  - type: quantize\n    method: rtn\n    bits: 8\n    granularity: per_channel\n"


def test_upload_submit_wait_download_as_json(mcs, live, model_folder, tmp_path):
    uploaded = mcs("models", "upload", str(model_folder), "--name", "cli-bert", "--json")
    assert uploaded.returncode == 0, uploaded.stderr
    model = json.loads(uploaded.stdout)
    assert model == live.raw(f"/v1/models/{model['id']}") and model["name"] == "cli-bert"
    assert "upload " in uploaded.stderr and "\x1b[" not in uploaded.stderr  # plain progress lines when piped

    done = mcs("jobs", "submit", "--model", model["id"], "--recipe", recipe(tmp_path, INT8_YAML), "--wait",
               "--download", "out", "--json")
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job == live.raw(f"/v1/jobs/{job['id']}") and job["status"] == "succeeded"
    lines = done.stderr.splitlines()
    assert any(line.startswith("  succeeded 100.0%") for line in lines) and not any("\x1b[" in line for line in lines)
    artifact = job["artifacts"][0]
    assert sha256(tmp_path / "out" / artifact["name"]) == artifact["sha256"]
    assert any(line.startswith("downloaded ") and "sha256 verified" in line for line in lines)

    shown = mcs("jobs", "show", job["id"])
    assert shown.returncode == 0 and job["id"] in shown.stdout and "succeeded" in shown.stdout
    assert mcs("jobs", "show", job["id"], "--json").stdout == done.stdout
    listed = mcs("jobs", "list", "--status", "succeeded", "--json")
    assert json.loads(listed.stdout) == live.raw("/v1/jobs?status=succeeded")
    table = mcs("jobs", "list", "--status", "succeeded").stdout.splitlines()
    assert table[0].split() == ["ID", "STATUS", "PROGRESS", "MODEL", "STEPS", "CREATED"]
    assert any(row.startswith(job["id"]) for row in table[1:])

    fetched = mcs("artifacts", "download", job["id"], "-o", "again")
    assert fetched.returncode == 0, fetched.stderr
    assert sha256(tmp_path / "again" / artifact["name"]) == artifact["sha256"]
    watched = mcs("jobs", "watch", job["id"], "-q")
    assert watched.returncode == 0 and watched.stderr == ""


def test_a_failed_job_exits_1(mcs, model, tmp_path):
    failing = recipe(tmp_path, "steps:\n  - {type: quantize, bits: 8, targets: ['no.such.module.*']}\n")
    result = mcs("jobs", "submit", "--model", model.id, "--recipe", failing, "--wait")
    assert result.returncode == 1
    assert "failed: invalid_spec" in result.stderr and "no.such.module.*" in result.stderr


def test_a_cancelled_job_exits_3(mcs, api, model, tmp_path):
    submitted = mcs("jobs", "submit", "--model", model.id, "--recipe", recipe(tmp_path, json.dumps({"steps": [LONG]})),
                    "--json")
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["id"]
    wait_running(api, job_id)
    cancelled = mcs("jobs", "cancel", job_id)
    assert cancelled.returncode == 0 and "cancel requested" in cancelled.stdout
    watched = mcs("jobs", "watch", job_id, "--json")
    assert watched.returncode == 3 and json.loads(watched.stdout)["status"] == "cancelled"
    again = mcs("jobs", "cancel", job_id, "--json")
    assert again.returncode == 1 and json.loads(again.stdout)["error"]["code"] == "conflict"


def test_usage_errors_exit_2(mcs, model, tmp_path):
    assert mcs("jobs", "submit", "--model", model.id).returncode == 2  # no --recipe
    missing = mcs("jobs", "submit", "--model", model.id, "--recipe", "nope.yaml")
    assert missing.returncode == 2 and "no recipe file" in missing.stderr
    assert mcs("jobs").returncode == 2 and mcs().returncode == 2
    keyless = mcs("jobs", "list", key=False)
    assert keyless.returncode == 2 and "MCS_API_KEY" in keyless.stderr
    assert mcs("models", "upload", "no-such-folder").returncode == 2


def test_api_errors_exit_1_with_the_error_body_as_json(mcs):
    result = mcs("jobs", "show", "job_doesnotexist", "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["error"]["code"] == "not_found" and "not_found" in result.stderr
    assert mcs("artifacts", "download", "job_doesnotexist").returncode == 1


def test_datasets_upload(mcs, live, tmp_path):
    (tmp_path / "texts.txt").write_text("one sample\nanother sample\n")
    result = mcs("datasets", "upload", "texts.txt", "--format", "text", "--json")
    assert result.returncode == 0, result.stderr
    dataset = json.loads(result.stdout)
    assert dataset == live.raw(f"/v1/datasets/{dataset['id']}") and dataset["num_samples"] == 2
    assert dataset["id"] in mcs("datasets", "list").stdout


def test_a_terminal_gets_progress_bars(live, succeeded_job, tmp_path):
    """On a TTY the progress is drawn by rich (cursor movement, bar characters), still on stderr."""
    controller, terminal = pty.openpty()
    env = {**os.environ, "MCS_API_URL": live.url, "MCS_API_KEY": live.key, "TERM": "xterm-256color",
           "COLUMNS": "120"}
    env.pop("NO_COLOR", None)
    result = subprocess.run([sys.executable, "-m", "cli.main", "artifacts", "download", succeeded_job.id, "-o",
                             str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=terminal, timeout=120)
    os.close(terminal)
    drawn = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:
            break
        if not chunk:
            break
        drawn += chunk
    os.close(controller)
    assert result.returncode == 0 and b"downloaded" in result.stdout
    assert "━".encode() in drawn and b"\x1b[" in drawn


def test_a_preset_job_from_the_readme(mcs, live, model, tmp_path):
    presets = mcs("presets", "list", "--json")
    assert presets.returncode == 0, presets.stderr
    assert json.loads(presets.stdout) == live.raw("/v1/presets")
    assert {"w8a16-rtn", "w4a16-gptq", "sparse50-sparsegpt"} <= {p["name"] for p in json.loads(presets.stdout)}

    done = mcs("jobs", "submit", "--model", model.id, "--preset", "w8a16-rtn", "--wait", "--download", "out",
               "--json")
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["status"] == "succeeded" and job["steps"][0]["config"]["bits"] == 8
    artifact = job["artifacts"][0]
    assert sha256(tmp_path / "out" / artifact["name"]) == artifact["sha256"]

    unknown = mcs("jobs", "submit", "--model", model.id, "--preset", "w8a16-rtn", "--override", "sparsity=0.5")
    assert unknown.returncode == 1 and "sparsity" in unknown.stderr


def test_a_search_is_submitted_shown_and_cancelled(mcs, api, model, tmp_path):
    texts = tmp_path / "held-out.jsonl"
    texts.write_text("\n".join(json.dumps({"text": f"the {word} sat on the mat"}) for word in ("cat", "dog", "fox")))
    dataset = api.datasets.upload(texts, progress=False).id
    request = recipe(tmp_path, "objective: min_size\nconstraint: {metric: cosine, min: 0.99}\n"
                               f"evaluate: {{dataset_id: {dataset}, metrics: [embedding_cosine]}}\n"
                               "space: {methods: [rtn], bits: [2, 3, 4, 5, 6, 8], group_sizes: [32, 64, null], "
                               "symmetric: [true, false], sensitivity_scan: false}\n"
                               "budget: {max_trials: 20}\n")
    # A space of 36 recipes, one trial at a time: the search is still running when the cancel arrives.
    started = mcs("searches", "submit", "--model", model.id, request, "--json")
    assert started.returncode == 0, started.stderr
    search = json.loads(started.stdout)
    assert search["status"] == "running" and search["trials"][0]["steps"][0]["method"] == "rtn"
    cancelled = mcs("searches", "cancel", search["id"])
    assert cancelled.returncode == 0 and f"{search['id']}  cancelled" in cancelled.stdout, cancelled.stderr
    shown = json.loads(mcs("searches", "show", search["id"], "--json").stdout)
    assert shown["status"] == "cancelled" and shown["spec"]["constraint"]["min"] == 0.99
