"""Chunked, resumable uploads of a model folder: manifest, PUT per file (resumed with Content-Range), complete."""

import hashlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from core.service import chunked_uploads
from core.service.chunked_uploads import manifest_sha256
from tests.fixtures.api import leftovers
from tests.models import tiny_bert


def manifest(folder: Path) -> list[dict]:
    return [{"path": f.name, "size": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
            for f in sorted(folder.iterdir())]


def start(client: TestClient, auth: dict, folder: Path, name: str | None = "chunked") -> dict:
    response = client.post("/v1/uploads", json={"name": name, "files": manifest(folder)}, headers=auth)
    assert response.status_code == 201, response.text
    return response.json()


def put(client: TestClient, auth: dict, upload_id: str, name: str, body: bytes, content_range: str | None = None):
    headers = {**auth, "Content-Type": "application/octet-stream"}
    if content_range:
        headers["Content-Range"] = content_range
    return client.put(f"/v1/uploads/{upload_id}/files/{name}", content=body, headers=headers)


def send_folder(client: TestClient, auth: dict, upload_id: str, folder: Path) -> None:
    for file in sorted(folder.iterdir()):
        response = put(client, auth, upload_id, file.name, file.read_bytes())
        assert response.status_code == 200 and response.json()["complete"], response.text


@pytest.fixture(scope="session")
def sharded_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sharded")
    tiny_bert().save_pretrained(folder, safe_serialization=True, max_shard_size="60KB")
    return folder


def test_create_shows_an_open_upload_with_nothing_received(client, auth, bert_folder):
    upload = start(client, auth, bert_folder)
    assert upload["id"].startswith("upl_") and upload["status"] == "open" and upload["name"] == "chunked"
    assert upload["received_bytes"] == 0 and upload["total_bytes"] == sum(f["size"] for f in manifest(bert_folder))
    assert {f["path"] for f in upload["files"]} == {"config.json", "model.safetensors"}
    assert upload["expires_at"] > upload["created_at"]


def test_upload_file_by_file_then_complete_is_a_model(client, auth, bert_folder):
    upload = start(client, auth, bert_folder)
    send_folder(client, auth, upload["id"], bert_folder)
    response = client.post(f"/v1/uploads/{upload['id']}/complete", headers=auth)
    assert response.status_code == 201, response.text
    model = response.json()
    assert model["id"].startswith("mdl_") and model["name"] == "chunked" and model["architecture"] == "BertModel"
    assert model["sha256"] == manifest_sha256(manifest(bert_folder))
    assert client.get(f"/v1/models/{model['id']}", headers=auth).status_code == 200
    assert client.get(f"/v1/uploads/{upload['id']}", headers=auth).status_code == 404
    assert [p.name for p in leftovers()] == [model["id"]]  # the stored model; no staging left


def test_a_dropped_upload_resumes_at_the_received_offset(client, auth, bert_folder):
    upload = start(client, auth, bert_folder)
    weights = (bert_folder / "model.safetensors").read_bytes()
    half, size = len(weights) // 2, len(weights)
    response = put(client, auth, upload["id"], "model.safetensors", weights[:half], f"bytes 0-{half - 1}/{size}")
    assert response.json() == {**response.json(), "received": half, "complete": False}
    progress = client.get(f"/v1/uploads/{upload['id']}", headers=auth).json()
    assert {f["path"]: f["received"] for f in progress["files"]}["model.safetensors"] == half
    response = put(client, auth, upload["id"], "model.safetensors", weights[half:], f"bytes {half}-{size - 1}/{size}")
    assert response.status_code == 200 and response.json()["complete"], response.text
    put(client, auth, upload["id"], "config.json", (bert_folder / "config.json").read_bytes())
    assert client.post(f"/v1/uploads/{upload['id']}/complete", headers=auth).status_code == 201


def test_a_sharded_folder_is_first_class(client, auth, sharded_folder):
    assert (sharded_folder / "model.safetensors.index.json").is_file()
    upload = start(client, auth, sharded_folder, name=None)
    send_folder(client, auth, upload["id"], sharded_folder)
    response = client.post(f"/v1/uploads/{upload['id']}/complete", headers=auth)
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "model" and response.json()["num_parameters"] > 0


def test_delete_aborts_and_removes_the_staging(client, auth, bert_folder):
    upload = start(client, auth, bert_folder)
    put(client, auth, upload["id"], "config.json", (bert_folder / "config.json").read_bytes())
    assert leftovers()
    assert client.delete(f"/v1/uploads/{upload['id']}", headers=auth).status_code == 204
    assert client.get(f"/v1/uploads/{upload['id']}", headers=auth).status_code == 404
    assert leftovers() == []


@pytest.mark.parametrize("same_process", [True, False], ids=["hash continued", "hash rebuilt from the file"])
def test_a_file_sent_in_several_puts_is_hashed_once_or_rebuilt(client, auth, bert_folder, monkeypatch, same_process):
    """The next PUT of a file continues the hash this process kept; one served elsewhere (no kept hash) re-reads
    the prefix once. Both end with the file checked against the manifest."""
    upload = start(client, auth, bert_folder)
    weights = (bert_folder / "model.safetensors").read_bytes()
    cuts = [0, len(weights) // 3, 2 * len(weights) // 3, len(weights)]
    prefix_reads: list[int] = []
    hash_prefix = chunked_uploads._Writer.hash_prefix

    def counting(writer) -> None:
        if not writer.hashed:
            prefix_reads.append(writer.received)
        hash_prefix(writer)

    monkeypatch.setattr(chunked_uploads._Writer, "hash_prefix", counting)
    for start_at, end in zip(cuts, cuts[1:], strict=False):
        if not same_process:
            chunked_uploads._DIGESTS.clear()
        response = put(client, auth, upload["id"], "model.safetensors", weights[start_at:end],
                       f"bytes {start_at}-{end - 1}/{len(weights)}")
        assert response.status_code == 200, response.text
    assert response.json()["complete"]
    assert prefix_reads == ([0] if same_process else cuts[:3])


def test_a_kept_hash_never_outlives_a_refused_body(client, auth, bert_folder):
    upload = start(client, auth, bert_folder)
    weights = (bert_folder / "model.safetensors").read_bytes()
    half, size = len(weights) // 2, len(weights)
    put(client, auth, upload["id"], "model.safetensors", weights[:half], f"bytes 0-{half - 1}/{size}")
    too_long = put(client, auth, upload["id"], "model.safetensors", weights[half:] + b"x" * 10,
                   f"bytes {half}-{size - 1}/{size}")
    assert too_long.status_code == 413
    response = put(client, auth, upload["id"], "model.safetensors", weights[half:], f"bytes {half}-{size - 1}/{size}")
    assert response.status_code == 200 and response.json()["complete"], response.text
