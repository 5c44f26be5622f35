"""End to end on S3 with no shared disk: the API and the worker are separate processes with their own var and
scratch folders and no artifact folder in common; models, datasets and artifacts travel only through the bucket
(moto's server). Upload, job (the worker fetches the model and the calibration dataset into its own scratch),
download through the API and through a presigned redirect; a model imported from another bucket by the worker."""

import hashlib
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cli.stack import free_port, spawn, stop_processes, wait_ready
from client import Client
from core import load_compressed
from core.compression import metrics
from core.service.storage.s3 import S3ArtifactStore
from tests.e2e.test_service import wait_for
from tests.fixtures.api import zip_folder
from tests.fixtures.environment import E2E_BROKER_URL
from tests.fixtures.services import create_key
from tests.models import save_model_folder, tiny_llama
from tests.storage.helpers import AWS_ENV, object_keys, s3_settings

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
GPTQ = {"type": "quantize", "method": "gptq", "group_size": 32}
SOURCE_BUCKET = f"mcs-import-{uuid.uuid4().hex[:12]}"  # a tenant's own bucket, which the operator allows imports from


class Hosts:
    """Two "hosts": an API and a worker that share the database, the broker and the bucket, and nothing else."""

    def __init__(self, root: Path, settings: dict[str, str]) -> None:
        self.root, self.processes = root, []
        common = {**os.environ, **AWS_ENV, **settings, "MCS_BROKER_URL": E2E_BROKER_URL, "PYTHONUNBUFFERED": "1"}
        self.env = {name: {**common, "MCS_VAR_DIR": str(root / name / "var"),
                           "MCS_ARTIFACT_DIR": str(root / name / "var" / "artifacts")} for name in ("api", "worker")}

    def start(self) -> str:
        port = free_port()
        commands = {"api": [sys.executable, "-m", "cli.main", "serve", "--port", str(port)],
                    "worker": [sys.executable, "-m", "cli.main", "worker", "--queues", "cpu", "--concurrency", "1"]}
        for name, command in commands.items():
            (self.root / name).mkdir(parents=True, exist_ok=True)
            self.processes.append(spawn(command, self.env[name], self.root / name / f"{name}.log"))
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, self.processes)
        return url

    def stored_files(self, name: str) -> list[str]:
        """Files on that host's disk outside its scratch (the store's folders when it is local disk)."""
        artifacts = self.root / name / "var" / "artifacts"
        return sorted(str(p.relative_to(artifacts)) for p in artifacts.rglob("*")
                      if p.is_file() and p.relative_to(artifacts).parts[0] != "tmp")


@pytest.fixture(scope="module")
def hosts(database_url, s3_endpoint, s3_bucket, tmp_path_factory) -> Iterator[tuple[Hosts, httpx.Client]]:
    prefix = "e2e"
    hosts = Hosts(tmp_path_factory.mktemp("no-shared-disk"),
                  s3_settings(s3_endpoint, s3_bucket, prefix, s3_multipart_threshold_bytes=str(5 * 1024**2),
                              s3_multipart_chunk_bytes=str(5 * 1024**2), import_s3_buckets=SOURCE_BUCKET,
                              import_allow_private="true"))
    try:
        url = hosts.start()
        with httpx.Client(base_url=url, timeout=60) as client:
            client.headers["Authorization"] = f"Bearer {create_key(database_url, 'e2e-s3')}"
            hosts.store = S3ArtifactStore(s3_bucket, prefix, s3_endpoint)
            yield hosts, client
    finally:
        stop_processes(hosts.processes)


def test_upload_job_download_with_no_shared_disk(hosts, tmp_path):
    hosts, client = hosts
    model = tiny_llama()
    files = {"file": ("llama.zip", zip_folder(save_model_folder(model, tmp_path / "llama")), "application/zip")}
    model_id = client.post("/v1/models", files=files).json()["id"]
    texts = "\n".join(f"calibration sample number {i} about storage and compression" for i in range(16))
    dataset = client.post("/v1/datasets", files={"file": ("calib.txt", texts.encode(), "text/plain")})
    assert dataset.status_code == 201, dataset.text
    step = {**GPTQ, "calibration": {"dataset_id": dataset.json()["id"], "num_samples": 4, "seq_len": 16}}
    submitted = client.post("/v1/jobs", json={"model_id": model_id, "steps": [step]})
    assert submitted.status_code == 202, submitted.text
    job = wait_for(client, submitted.json()["id"])
    assert job["status"] == "succeeded", (job["error"], (hosts.root / "worker" / "worker.log").read_text()[-3000:])

    artifact = job["artifacts"][0]
    keys = object_keys(hosts.store)
    assert f"models/{model_id}/tree.json" in keys and f"datasets/{dataset.json()['id']}/data.jsonl" in keys
    assert f"artifacts/{job['id']}/attempt-1/model.zip" in keys
    assert hosts.stored_files("api") == [] and hosts.stored_files("worker") == []  # nothing stored on either disk
    assert not (hosts.root / "worker" / "var" / "artifacts" / "tmp" / f"job-{job['id']}").exists()  # scratch gone

    streamed = client.get(f"/v1/artifacts/{artifact['id']}")
    assert streamed.status_code == 200
    assert hashlib.sha256(streamed.content).hexdigest() == artifact["sha256"] == streamed.headers["ETag"].strip('"')
    partial = client.get(f"/v1/artifacts/{artifact['id']}", headers={"Range": "bytes=100-199"})
    assert partial.status_code == 206 and partial.content == streamed.content[100:200]
    (tmp_path / "artifact.zip").write_bytes(streamed.content)
    loaded = load_compressed(tmp_path / "artifact.zip")
    inputs = metrics.probe_inputs(model)
    cosine = metrics.output_cosine(metrics.model_outputs(model, inputs), metrics.model_outputs(loaded, inputs),
                                   inputs.get("attention_mask"))
    assert abs(cosine - job["metrics"]["after"]["output_cosine"]) < 1e-3


