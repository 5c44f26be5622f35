"""Hostile chunked uploads: unsafe names, oversize manifests and bodies, wrong offsets, checksum mismatches, other
tenants' ids, early completes and invalid models. Each is a clear 4xx in the one envelope and leaves nothing behind."""

import hashlib
import json
import os
import shutil
import socket
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file
from sqlalchemy import func, select, update

from core.service.chunked_uploads import staging_dir
from core.service.db.models import Upload, utcnow
from core.service.db.session import session_scope
from core.service.scratch import remove_stale_scratch
from core.service.settings import get_settings
from tests.api.test_uploads import put, send_folder, start
from tests.fixtures.api import leftovers, zip_folder
from tests.safety.test_requests import small_server  # noqa: F401 (a fixture: a real uvicorn process)

pytestmark = pytest.mark.safety
GiB = 1024**3
SHA = "0" * 64


def error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.mark.parametrize("name", ["../config.json", "a/b.safetensors", "/etc/passwd", "..", "a\\b", "C:x",
                                  "a\x00b", "tab\there", "x" * 256])
def test_unsafe_names_in_the_manifest_are_refused(client, auth, name):
    files = [{"path": "config.json", "size": 2, "sha256": SHA}, {"path": "model.safetensors", "size": 2, "sha256": SHA},
             {"path": name, "size": 1, "sha256": SHA}]
    response = client.post("/v1/uploads", json={"files": files}, headers=auth)
    assert response.status_code in (400, 422), response.text
    assert leftovers() == []


@pytest.mark.parametrize(("files", "status"), [
    ([{"path": "model.safetensors", "size": 1, "sha256": SHA}], 400),  # no config.json
    ([{"path": "config.json", "size": 1, "sha256": SHA}, {"path": "model.bin", "size": 1, "sha256": SHA}], 400),
    ([{"path": "config.json", "size": 1, "sha256": SHA}] * 2, 400),
    ([{"path": "config.json", "size": 1, "sha256": SHA}, {"path": "model.safetensors", "size": 161 * GiB,
                                                         "sha256": SHA}], 413),
    ([{"path": "config.json", "size": 1, "sha256": SHA}] + [{"path": f"m{i}.safetensors", "size": 100 * GiB,
                                                             "sha256": SHA} for i in range(2)], 413),
    ([{"path": "config.json", "size": -1, "sha256": SHA}], 422),
    ([{"path": "config.json", "size": 1, "sha256": "xyz"}], 422),
])
def test_bad_manifests(client, auth, files, status):
    error(client.post("/v1/uploads", json={"files": files}, headers=auth), status)
    assert leftovers() == []


def test_a_body_longer_than_declared_is_413_and_keeps_the_offset(client, auth, bert_folder):
    upload = start(client, auth, bert_folder)
    config = (bert_folder / "config.json").read_bytes()
    error(put(client, auth, upload["id"], "config.json", config + b"x"), 413)
    size = len(config)
    assert put(client, auth, upload["id"], "config.json", config[:10], f"bytes 0-9/{size}").json()["received"] == 10
    error(put(client, auth, upload["id"], "config.json", config[10:20], f"bytes 10-14/{size}"), 413)
    assert client.get(f"/v1/uploads/{upload['id']}", headers=auth).json()["received_bytes"] == 10


def test_a_wrong_offset_is_409_naming_the_offset_to_resume_at(client, auth, bert_folder):
    upload = start(client, auth, bert_folder)
    config = (bert_folder / "config.json").read_bytes()
    size = len(config)
    put(client, auth, upload["id"], "config.json", config[:10], f"bytes 0-9/{size}")
    for content_range in (None, f"bytes 5-14/{size}", f"bytes 20-29/{size}"):
        problem = error(put(client, auth, upload["id"], "config.json", config[:10], content_range), 409)
        assert problem["details"]["received"] == 10
    error(put(client, auth, upload["id"], "config.json", config[10:], f"bytes 10-{size}/{size + 1}"), 400)
    error(put(client, auth, upload["id"], "config.json", config[10:], "bytes=10-"), 400)
    assert put(client, auth, upload["id"], "config.json", config[10:], f"bytes 10-{size - 1}/{size}").json()["complete"]
    error(put(client, auth, upload["id"], "config.json", config), 409)  # complete files take no more bytes


