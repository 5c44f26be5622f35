"""The Python client against a real API and worker: chunked uploads that resume, YAML recipes, waiting, downloads
that resume with Range and check the sha256 ETag, cancelling, and errors that carry the API's code."""

import json
import zipfile

import pytest

from cli.stack import free_port
from client import ApiError, Client, Reporter
from core.service.chunked_uploads import manifest_sha256
from tests.client.conftest import INT8, LONG, Faults, sha256, wait_running
from tests.fixtures.api import zip_folder

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def manifest(folder):
    return [{"path": f.name, "size": f.stat().st_size, "sha256": sha256(f)} for f in sorted(folder.iterdir())]


def test_a_folder_upload_resumes_a_put_cut_halfway(live, bert_folder):
    size = (bert_folder / "model.safetensors").stat().st_size
    faults = Faults()
    faults.cut_put("model.safetensors", size // 2)
    with Client(live.url, live.key, transport=faults) as faulty:
        model = faulty.models.upload(bert_folder, "resumed", progress=False)
    assert model.name == "resumed" and model.architecture == "BertModel"
    assert model.sha256 == manifest_sha256(manifest(bert_folder))
    puts = [content_range for _, _, content_range, _, _ in faults.requests("PUT", "/model.safetensors")]
    assert puts[0] == f"bytes 0-{size - 1}/{size}"  # the cut one
    resumed_at = [int(value.split()[1].split("-")[0]) for value in puts[1:]]
    assert resumed_at and 0 < resumed_at[-1] <= size // 2, puts  # the last PUT went on from what had arrived


def test_an_upload_begun_elsewhere_is_continued_by_its_id(api, bert_folder):
    weights = (bert_folder / "model.safetensors").read_bytes()
    upload = api.http.json("POST", "/v1/uploads", json={"name": "later", "files": manifest(bert_folder)})
    api.http.request("PUT", f"/v1/uploads/{upload['id']}/files/model.safetensors", content=weights[:1000],
                        headers={"Content-Range": f"bytes 0-{len(weights) - 1}/{len(weights)}"})
    model = api.models.upload(bert_folder, progress=False, upload_id=upload["id"])
    assert model.name == "later" and model.sha256 == manifest_sha256(manifest(bert_folder))
    with pytest.raises(ApiError) as gone:  # completed uploads are gone
        api.http.request("GET", f"/v1/uploads/{upload['id']}")
    assert gone.value.code == "not_found"


def test_an_archive_goes_up_in_one_request(api, bert_folder, tmp_path):
    archive = tmp_path / "tiny.zip"
    archive.write_bytes(zip_folder(bert_folder))
    model = api.models.upload(archive, progress=False)
    assert model.name == "tiny" and model.architecture == "BertModel"
    assert api.models.get(model.id) == model


def test_a_dataset_upload(api, tmp_path):
    data = tmp_path / "calibration.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"sample number {i}"}) for i in range(7)) + "\n")
    dataset = api.datasets.upload(data, "calibration", progress=False)
    assert dataset.num_samples == 7 and dataset.format == "jsonl" and dataset.name == "calibration"
    assert dataset.id in [d.id for d in api.datasets.list(page_size=100).items]


class Recorder(Reporter):
    def __init__(self):
        self.jobs, self.transfers = [], []

    def job(self, job):
        self.jobs.append((job.status, job.progress))

    def transfer(self, description, total):
        self.transfers.append((description, total))
        return super().transfer(description, total)


def test_submit_a_yaml_recipe_wait_then_download_resuming_with_range(live, api, model, tmp_path):
    recipe = tmp_path / "int8.yaml"
    recipe.write_text("# int8 weights, one scale per output channel\nsteps:\n"
                      "  - {type: quantize, method: rtn, bits: 8, granularity: per_channel, symmetric: true}\n")
    job = api.jobs.submit(model, recipe)
    assert job.status in ("queued", "running") and job.steps[0].config["bits"] == 8
    shown = Recorder()
    assert job.wait(progress=shown, timeout=240) is job
    assert job.status == "succeeded" and job.done and shown.jobs[-1] == ("succeeded", 1.0)
    artifact = job.artifacts[0]

    faults = Faults()
    faults.cut_get(artifact.size_bytes // 2)
    with Client(live.url, live.key, transport=faults) as cut:
        path = cut.jobs.get(job.id).download(tmp_path / "out", progress=shown)
    assert path == tmp_path / "out" / artifact.name and sha256(path) == artifact.sha256
    assert zipfile.ZipFile(path).testzip() is None
    gets = faults.requests("GET", f"/v1/artifacts/{artifact.id}")
    assert [(rng, status) for _, _, _, rng, status in gets] == [
        (None, 200), (f"bytes={artifact.size_bytes // 2}-", 206)]
    assert list((tmp_path / "out").iterdir()) == [path]  # no partial file left
    assert ("download " + artifact.name, artifact.size_bytes) in shown.transfers


def test_a_stale_partial_file_is_detected_and_fetched_again(live, succeeded_job, tmp_path):
    artifact = succeeded_job.artifacts[0]
    (tmp_path / f".{artifact.name}.{artifact.sha256[:16]}.part").write_bytes(b"not the artifact" * 10)
    faults = Faults()
    with Client(live.url, live.key, transport=faults) as faulty:
        path = faulty.artifacts.download(artifact.id, tmp_path, progress=False)  # by id: HEAD, then GET
    assert sha256(path) == artifact.sha256
    statuses = [(method, status) for method, _, _, _, status in faults.log]
    assert statuses == [("HEAD", 200), ("GET", 206), ("GET", 200)]  # resumed, did not match, fetched whole

    faults.flip_get()  # a byte corrupted on the way is never kept
    with Client(live.url, live.key, transport=faults) as faulty, pytest.raises(ApiError) as corrupted:
        faulty.artifacts.download(artifact, tmp_path / "again.zip", progress=False)
    assert corrupted.value.code == "checksum_mismatch" and corrupted.value.details["expected"] == artifact.sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == [artifact.name]


def test_cancel_a_running_job_and_list_jobs_by_status(api, model):
    job = api.jobs.submit(model.id, {"steps": [LONG]})
    wait_running(api, job.id)
    job.cancel()
    assert job.cancel_requested and job.status == "running"
    job.wait(progress=False, timeout=120)
    assert job.status == "cancelled" and job.error.code == "cancelled" and job.artifacts == []
    assert job.id in [j.id for j in api.jobs.list(status="cancelled").items]
    assert job.id not in [j.id for j in api.jobs.list(status="succeeded", page_size=100).items]
    with pytest.raises(ApiError) as ended:
        job.cancel()
    assert ended.value.status == 409 and ended.value.code == "conflict"
    with pytest.raises(ApiError) as nothing:
        job.download()
    assert nothing.value.code == "no_artifact"


def test_errors_carry_the_api_code_message_and_details(live, api, model):
    with pytest.raises(ApiError) as missing:
        api.jobs.get("job_doesnotexist")
    assert (missing.value.status, missing.value.code) == (404, "not_found") and "job_doesnotexist" in str(missing.value)
    with pytest.raises(ApiError) as invalid:
        api.jobs.submit(model, [{"type": "quantize", "method": "rtn", "bits": 99}])
    assert (invalid.value.status, invalid.value.code) == (422, "validation_error")
    assert any("bits" in problem["field"] for problem in invalid.value.details)
    assert invalid.value.to_json()["error"]["details"] == invalid.value.details
    with Client(live.url, "mcs_not-a-key") as stranger, pytest.raises(ApiError) as refused:
        stranger.models.list()
    assert (refused.value.status, refused.value.code) == (401, "unauthorized")
    with Client(f"http://127.0.0.1:{free_port()}", "k", max_retries=0) as nowhere, pytest.raises(ApiError) as down:
        nowhere.jobs.list()
    assert (down.value.status, down.value.code) == (None, "connection_error")


def test_submit_retries_are_idempotent(api, model):
    """A retried submission (same Idempotency-Key) is the same job, never a second one."""
    first = api.jobs.submit(model, [INT8], idempotency_key="retry-me")
    again = api.jobs.submit(model, [INT8], idempotency_key="retry-me")
    assert again.id == first.id
    first.wait(progress=False, timeout=240)


def test_a_job_read_as_json_is_the_api_json(live, api, succeeded_job):
    job = api.jobs.get(succeeded_job.id)
    assert job.model_dump(mode="json") == live.raw(f"/v1/jobs/{job.id}")
    page = api.jobs.list("succeeded", page_size=5)
    assert page.model_dump(mode="json") == live.raw("/v1/jobs?status=succeeded&page_size=5")
