"""The API on an S3 store (moto's server): models, datasets and chunked uploads land in the bucket, downloads stream
from it with the same Range / ETag semantics as from local disk, or answer 302 to a presigned URL when
MCS_ARTIFACT_REDIRECT is on. The whole download suite of tests/api/test_artifacts.py runs here again on S3."""

import json

import httpx
import pytest

from core.service.settings import get_settings
from core.service.storage import get_store
from tests.api.test_artifacts import *  # noqa: F403 (the local-disk download tests, run again on S3)
from tests.api.test_artifacts import ETAG, PAYLOAD
from tests.api.test_uploads import send_folder, start
from tests.fixtures.api import leftovers
from tests.storage.helpers import object_keys

pytestmark = pytest.mark.usefixtures("use_s3")


@pytest.fixture()
def redirecting(use_s3, monkeypatch):
    monkeypatch.setenv("MCS_ARTIFACT_REDIRECT", "true")
    monkeypatch.setenv("MCS_ARTIFACT_REDIRECT_TTL_S", "120")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_uploaded_models_and_datasets_live_in_the_bucket(client, auth, upload):
    model = upload()
    store = get_store()
    keys = object_keys(store, f"models/{model['id']}/")
    assert f"models/{model['id']}/tree.json" in keys and any(k.endswith("/model.safetensors") for k in keys)
    assert leftovers() == []  # no local copy of the model, no scratch left on the API host
    dataset = client.post("/v1/datasets", files={"file": ("d.txt", b"one\ntwo\n", "text/plain")}, headers=auth)
    assert dataset.status_code == 201, dataset.text
    key = f"datasets/{dataset.json()['id']}/data.jsonl"
    body = store.client.get_object(Bucket=store.bucket, Key=store.object_key(key))["Body"].read()
    assert [json.loads(line)["text"] for line in body.splitlines()] == ["one", "two"]

    assert client.delete(f"/v1/models/{model['id']}", headers=auth).status_code == 204
    assert client.delete(f"/v1/datasets/{dataset.json()['id']}", headers=auth).status_code == 204
    assert object_keys(store) == []


def test_a_chunked_upload_completes_into_the_bucket(client, auth, bert_folder):
    upload = start(client, auth, bert_folder)
    send_folder(client, auth, upload["id"], bert_folder)
    response = client.post(f"/v1/uploads/{upload['id']}/complete", headers=auth)
    assert response.status_code == 201, response.text
    fetched = get_store().local_tree(f"models/{response.json()['id']}", get_settings().work_dir / "check")
    assert {p.name: p.read_bytes() for p in fetched.iterdir()} == {p.name: p.read_bytes()
                                                                    for p in bert_folder.iterdir()}


def test_redirect_answers_302_to_a_presigned_url_that_serves_the_artifact(client, auth, artifact, redirecting):
    response = client.get(f"/v1/artifacts/{artifact['id']}", headers=auth, follow_redirects=False)
    assert response.status_code == 302
    assert response.headers["ETag"] == ETAG and response.headers["Cache-Control"] == "no-store"
    location = response.headers["Location"]
    assert "X-Amz-Signature=" in location and "X-Amz-Expires=120" in location
    assert "Bearer" not in location and auth["Authorization"].split()[1] not in location
    direct = httpx.get(location)  # straight from the store, without the API key
    assert direct.status_code == 200 and direct.content == PAYLOAD
    assert "m-compressed.zip" in direct.headers["content-disposition"]
    assert direct.headers["content-type"] == "application/zip"
    resumed = httpx.get(location, headers={"Range": "bytes=10-19"})
    assert resumed.status_code == 206 and resumed.content == PAYLOAD[10:20]


def test_redirect_keeps_conditional_requests_head_and_tenancy(client, auth, other_auth, artifact, redirecting):
    url = f"/v1/artifacts/{artifact['id']}"
    assert client.get(url, headers={**auth, "If-None-Match": ETAG}).status_code == 304
    assert client.get(url, headers={**auth, "If-Match": '"other"'}).status_code == 412
    head = client.head(url, headers=auth)
    assert head.status_code == 200 and head.headers["Content-Length"] == str(len(PAYLOAD))
    assert client.get(url, headers=other_auth, follow_redirects=False).status_code == 404


def test_the_store_being_down_is_a_503(client, auth, artifact, monkeypatch):
    from botocore.exceptions import EndpointConnectionError

    def unreachable(**_):
        raise EndpointConnectionError(endpoint_url="http://s3.invalid")

    monkeypatch.setattr(get_store().client, "head_object", unreachable)
    response = client.get(f"/v1/artifacts/{artifact['id']}", headers=auth)
    assert response.status_code == 503 and response.json()["error"]["code"] == "unavailable"