def test_a_redirecting_api_hands_out_presigned_urls(hosts, database_url, tmp_path):
    """A second API process with MCS_ARTIFACT_REDIRECT on, beside the first: the artifact a worker stored is
    served from the bucket, and the bytes never pass through the API."""
    hosts, client = hosts
    model_id = client.post("/v1/models", files={"file": ("m.zip", zip_folder(save_model_folder(
        tiny_llama(), tmp_path / "m")), "application/zip")}).json()["id"]
    job = wait_for(client, client.post("/v1/jobs", json={"model_id": model_id, "steps": [
        {"type": "quantize", "method": "rtn", "bits": 8}]}).json()["id"])
    assert job["status"] == "succeeded", job["error"]
    artifact = job["artifacts"][0]

    port = free_port()
    env = {**hosts.env["api"], "MCS_ARTIFACT_REDIRECT": "true", "MCS_VAR_DIR": str(tmp_path / "api2")}
    env["MCS_ARTIFACT_DIR"] = str(tmp_path / "api2" / "artifacts")
    api2 = spawn([sys.executable, "-m", "cli.main", "serve", "--port", str(port)], env, tmp_path / "api2.log")
    try:
        wait_ready(f"http://127.0.0.1:{port}", [api2])
        redirected = httpx.get(f"http://127.0.0.1:{port}/v1/artifacts/{artifact['id']}",
                               headers={"Authorization": client.headers["Authorization"]})
        assert redirected.status_code == 302
        followed = httpx.get(redirected.headers["Location"])
        assert followed.status_code == 200 and hashlib.sha256(followed.content).hexdigest() == artifact["sha256"]
        with httpx.Client(headers={"Authorization": client.headers["Authorization"]}, follow_redirects=True) as user:
            direct = user.get(f"http://127.0.0.1:{port}/v1/artifacts/{artifact['id']}")  # as a client following it
        assert direct.status_code == 200 and direct.content == followed.content
        assert direct.history[0].status_code == 302 and "authorization" not in direct.request.headers  # key not sent on
    finally:
        stop_processes([api2])


def test_the_worker_imports_a_model_from_a_bucket_with_progress_and_no_key_in_any_log(hosts, s3_endpoint, tmp_path):
    """`client.models.import_from` against the real API and worker: the API only accepts, the worker fetches the
    folder from the tenant's bucket into its own scratch and stores it; a job then runs on it. The request's secret
    key appears in no log line of either process."""
    import boto3

    hosts, http = hosts
    folder = save_model_folder(tiny_llama(), tmp_path / "llama")
    source = boto3.client("s3", endpoint_url=s3_endpoint)
    source.create_bucket(Bucket=SOURCE_BUCKET)
    for file in folder.iterdir():
        source.upload_file(str(file), SOURCE_BUCKET, f"team/llama/{file.name}")
    secret = f"secret-{uuid.uuid4().hex}"
    s3 = {"endpoint_url": s3_endpoint, "access_key_id": "tenant-key", "secret_access_key": secret}
    with Client(str(http.base_url), http.headers["Authorization"].removeprefix("Bearer ")) as client:
        accepted = client.models.import_from(f"s3://{SOURCE_BUCKET}/team/llama/", s3=s3, wait=False)
        assert accepted.status == "importing"
        model = client.models.import_from(f"s3://{SOURCE_BUCKET}/team/llama/", "llama", s3=s3, progress=False,
                                          timeout=120, interval=0.2)
    assert (model.status, model.name, model.architecture) == ("ready", "llama", "LlamaForCausalLM"), model
    assert model.source == f"s3://{SOURCE_BUCKET}/team/llama/" and model.progress["stage"] == "done"
    assert model.progress["bytes_done"] == model.progress["bytes_total"] == sum(
        f.stat().st_size for f in folder.iterdir())
    assert f"models/{model.id}/tree.json" in object_keys(hosts.store, "models/")
    job = wait_for(http, http.post("/v1/jobs", json={"model_id": model.id, "steps": [
        {"type": "quantize", "method": "rtn", "bits": 8}]}).json()["id"])
    assert job["status"] == "succeeded", job["error"]
    logs = {name: (hosts.root / name / f"{name}.log").read_text() for name in ("api", "worker")}
    assert "worker.imports.import_model" in logs["worker"] or model.id in logs["worker"], logs["worker"][-2000:]
    assert all(secret not in text for text in logs.values())
