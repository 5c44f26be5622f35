"""Every job reaches exactly one terminal state, with real API and worker processes on private PostgreSQL and Redis:
an unreadable input fails at once with a user-fault code, a job with no attempt left is ended instead of waiting
in `queued`, and a job submitted while the broker is down is refused (503) instead of stranded."""

import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.fixtures.api import zip_folder
from tests.fixtures.services import INT8, ended, submit, wait_for
from tests.models import save_model_folder, tiny_llama, tiny_tokenizer

pytestmark = [pytest.mark.faults, pytest.mark.slow]
USER_FAULTS = {"input_unreadable", "unsafe_input", "unsupported_model", "not_found"}


def _drop_a_shard(folder: Path) -> None:
    sorted(folder.glob("model-*.safetensors"))[-1].unlink()


def _truncate_a_shard(folder: Path) -> None:
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])


def _garble_the_config(folder: Path) -> None:
    (folder / "config.json").write_text("{not json")


def _garble_the_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").write_text("\x00garbage")


def _remove_the_folder(folder: Path) -> None:
    shutil.rmtree(folder)


BREAKAGES: list[Callable[[Path], None]] = [_drop_a_shard, _truncate_a_shard, _garble_the_config,
                                           _garble_the_tokenizer, _remove_the_folder]


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sharded-llama")
    tiny_llama().save_pretrained(folder, safe_serialization=True, max_shard_size="60KB")
    tiny_tokenizer().save_pretrained(folder)
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    return folder


def test_an_input_broken_after_upload_fails_in_one_attempt_with_a_user_fault(stack, sharded_llama):
    services = stack(job_max_attempts="3")
    client = services.start_api()
    submitted = []
    for breakage in BREAKAGES:
        job_id = submit(client, sharded_llama, [INT8])
        model_id = client.get(f"/v1/jobs/{job_id}").json()["model_id"]
        submitted.append((breakage.__name__, job_id, model_id))
    for breakage, (_, _, model_id) in zip(BREAKAGES, submitted, strict=True):
        breakage(Path(services.env["MCS_ARTIFACT_DIR"]) / "models" / model_id)
    services.start_worker()
    for name, job_id, model_id in submitted:
        job = wait_for(client, job_id, ended)
        assert (job["status"], job["attempts"]) == ("failed", 1), (name, job)
        assert job["error"]["code"] in USER_FAULTS, (name, job["error"])
        assert client.delete(f"/v1/models/{model_id}").status_code == 204, name


def test_a_queued_job_with_no_attempt_left_is_ended_not_stranded(stack, postgres, tmp_path):
    """The state an infrastructure fault on the last attempt used to leave: `queued` at the attempt cap, every later
    delivery ignored. A worker (its delivery or its sweeper) ends it `failed`, and its model can be deleted."""
    services = stack(job_max_attempts="2")
    client = services.start_api()
    job_id = submit(client, save_model_folder(tiny_llama(), tmp_path / "llama"), [INT8])
    with psycopg.connect(postgres.url.replace("+psycopg", "")) as conn:
        conn.execute("UPDATE jobs SET attempts = 2 WHERE id = %s", (job_id,))
    services.start_worker()
    job = wait_for(client, job_id, ended)
    assert (job["status"], job["error"]["code"], job["attempts"]) == ("failed", "unavailable", 2), job
    assert client.delete(f"/v1/models/{job['model_id']}").status_code == 204


def test_a_job_submitted_while_the_broker_is_down_is_503_and_nothing_is_queued(stack, redis_server, tmp_path):
    services = stack()
    client = services.start_api()
    folder = save_model_folder(tiny_llama(), tmp_path / "llama")
    model = client.post("/v1/models", files={"file": ("m.zip", zip_folder(folder), "application/zip")}).json()
    body = {"model_id": model["id"], "steps": [INT8]}
    jobs_before = client.get("/v1/jobs").json()["total"]  # the module's other tests share the tenant
    redis_server.stop()
    try:
        for key in (None, "submit-once"):
            refused = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key} if key else {})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "unavailable", refused.text
            assert refused.headers["Retry-After"]
        assert client.get("/v1/jobs").json()["total"] == jobs_before
    finally:
        redis_server.start(lambda: httpx.get(f"{client.base_url}/readyz").status_code == 200)
    accepted = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "submit-once"})
    assert accepted.status_code == 202, accepted.text
    services.start_worker()
    job = wait_for(client, accepted.json()["id"], ended)
    assert (job["status"], job["attempts"], len(job["artifacts"])) == ("succeeded", 1, 1), job

