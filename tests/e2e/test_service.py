"""End to end with real processes: uvicorn and a Celery worker, over HTTP, on PostgreSQL + Redis and on the
embedded default (SQLite database + SQLite broker)."""

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from cli.stack import local_stack
from core import load_compressed
from core.compression import metrics
from tests.fixtures.api import zip_folder
from tests.fixtures.environment import E2E_BROKER_URL
from tests.fixtures.services import create_key
from tests.models import save_model_folder, tiny_bert, tiny_llama

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
INT8 = {"type": "quantize", "method": "rtn", "bits": 8, "granularity": "per_channel", "symmetric": True}


@pytest.fixture(scope="module")
def redis_stack(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    root = tmp_path_factory.mktemp("stack-redis")
    env = {"MCS_BROKER_URL": E2E_BROKER_URL, "MCS_ARTIFACT_DIR": str(root / "artifacts")}
    with local_stack(env, root / "logs") as url, httpx.Client(base_url=url, timeout=60) as client:
        client.headers["Authorization"] = f"Bearer {create_key(database_url, 'e2e-redis')}"
        yield client


@pytest.fixture(scope="module")
def embedded_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """The README's default: nothing but files under MCS_VAR_DIR."""
    var = tmp_path_factory.mktemp("stack-embedded") / "var"
    env = {"MCS_VAR_DIR": str(var), "MCS_DATABASE_URL": "", "MCS_BROKER_URL": "",
           "MCS_ARTIFACT_DIR": str(var / "artifacts")}
    subprocess.run([sys.executable, "-m", "cli.main", "migrate"], env={**os.environ, **env}, check=True)
    with local_stack(env, var / "logs") as url, httpx.Client(base_url=url, timeout=60) as client:
        key = create_key(f"sqlite:///{var / 'mcs.sqlite'}", "e2e")
        client.headers["Authorization"] = f"Bearer {key}"
        yield client


def run_job(client: httpx.Client, folder: Path, steps: list[dict], timeout_s: float = 240) -> dict:
    files = {"file": ("model.zip", zip_folder(folder), "application/zip")}
    model = client.post("/v1/models", files=files)
    assert model.status_code == 201, model.text
    submitted = client.post("/v1/jobs", json={"model_id": model.json()["id"], "steps": steps})
    assert submitted.status_code == 202, submitted.text
    return wait_for(client, submitted.json()["id"], timeout_s)


def wait_for(client: httpx.Client, job_id: str, timeout_s: float = 240) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish in {timeout_s} s: {job}")


def download(client: httpx.Client, artifact: dict, target: Path) -> Path:
    response = client.get(f"/v1/artifacts/{artifact['id']}")
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == artifact["sha256"] == response.headers["ETag"].strip('"')
    target.write_bytes(response.content)
    return target


def assert_artifact_matches(original: torch.nn.Module, archive: Path, min_cosine: float = 0.999) -> None:
    loaded = load_compressed(archive)
    inputs = metrics.probe_inputs(original)
    cosine = metrics.output_cosine(metrics.model_outputs(original, inputs), metrics.model_outputs(loaded, inputs),
                                   inputs.get("attention_mask"))
    assert cosine >= min_cosine


def assert_succeeded_with_numbers(job: dict) -> None:
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"] == 1.0 and job["attempts"] == 1 and job["error"] is None
    assert [s["status"] for s in job["steps"]] == ["succeeded"]
    assert job["steps"][0]["metrics"]["output_cosine"] >= 0.999
    numbers = job["metrics"]
    assert numbers["after"]["size_bytes"] < 0.5 * numbers["before"]["size_bytes"]
    assert numbers["after"]["parameters"] == numbers["before"]["parameters"]
    assert numbers["after"]["output_cosine"] >= 0.999
    assert numbers["before"]["latency_ms"] > 0 and numbers["after"]["latency_ms"] > 0


def test_bert_upload_to_download_on_postgres_and_redis(redis_stack, tmp_path):
    model = tiny_bert()
    job = run_job(redis_stack, save_model_folder(model, tmp_path / "bert"), [INT8])
    assert_succeeded_with_numbers(job)
    archive = download(redis_stack, job["artifacts"][0], tmp_path / "bert-int8.zip")
    assert_artifact_matches(model, archive)
    partial = redis_stack.get(f"/v1/artifacts/{job['artifacts'][0]['id']}", headers={"Range": "bytes=0-99"})
    assert partial.status_code == 206 and partial.content == archive.read_bytes()[:100]


def test_llama_job_and_duplicate_delivery_does_nothing(redis_stack, tmp_path):
    from worker.celery_app import RUN_JOB_TASK, create_celery

    model = tiny_llama()
    folder = save_model_folder(model, tmp_path / "llama")
    first = run_job(redis_stack, folder, [INT8])
    assert_succeeded_with_numbers(first)
    assert_artifact_matches(model, download(redis_stack, first["artifacts"][0], tmp_path / "llama.zip"))
    producer = create_celery()
    producer.conf.broker_url = E2E_BROKER_URL
    producer.send_task(RUN_JOB_TASK, args=[first["id"]], queue="cpu")
    second = run_job(redis_stack, folder, [INT8])  # one worker, prefetch 1: the duplicate ran before this job
    assert second["status"] == "succeeded"
    replayed = redis_stack.get(f"/v1/jobs/{first['id']}").json()
    assert replayed["attempts"] == 1 and replayed["finished_at"] == first["finished_at"]
    assert replayed["artifacts"] == first["artifacts"]


def test_user_fault_fails_the_job_with_a_clear_error(redis_stack, tmp_path):
    steps = [{**INT8, "targets": ["no.such.module.*"]}]
    job = run_job(redis_stack, save_model_folder(tiny_bert(), tmp_path / "bert"), steps)
    assert job["status"] == "failed" and job["attempts"] == 1
    assert job["error"]["code"] == "invalid_spec" and "no.such.module.*" in job["error"]["message"]
    assert job["artifacts"] == []


def test_embedded_default_runs_the_same_job(embedded_stack, tmp_path):
    model = tiny_bert()
    job = run_job(embedded_stack, save_model_folder(model, tmp_path / "bert"), [INT8])
    assert_succeeded_with_numbers(job)
    assert_artifact_matches(model, download(embedded_stack, job["artifacts"][0], tmp_path / "a.zip"))


def test_int8_dynamic_job_exports_onnx_that_runs_in_onnxruntime(redis_stack, tmp_path):
    import zipfile

    files = {"file": ("model.zip", zip_folder(save_model_folder(tiny_bert(), tmp_path / "bert")), "application/zip")}
    model_id = redis_stack.post("/v1/models", files=files).json()["id"]
    body = {"model_id": model_id, "steps": [{"type": "quantize", "method": "dynamic"}], "export": ["onnx"]}
    submitted = redis_stack.post("/v1/jobs", json=body)
    assert submitted.status_code == 202, submitted.text
    job = wait_for(redis_stack, submitted.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["metrics"]["after"]["onnx_output_cosine"] >= 0.99
    archive = download(redis_stack, job["artifacts"][0], tmp_path / "int8.zip")
    assert "model.onnx" in zipfile.ZipFile(archive).namelist()


def test_int4_job_exports_compressed_tensors_that_transformers_loads(redis_stack, tmp_path):
    import zipfile

    from transformers import AutoModelForCausalLM

    files = {"file": ("model.zip", zip_folder(save_model_folder(tiny_llama(), tmp_path / "llama")), "application/zip")}
    model_id = redis_stack.post("/v1/models", files=files).json()["id"]
    step = {"type": "quantize", "bits": 4, "granularity": "per_group", "group_size": 32}
    body = {"model_id": model_id, "steps": [step], "export": ["compressed-tensors"]}
    submitted = redis_stack.post("/v1/jobs", json=body)
    assert submitted.status_code == 202, submitted.text
    job = wait_for(redis_stack, submitted.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    after = job["metrics"]["after"]
    assert after["compressed_tensors"]["format"] == "pack-quantized"
    assert abs(after["compressed_tensors_output_cosine"] - after["output_cosine"]) < 1e-6
    archive = download(redis_stack, job["artifacts"][0], tmp_path / "int4.zip")
    zipfile.ZipFile(archive).extractall(tmp_path / "artifact")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "artifact" / "compressed-tensors").eval()
    ids = torch.arange(16).view(1, 16)
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, load_compressed(archive)(ids).logits)


SMALL_CALIBRATION = {"num_samples": 4, "seq_len": 32}
EVERY_QUANTIZE_METHOD = {
    "rtn int4 g32": {"method": "rtn", "bits": 4, "granularity": "per_group", "group_size": 32},
    "kmeans 4-bit": {"method": "kmeans", "bits": 4},
    "gptq int4 g32": {"method": "gptq", "group_size": 32, "calibration": SMALL_CALIBRATION},
    "fp8": {"method": "fp8"},
    "mixed 4/8": {"method": "mixed", "bits": [4, 8], "budget": {"avg_bits": 6.0}, "calibration": SMALL_CALIBRATION},
    "dynamic": {"method": "dynamic"},
    "static": {"method": "static", "calibration": SMALL_CALIBRATION},
    "smoothquant": {"method": "smoothquant", "calibration": SMALL_CALIBRATION},
}


def test_every_quantize_method_round_trips_through_the_api(redis_stack, tmp_path):
    """Each method as a user runs it: submitted over HTTP, run by the worker, downloaded, loaded back with
    core.load_compressed, and computing what the job reported (cosine vs the original on the probe inputs)."""
    model = tiny_llama()
    files = {"file": ("model.zip", zip_folder(save_model_folder(model, tmp_path / "llama")), "application/zip")}
    model_id = redis_stack.post("/v1/models", files=files).json()["id"]
    submitted = {}
    for name, step in EVERY_QUANTIZE_METHOD.items():
        response = redis_stack.post("/v1/jobs", json={"model_id": model_id, "steps": [{"type": "quantize", **step}]})
        assert response.status_code == 202, (name, response.text)
        submitted[name] = response.json()["id"]
    inputs = metrics.probe_inputs(model)
    reference = metrics.model_outputs(model, inputs)
    for name, job_id in submitted.items():
        job = wait_for(redis_stack, job_id)
        assert job["status"] == "succeeded", (name, job["error"])
        after, before = job["metrics"]["after"], job["metrics"]["before"]
        assert after["size_bytes"] < 0.6 * before["size_bytes"], name
        archive = download(redis_stack, job["artifacts"][0], tmp_path / f"{job_id}.zip")
        loaded = load_compressed(archive)
        cosine = metrics.output_cosine(reference, metrics.model_outputs(loaded, inputs), inputs.get("attention_mask"))
        assert cosine >= 0.9, (name, cosine)
        assert abs(cosine - after["output_cosine"]) < 1e-3, (name, cosine, after["output_cosine"])
