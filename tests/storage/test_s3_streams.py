"""Datasets stream into the bucket (`put_stream`): multipart past one part, one part in memory, no scratch copy; a
line refused late leaves no object and no multipart upload behind."""

import json

import pytest

from core.errors import InvalidRequest
from core.service.settings import get_settings
from core.service.storage import get_store
from tests.fixtures.api import leftovers
from tests.storage.helpers import MiB, object_keys


def multipart_uploads(store) -> list[str]:
    listed = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=f"{store.prefix}/").get("Uploads", [])
    return [item["Key"] for item in listed]


def test_put_stream_is_one_put_or_a_multipart_upload_and_nothing_on_failure(s3_store):
    assert s3_store.put_stream("small", iter([b"a" * 10, b"b" * 10])) == 20
    big = [bytes([i]) * MiB for i in range(12)]  # 12 MiB: two 5 MiB parts and a last one
    assert s3_store.put_stream("big", iter(big)) == 12 * MiB
    assert b"".join(s3_store.read_range("big", 0, 12 * MiB - 1)) == b"".join(big)

    def failing():
        yield from big
        raise InvalidRequest("refused at the end")

    with pytest.raises(InvalidRequest):
        s3_store.put_stream("failed", failing())
    assert object_keys(s3_store) == ["big", "small"] and multipart_uploads(s3_store) == []


@pytest.fixture()
def small_parts(use_s3, monkeypatch):
    monkeypatch.setenv("MCS_S3_MULTIPART_CHUNK_BYTES", str(5 * MiB))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_a_dataset_over_one_part_streams_into_the_bucket(client, auth, small_parts):
    lines = [f"sample {i:07d} " + "x" * 100 for i in range(60_000)]  # 6.8 MB of text
    body = ("\n".join(lines) + "\n").encode()
    response = client.post("/v1/datasets", files={"file": ("d.txt", body, "text/plain")}, headers=auth)
    assert response.status_code == 201, response.text
    assert response.json()["num_samples"] == 60_000 and response.json()["size_bytes"] == len(body)
    store = get_store()
    stored = b"".join(store.read_range(f"datasets/{response.json()['id']}/data.jsonl", 0, 10 * MiB))
    assert [json.loads(line)["text"] for line in stored.splitlines()] == lines
    assert leftovers() == []  # no scratch copy on the API host


def test_a_bad_line_after_several_parts_stores_nothing(client, auth, small_parts):
    body = ("\n".join("y" * 200 for _ in range(40_000)) + "\n" + '{"text": 1}\n').encode()
    response = client.post("/v1/datasets", files={"file": ("d.jsonl", body, "text/plain")}, headers=auth,
                           data={"format": "text"})
    assert response.status_code == 201  # as text, the JSON-looking line is just text
    response = client.post("/v1/datasets", files={"file": ("d.txt", body + b"\xff\xfe\n", "text/plain")},
                           headers=auth)
    assert response.status_code == 400 and "not valid UTF-8" in response.json()["error"]["message"], response.text
    store = get_store()
    assert len(object_keys(store, "datasets/")) == 1 and multipart_uploads(store) == []
