"""POST /v1/models/import from hf://: the hub cache layout on local disk (refs, snapshots symlinked into blobs), read
offline; nothing is downloaded from a hub. The s3:// imports are in tests/storage/test_s3_imports.py."""

import hashlib
from pathlib import Path

import pytest

from core.service.chunked_uploads import manifest_sha256
from core.service.settings import get_settings
from tests.api.test_uploads import manifest
from tests.models import save_model_folder, tiny_bert

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


@pytest.fixture()
def mirror(tmp_path, bert_folder, monkeypatch):
    root = hub_cache(tmp_path / "hub", "acme/tiny-bert", bert_folder)
    monkeypatch.setenv("MCS_HF_MIRROR_DIR", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    get_settings.cache_clear()
    yield root
    get_settings.cache_clear()


def test_an_hf_model_in_the_local_cache_is_imported_and_records_its_commit(client, auth, mirror, bert_folder):
    response = client.post("/v1/models/import", json={"source": "hf://acme/tiny-bert"}, headers=auth)
    assert response.status_code == 201, response.text
    model = response.json()
    assert model["name"] == f"hf://acme/tiny-bert@{COMMIT}" and model["architecture"] == "BertModel"
    assert model["sha256"] == manifest_sha256(manifest(bert_folder))  # README.md left out
    pinned = client.post("/v1/models/import", json={"source": f"hf://acme/tiny-bert@{COMMIT}", "name": "pinned"},
                         headers=auth)
    assert pinned.status_code == 201 and pinned.json()["sha256"] == model["sha256"], pinned.text
    assert (mirror / "models--acme--tiny-bert" / "snapshots" / COMMIT / "model.safetensors").is_symlink()  # untouched


@pytest.mark.parametrize("source", ["hf://acme/not-cached", "hf://acme/tiny-bert@v2", "hf://acme/a..b"])
def test_what_is_not_in_the_cache_is_a_404_that_says_nothing_is_downloaded(client, auth, mirror, source):
    response = client.post("/v1/models/import", json={"source": source}, headers=auth)
    assert response.status_code == 404, response.text
    assert "never downloads from the Hub" in response.json()["error"]["message"]


@pytest.mark.parametrize("source", ["hf://../etc", "hf://acme/tiny-bert@a/b", "ftp://x/y", "hf://acme", ""])
def test_malformed_sources_are_refused(client, auth, mirror, source):
    response = client.post("/v1/models/import", json={"source": source}, headers=auth)
    assert response.status_code == 422 and response.json()["error"]["details"][0]["field"].endswith("source"), \
        response.text


def test_a_cached_folder_that_is_not_a_model_is_refused_like_an_upload(client, auth, tmp_path, monkeypatch):
    folder = save_model_folder(tiny_bert(), tmp_path / "bert")
    (folder / "config.json").write_text("{}")
    monkeypatch.setenv("MCS_HF_MIRROR_DIR", str(hub_cache(tmp_path / "hub", "acme/broken", folder)))
    get_settings.cache_clear()
    response = client.post("/v1/models/import", json={"source": "hf://acme/broken"}, headers=auth)
    get_settings.cache_clear()
    assert response.status_code in (400, 422) and response.json()["error"]["code"] in ("unsupported_model",
                                                                                       "unsafe_input"), response.text
    assert client.get("/v1/models", headers=auth).json()["items"] == []