def test_a_checksum_mismatch_is_422_and_resets_the_file(client, auth, bert_folder):
    upload = start(client, auth, bert_folder)
    config = bytearray((bert_folder / "config.json").read_bytes())
    config[0] ^= 1
    assert error(put(client, auth, upload["id"], "config.json", bytes(config)), 422)["code"] == "checksum_mismatch"
    files = client.get(f"/v1/uploads/{upload['id']}", headers=auth).json()["files"]
    assert {f["path"]: f["received"] for f in files}["config.json"] == 0


def test_unknown_files_and_other_tenants_uploads_are_404(client, auth, other_auth, bert_folder):
    upload = start(client, auth, bert_folder)
    upload_id = upload["id"]
    error(put(client, auth, upload_id, "other.safetensors", b"x"), 404)
    error(put(client, auth, upload_id, "..%2Fconfig.json", b"x"), 404)
    assert error(client.get(f"/v1/uploads/{upload_id}", headers=other_auth), 404)["code"] == "not_found"
    error(put(client, other_auth, upload_id, "config.json", (bert_folder / "config.json").read_bytes()), 404)
    error(client.post(f"/v1/uploads/{upload_id}/complete", headers=other_auth), 404)
    error(client.delete(f"/v1/uploads/{upload_id}", headers=other_auth), 404)
    assert client.get(f"/v1/uploads/{upload_id}", headers=auth).json()["received_bytes"] == 0


def test_completing_an_incomplete_upload_is_409_listing_the_missing_files(client, auth, bert_folder):
    upload = start(client, auth, bert_folder)
    put(client, auth, upload["id"], "config.json", (bert_folder / "config.json").read_bytes())
    problem = error(client.post(f"/v1/uploads/{upload['id']}/complete", headers=auth), 409)
    assert [f["path"] for f in problem["details"]["incomplete"]] == ["model.safetensors"]
    assert client.get(f"/v1/uploads/{upload['id']}", headers=auth).json()["status"] == "open"


def broken_folders(bert_folder: Path, tmp_path: Path) -> dict[str, Path]:
    garbage, missing, escaping = (tmp_path / name for name in ("garbage", "missing", "escaping"))
    for folder in (garbage, missing, escaping):
        shutil.copytree(bert_folder, folder)
    (garbage / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    tensors = load_file(bert_folder / "model.safetensors")
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, missing / "model.safetensors")
    config = json.loads((escaping / "config.json").read_text())
    (escaping / "config.json").write_text(json.dumps({**config, "tokenizer_file": "../../secret.json"}))
    return {"garbage": garbage, "missing": missing, "escaping": escaping}


@pytest.mark.parametrize("kind", ["garbage", "missing", "escaping"])
def test_an_invalid_model_is_refused_as_the_archive_path_refuses_it(client, auth, bert_folder, tmp_path, kind):
    folder = broken_folders(bert_folder, tmp_path)[kind]
    files = {"file": ("m.zip", zip_folder(folder), "application/zip")}
    archive = client.post("/v1/models", files=files, headers=auth)
    assert archive.status_code in (400, 422), archive.text
    upload = start(client, auth, folder)
    send_folder(client, auth, upload["id"], folder)
    chunked = client.post(f"/v1/uploads/{upload['id']}/complete", headers=auth)
    assert (chunked.status_code, chunked.json()["error"]["code"]) == (archive.status_code,
                                                                      archive.json()["error"]["code"])
    assert client.get(f"/v1/uploads/{upload['id']}", headers=auth).status_code == 404  # discarded
    assert leftovers() == [] and client.get("/v1/models", headers=auth).json()["total"] == 0


def test_a_deleted_upload_takes_no_more_bytes_nor_a_complete(client, auth, bert_folder):
    upload = start(client, auth, bert_folder)
    send_folder(client, auth, upload["id"], bert_folder)
    assert client.delete(f"/v1/uploads/{upload['id']}", headers=auth).status_code == 204
    error(put(client, auth, upload["id"], "config.json", b"{}"), 404)
    error(client.post(f"/v1/uploads/{upload['id']}/complete", headers=auth), 404)
    error(client.delete(f"/v1/uploads/{upload['id']}", headers=auth), 404)
    assert leftovers() == []


