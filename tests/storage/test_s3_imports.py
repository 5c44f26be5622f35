"""POST /v1/models with {"source": "s3://..."}: a source bucket on moto's server, read with the request's keys; only
buckets the operator lists, and (the webhook rule) no endpoint on a private address unless MCS_IMPORT_ALLOW_PRIVATE.
What needs no reading of the bucket is refused by the API; the rest fails the import on the worker (run here)."""

import uuid
from collections.abc import Iterator

import pytest

from core.service.chunked_uploads import manifest_sha256
from core.service.settings import get_settings
from tests.api.test_imports import imported
from tests.api.test_uploads import manifest
from tests.storage.helpers import AWS_ENV


@pytest.fixture(scope="module")
def source_bucket(s3_endpoint, aws_env, bert_folder) -> Iterator[str]:
    import boto3

    client, bucket = boto3.client("s3", endpoint_url=s3_endpoint), f"mcs-src-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    for file in bert_folder.iterdir():
        client.upload_file(str(file), bucket, f"models/bert/{file.name}")
    client.put_object(Bucket=bucket, Key="models/bert/extra/model.safetensors", Body=b"deeper: not taken")
    yield bucket
    for item in client.list_objects_v2(Bucket=bucket).get("Contents", []):
        client.delete_object(Bucket=bucket, Key=item["Key"])
    client.delete_bucket(Bucket=bucket)


@pytest.fixture()
def importing(source_bucket, monkeypatch) -> Iterator[str]:
    monkeypatch.setenv("MCS_IMPORT_S3_BUCKETS", f"other, {source_bucket}")
    get_settings.cache_clear()
    yield source_bucket
    get_settings.cache_clear()


def body(bucket: str, endpoint: str, prefix: str = "models/bert", **extra) -> dict:
    keys = {"access_key_id": AWS_ENV["AWS_ACCESS_KEY_ID"], "secret_access_key": AWS_ENV["AWS_SECRET_ACCESS_KEY"]}
    return {"source": f"s3://{bucket}/{prefix}", "s3": {"endpoint_url": endpoint, **keys, **extra}}


@pytest.fixture()
def private_allowed(importing, monkeypatch):
    monkeypatch.setenv("MCS_IMPORT_ALLOW_PRIVATE", "true")
    get_settings.cache_clear()
    yield importing
    get_settings.cache_clear()


def test_a_model_in_an_allowed_bucket_is_imported(client, auth, private_allowed, s3_endpoint, bert_folder):
    model = imported(client, auth, body(private_allowed, s3_endpoint))
    assert model["status"] == "ready" and model["architecture"] == "BertModel", model
    assert model["name"] == model["source"] == f"s3://{private_allowed}/models/bert/"
    assert model["sha256"] == manifest_sha256(manifest(bert_folder))
    assert model["progress"]["bytes_done"] == model["progress"]["bytes_total"] > 0


def test_a_bucket_not_listed_is_forbidden(client, auth, importing, s3_endpoint):
    response = client.post("/v1/models", json=body("somebody-elses", s3_endpoint), headers=auth)
    assert response.status_code == 403 and "MCS_IMPORT_S3_BUCKETS" in response.json()["error"]["message"]


def test_an_endpoint_on_a_private_address_is_refused_unless_allowed(client, auth, importing, s3_endpoint):
    response = client.post("/v1/models", json=body(importing, s3_endpoint), headers=auth)
    assert response.status_code == 422 and response.json()["error"]["code"] == "unsafe_url", response.text
    assert "MCS_IMPORT_ALLOW_PRIVATE" in response.json()["error"]["message"]


def test_without_keys_or_a_profile_the_request_is_refused(client, auth, private_allowed, s3_endpoint):
    request = {"source": f"s3://{private_allowed}/models/bert", "s3": {"endpoint_url": s3_endpoint}}
    response = client.post("/v1/models", json=request, headers=auth)
    assert response.status_code == 400 and "MCS_IMPORT_S3_PROFILE" in response.json()["error"]["message"]


def test_a_prefix_without_model_files_fails_the_import(client, auth, private_allowed, s3_endpoint):
    model = imported(client, auth, body(private_allowed, s3_endpoint, "nothing/here"))
    assert model["status"] == "failed" and model["error"]["code"] == "not_found", model
