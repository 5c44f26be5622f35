import io
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from core.db.repositories import Tenants
from core.db.session import session_scope
from core.settings import get_settings
from tests.models import save_model_folder, tiny_bert


@pytest.fixture()
def unlimited_app(db: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FastAPI]:
    """The real app with the rate limit off, for tests that send hundreds of requests with one key."""
    from api.main import create_app

    monkeypatch.setenv("MCS_RATE_LIMIT_PER_MINUTE", "0")
    get_settings.cache_clear()
    yield create_app()
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.fixture()
def client(db: str) -> Iterator[TestClient]:
    from api.main import app

    with TestClient(app) as test_client:
        yield test_client


def api_key(tenant: str) -> str:
    with session_scope() as session:
        tenants = Tenants(session)
        return tenants.create_api_key(tenants.get_or_create(tenant))


@pytest.fixture()
def auth(db: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key('alice')}"}


@pytest.fixture()
def other_auth(db: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key('mallory')}"}


@pytest.fixture(scope="session")
def bert_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model_folder(tiny_bert(), tmp_path_factory.mktemp("bert"))


def zip_folder(folder: Path, prefix: str = "model/") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for file in sorted(folder.iterdir()):
            zf.write(file, prefix + file.name)
    return buffer.getvalue()


@pytest.fixture()
def upload(client: TestClient, auth: dict[str, str], bert_folder: Path) -> Callable[..., dict]:
    def do_upload(headers: dict[str, str] | None = None, name: str = "tiny-bert") -> dict:
        files = {"file": ("tiny-bert.zip", zip_folder(bert_folder), "application/zip")}
        response = client.post("/v1/models", files=files, data={"name": name}, headers=headers or auth)
        assert response.status_code == 201, response.text
        return response.json()

    return do_upload