def test_file_bodies_are_not_held_to_the_json_cap_but_to_their_own(client, auth, db, monkeypatch):
    big = bytes(range(256)) * (12 * 1024)  # 3 MiB: over MCS_MAX_JSON_BYTES, written in 1 MiB pieces
    files = [{"path": "config.json", "size": 2, "sha256": SHA},
             {"path": "model.safetensors", "size": len(big), "sha256": hashlib.sha256(big).hexdigest()}]
    upload = client.post("/v1/uploads", json={"files": files}, headers=auth).json()
    assert put(client, auth, upload["id"], "model.safetensors", big).json()["complete"]
    from api.main import create_app

    monkeypatch.setenv("MCS_MAX_UPLOAD_FILE_BYTES", "1000")
    get_settings.cache_clear()
    try:
        with TestClient(create_app()) as small:
            problem = error(put(small, auth, upload["id"], "config.json", b"x" * 2000), 413)
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert "MCS_MAX_UPLOAD_FILE_BYTES" in problem["message"]


def test_expired_uploads_are_gone_and_their_staging_is_swept(client, auth, bert_folder):
    upload = start(client, auth, bert_folder)
    put(client, auth, upload["id"], "config.json", (bert_folder / "config.json").read_bytes())
    with session_scope() as session:
        session.execute(update(Upload).values(expires_at=utcnow() - timedelta(seconds=1)))
    error(client.get(f"/v1/uploads/{upload['id']}", headers=auth), 404)
    error(put(client, auth, upload["id"], "model.safetensors", b"x"), 404)
    settings = get_settings()
    old = time.time() - settings.upload_ttl_s - 1
    for path in [staging_dir(settings, upload["id"]), *staging_dir(settings, upload["id"]).iterdir()]:
        os.utime(path, (old, old))
    assert remove_stale_scratch(settings) == 1 and leftovers() == []


def test_a_new_upload_removes_the_tenants_expired_ones(client, auth, bert_folder):
    upload = start(client, auth, bert_folder)
    with session_scope() as session:
        session.execute(update(Upload).values(expires_at=utcnow() - timedelta(seconds=1)))
    fresh = start(client, auth, bert_folder)
    assert [p.name for p in leftovers()] == [f"chunked-{fresh['id']}"]
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Upload).where(Upload.id == upload["id"])) == 0


def test_a_dropped_connection_keeps_what_arrived_and_resumes(small_server, auth):  # noqa: F811 (the fixture)
    """A real uvicorn process: the client sends 3 MiB of a 4 MiB file and hangs up; the upload keeps what the
    server received and the rest is sent with Content-Range."""
    data = bytes(range(256)) * (16 * 1024)
    files = [{"path": "config.json", "size": 2, "sha256": SHA},
             {"path": "model.safetensors", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}]
    api = f"http://{small_server.address}/v1/uploads"
    upload = httpx.post(api, json={"files": files}, headers=auth).json()
    host, port = small_server.address.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"PUT /v1/uploads/{upload['id']}/files/model.safetensors HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: {auth['Authorization']}\r\nContent-Length: {len(data)}\r\n\r\n".encode())
        sock.sendall(data[:3 * 1024**2])
        time.sleep(0.5)
    received = 0
    for _ in range(50):  # the server notices the hang-up and writes what it buffered
        time.sleep(0.1)
        progress = httpx.get(f"{api}/{upload['id']}", headers=auth).json()
        received = {f["path"]: f["received"] for f in progress["files"]}["model.safetensors"]
        if received == 3 * 1024**2:
            break
    assert received == 3 * 1024**2
    rest = httpx.put(f"{api}/{upload['id']}/files/model.safetensors", content=data[received:],
                     headers={**auth, "Content-Range": f"bytes {received}-{len(data) - 1}/{len(data)}"})
    assert rest.status_code == 200 and rest.json()["complete"], rest.text
    assert httpx.delete(f"{api}/{upload['id']}", headers=auth).status_code == 204
