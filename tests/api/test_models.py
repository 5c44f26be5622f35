import io
import tarfile
import zipfile
from pathlib import Path

from fastapi.testclient import TestClient

from core.service.settings import get_settings
from tests.fixtures.api import zip_folder


def stored_model_dirs() -> list[Path]:
    root = get_settings().artifact_dir / "models"
    return sorted(root.iterdir()) if root.exists() else []


def scratch_leftovers() -> list[Path]:
    scratch = get_settings().work_dir
    return sorted(scratch.iterdir()) if scratch.exists() else []


def post_archive(client: TestClient, auth: dict, payload: bytes, filename: str = "m.zip"):
    return client.post("/v1/models", files={"file": (filename, payload, "application/octet-stream")}, headers=auth)


def test_upload_returns_the_model_and_stores_it(client, auth, upload, bert_folder):
    model = upload()
    assert model["id"].startswith("mdl_")
    assert model["architecture"] == "BertModel"
    assert model["model_type"] == "bert"
    assert model["num_parameters"] > 10_000
    assert model["size_bytes"] == (bert_folder / "model.safetensors").stat().st_size
    assert len(model["sha256"]) == 64
    stored = get_settings().artifact_dir / "models" / model["id"]
    assert (stored / "config.json").is_file()
    assert client.get(f"/v1/models/{model['id']}", headers=auth).json() == model


def test_upload_accepts_tar_gz(client, auth, bert_folder):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for file in bert_folder.iterdir():
            tf.add(file, arcname=file.name)
    response = post_archive(client, auth, buffer.getvalue(), "m.tar.gz")
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "m"


def test_list_paginates_and_delete_removes_files(client, auth, upload):
    first, second = upload(name="one"), upload(name="two")
    page = client.get("/v1/models?page_size=1", headers=auth).json()
    assert page["total"] == 2 and len(page["items"]) == 1 and page["items"][0]["id"] == second["id"]
    assert client.delete(f"/v1/models/{first['id']}", headers=auth).status_code == 204
    assert client.get(f"/v1/models/{first['id']}", headers=auth).status_code == 404
    assert [p.name for p in stored_model_dirs()] == [second["id"]]


def test_not_an_archive_is_400_and_leaves_nothing(client, auth):
    response = post_archive(client, auth, b"this is not an archive at all")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"
    assert "not a .zip or .tar.gz" in response.json()["error"]["message"]
    assert stored_model_dirs() == [] and scratch_leftovers() == []


def test_path_traversal_member_is_refused(client, auth, bert_folder):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.write(bert_folder / "config.json", "config.json")
        zf.writestr("../../evil.py", "print('pwned')")
    response = post_archive(client, auth, buffer.getvalue())
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "unsafe_input"
    assert "../../evil.py" in response.json()["error"]["message"]
    assert stored_model_dirs() == [] and scratch_leftovers() == []


def test_symlink_member_is_refused(client, auth, bert_folder):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        tf.add(bert_folder / "config.json", arcname="config.json")
        link = tarfile.TarInfo("model.safetensors")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    response = post_archive(client, auth, buffer.getvalue(), "m.tar.gz")
    assert response.status_code == 400
    assert "link" in response.json()["error"]["message"]


def test_pickle_only_folder_is_refused_without_unpickling(client, auth, bert_folder, tmp_path):
    marker = tmp_path / "pwned"
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."  # a pickle that runs a command
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.write(bert_folder / "config.json", "config.json")
        zf.writestr("pytorch_model.bin", payload)
    response = post_archive(client, auth, buffer.getvalue())
    assert response.status_code == 400
    assert "pytorch_model.bin" in response.json()["error"]["message"]
    assert "safetensors" in response.json()["error"]["message"]
    assert not marker.exists()
    assert stored_model_dirs() == []


def test_missing_config_is_422(client, auth, bert_folder):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.write(bert_folder / "model.safetensors", "model.safetensors")
    response = post_archive(client, auth, buffer.getvalue())
    assert response.status_code == 422
    assert "config.json is missing" in response.json()["error"]["message"]


def test_unknown_model_type_is_422(client, auth, bert_folder, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "../../etc/passwd"}')
    (tmp_path / "model.safetensors").write_bytes((bert_folder / "model.safetensors").read_bytes())
    response = post_archive(client, auth, zip_folder(tmp_path))
    assert response.status_code == 422
    assert "model_type" in response.json()["error"]["message"]


def test_upload_over_the_size_limit_is_413(client, auth):
    limit = get_settings().max_upload_bytes
    response = client.post(
        "/v1/models", content=b"x", headers={**auth, "Content-Length": str(limit * 2),
                                             "Content-Type": "multipart/form-data; boundary=x"}
    )
    assert response.status_code == 413
    assert f"{limit + 64 * 1024:,}" in response.json()["error"]["message"]


def test_missing_file_field_is_422_naming_it(client, auth):
    response = client.post("/v1/models", data={"name": "x"}, headers=auth)
    assert response.status_code == 422
    assert any(p["field"] == "body.file" for p in response.json()["error"]["details"])
