"""POST /v1/models with {"source": "hf://..."}: the hub cache layout on local disk (refs, snapshots symlinked into
blobs), read offline; nothing is downloaded from a hub. The API accepts the import (202, `importing`) and the import
task runs here as a worker runs it (a real worker runs one in tests/storage/test_s3_e2e.py). The s3:// imports are in
tests/storage/test_s3_imports.py."""

import hashlib
from pathlib import Path

import pytest

from core.service.chunked_uploads import manifest_sha256
from core.service.db.models import Model
from core.service.db.session import session_scope
from core.service.settings import get_settings
from tests.api.test_keys import bearer, key_with
from tests.api.test_quotas import set_quota
from tests.api.test_uploads import manifest
from tests.fixtures.api import leftovers
from tests.models import save_model_folder, tiny_bert
from worker.imports import import_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, repo: str, folder: Path, commit: str = COMMIT) -> Path:
    """`folder` as huggingface_hub caches a snapshot of `repo` at `commit` (branch main)."""
    cached = root / f"models--{repo.replace('/', '--')}"
    (cached / "refs").mkdir(parents=True)
    (cached / "refs" / "main").write_text(commit)
    snapshot = cached / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (cached / "blobs").mkdir(exist_ok=True)
    for file in folder.iterdir():
        blob = cached / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (snapshot / "README.md").write_text("not a model file: left out")
    return root


def tenant_of(model_id: str) -> str:
    with session_scope() as session:
        return session.get(Model, model_id).tenant_id


def imported(client, auth, request: dict, run: bool = True) -> dict:
    """POST the import, check it was accepted, run its task here as a worker does (unless not `run`); the model as
    GET shows it then."""
    response = client.post("/v1/models", json=request, headers=auth)
    assert response.status_code == 202, response.text
    model = response.json()
    assert model["status"] == "importing" and response.headers["location"] == f"/v1/models/{model['id']}", model
    if run:
        import_model(model["id"], tenant_of(model["id"]), request.get("s3"))
    shown = client.get(f"/v1/models/{model['id']}", headers=auth)
    assert shown.status_code == 200, shown.text
    return shown.json()


@pytest.fixture()
def mirror(tmp_path, bert_folder, monkeypatch):
    root = hub_cache(tmp_path / "hub", "acme/tiny-bert", bert_folder)
    monkeypatch.setenv("MCS_HF_MIRROR_DIR", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    get_settings.cache_clear()
    yield root
    get_settings.cache_clear()


def test_an_hf_model_in_the_local_cache_is_imported_and_records_its_commit(client, auth, mirror, bert_folder):
    model = imported(client, auth, {"source": "hf://acme/tiny-bert"})
    assert model["status"] == "ready" and model["error"] is None, model
    assert model["name"] == model["source"] == f"hf://acme/tiny-bert@{COMMIT}" and model["architecture"] == "BertModel"
    assert model["sha256"] == manifest_sha256(manifest(bert_folder))  # README.md left out
    weights = sum(f.stat().st_size for f in bert_folder.iterdir())
    assert model["progress"] == {"stage": "done", "bytes_done": weights, "bytes_total": weights}
    pinned = imported(client, auth, {"source": f"hf://acme/tiny-bert@{COMMIT}", "name": "pinned"})
    assert (pinned["name"], pinned["sha256"]) == ("pinned", model["sha256"]), pinned
    assert (mirror / "models--acme--tiny-bert" / "snapshots" / COMMIT / "model.safetensors").is_symlink()  # untouched


@pytest.mark.parametrize("source", ["hf://acme/not-cached", "hf://acme/tiny-bert@v2", "hf://acme/a..b"])
def test_what_is_not_in_the_cache_fails_the_import_saying_nothing_is_downloaded(client, auth, mirror, source):
    model = imported(client, auth, {"source": source})
    assert model["status"] == "failed" and model["error"]["code"] == "not_found", model
    assert "never downloads from the Hub" in model["error"]["message"]


@pytest.mark.parametrize("source", ["hf://../etc", "hf://acme/tiny-bert@a/b", "ftp://x/y", "hf://acme", ""])
def test_malformed_sources_are_refused(client, auth, mirror, source):
    response = client.post("/v1/models", json={"source": source}, headers=auth)
    assert response.status_code == 422 and response.json()["error"]["details"][0]["field"] == "body.source", \
        response.text


def test_a_cached_folder_that_is_not_a_model_fails_like_an_upload_and_stores_nothing(client, auth, tmp_path,
                                                                                      monkeypatch):
    folder = save_model_folder(tiny_bert(), tmp_path / "bert")
    (folder / "config.json").write_text("{}")
    monkeypatch.setenv("MCS_HF_MIRROR_DIR", str(hub_cache(tmp_path / "hub", "acme/broken", folder)))
    get_settings.cache_clear()
    model = imported(client, auth, {"source": "hf://acme/broken"})
    get_settings.cache_clear()
    assert model["status"] == "failed" and model["error"]["code"] in ("unsupported_model", "unsafe_input"), model
    assert leftovers() == []


def test_a_model_still_importing_takes_no_job_and_can_be_deleted(client, auth, mirror):
    model = imported(client, auth, {"source": "hf://acme/tiny-bert"}, run=False)
    tenant_id = tenant_of(model["id"])
    job = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [{"type": "quantize", "method": "rtn"}]},
                      headers=auth)
    assert job.status_code == 409 and "still importing" in job.json()["error"]["message"], job.text
    assert client.delete(f"/v1/models/{model['id']}", headers=auth).status_code == 204
    import_model(model["id"], tenant_id, None)  # the message arrives after the delete: nothing happens
    assert client.get(f"/v1/models/{model['id']}", headers=auth).status_code == 404 and leftovers() == []


def test_the_stored_bytes_quota_fails_an_import_before_anything_is_fetched(client, auth, mirror):
    set_quota("alice", stored_bytes=1000)
    model = imported(client, auth, {"source": "hf://acme/tiny-bert"})
    assert model["status"] == "failed" and model["error"]["code"] == "quota_exceeded", model
    assert model["progress"]["bytes_done"] == 0 and leftovers() == []


def test_a_read_key_cannot_import(client, mirror):
    response = client.post("/v1/models", json={"source": "hf://acme/tiny-bert"},
                           headers=bearer(key_with("alice", "read")))
    assert response.status_code == 403 and response.json()["error"]["code"] == "insufficient_scope", response.text
