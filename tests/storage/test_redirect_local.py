"""MCS_ARTIFACT_REDIRECT on the local store, which has no presigned URLs: the API streams the file as always."""

import pytest

from core.service.settings import get_settings
from tests.api.test_artifacts import PAYLOAD, artifact, stored_artifact  # noqa: F401 (fixtures)


@pytest.fixture()
def redirect_setting(monkeypatch):
    monkeypatch.setenv("MCS_ARTIFACT_REDIRECT", "true")
    get_settings.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()


def test_the_local_store_streams_even_with_redirects_on(client, auth, artifact, redirect_setting):  # noqa: F811
    response = client.get(f"/v1/artifacts/{artifact['id']}", headers=auth, follow_redirects=False)
    assert response.status_code == 200 and response.content == PAYLOAD
