"""S3ArtifactStore against a real S3 endpoint (moto's server): files, folders, ranges, multipart, deletes, errors and
presigned URLs, as the API and the workers use them."""

import json

import httpx
import pytest
from botocore.exceptions import ClientError
from pydantic import ValidationError

from cli.stack import free_port
from core.errors import NotFound, StorageFailed, Unavailable, UnsafeInput
from core.service.settings import Settings, get_settings
from core.service.storage import get_store
from core.service.storage.s3 import S3ArtifactStore, parse_s3_url
from tests.storage.helpers import MiB, object_keys, write_random


def test_put_file_then_size_range_and_download(s3_store, tmp_path):
    data = write_random(tmp_path / "a.zip", 300_000)
    s3_store.put_file("artifacts/j1/attempt-1/model.zip", tmp_path / "a.zip")
    key = "artifacts/j1/attempt-1/model.zip"
    assert s3_store.size(key) == len(data)
    assert b"".join(s3_store.read_range(key, 0, len(data) - 1)) == data
    assert b"".join(s3_store.read_range(key, 1000, 1999)) == data[1000:2000]
    chunks = list(s3_store.read_range(key, 5, 200_004, chunk_size=65536))
    assert b"".join(chunks) == data[5:200_005] and max(map(len, chunks)) <= 65536  # streamed, not one read
    copy = s3_store.local_file(key, tmp_path / "scratch" / "copy.zip")
    assert copy == tmp_path / "scratch" / "copy.zip" and copy.read_bytes() == data


def test_local_file_is_reused_while_the_object_is_unchanged(s3_store, tmp_path):
    write_random(tmp_path / "d.jsonl", 1000, seed=1)
    s3_store.put_file("datasets/d1/data.jsonl", tmp_path / "d.jsonl")
    target = s3_store.local_file("datasets/d1/data.jsonl", tmp_path / "w" / "d.jsonl")
    target.write_bytes(b"marked")  # a second call with the same ETag does not download again
    assert s3_store.local_file("datasets/d1/data.jsonl", target).read_bytes() == b"marked"
    fresh = write_random(tmp_path / "d.jsonl", 1000, seed=2)
    s3_store.put_file("datasets/d1/data.jsonl", tmp_path / "d.jsonl")
    assert s3_store.local_file("datasets/d1/data.jsonl", target).read_bytes() == fresh
    assert sorted(p.name for p in target.parent.iterdir()) == [".d.jsonl.etag", "d.jsonl"]  # no staging file left


def test_large_files_go_up_as_multipart_uploads(s3_store, tmp_path):
    data = write_random(tmp_path / "big.zip", 11 * MiB + 123)
    s3_store.put_file("artifacts/big/model.zip", tmp_path / "big.zip")
    head = s3_store.client.head_object(Bucket=s3_store.bucket, Key=s3_store.object_key("artifacts/big/model.zip"))
    assert head["ETag"].strip('"').endswith("-3")  # three parts of 5 MiB at most: a multipart upload
    assert s3_store.size("artifacts/big/model.zip") == len(data)
    boundary = 5 * MiB
    piece = b"".join(s3_store.read_range("artifacts/big/model.zip", boundary - 10, boundary + 9))
    assert piece == data[boundary - 10:boundary + 10]  # a range across two parts
    assert s3_store.local_file("artifacts/big/model.zip", tmp_path / "got.zip").read_bytes() == data


def test_put_tree_publishes_a_version_and_replaces_the_previous_one(s3_store, tmp_path):
    first = {"config.json": b'{"a": 1}', "model.safetensors": write_random(tmp_path / "w1", 6 * MiB),
             "sub/tokenizer.json": b"{}"}
    for name, data in first.items():
        (tmp_path / "m1" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "m1" / name).write_bytes(data)
    s3_store.put_tree("models/m1", tmp_path / "m1")
    assert not (tmp_path / "m1").exists()  # consumed, as the local store moves it
    keys = object_keys(s3_store, "models/m1/")
    manifest = json.loads(s3_store.client.get_object(Bucket=s3_store.bucket,
                                                     Key=s3_store.object_key("models/m1/tree.json"))["Body"].read())
    version = manifest["version"]
    assert keys == sorted([f"models/m1/{version}/{name}" for name in first] + ["models/m1/tree.json"])
    assert manifest["files"] == {name: len(data) for name, data in first.items()}

    fetched = s3_store.local_tree("models/m1", tmp_path / "job" / "input")
    assert {p.relative_to(fetched).as_posix(): p.read_bytes() for p in fetched.rglob("*") if p.is_file()} == first
    (fetched / "config.json").write_bytes(b"kept")  # fetched again for the same version: reused, not downloaded
    assert (s3_store.local_tree("models/m1", fetched) / "config.json").read_bytes() == b"kept"

    (tmp_path / "m2").mkdir()
    (tmp_path / "m2" / "config.json").write_bytes(b'{"b": 2}')
    s3_store.put_tree("models/m1", tmp_path / "m2")
    keys = object_keys(s3_store, "models/m1/")
    assert len(keys) == 2 and not any(version in key for key in keys)  # the old version's objects are gone
    again = s3_store.local_tree("models/m1", fetched)
    assert [p.name for p in again.iterdir()] == ["config.json"] and (again / "config.json").read_bytes() == b'{"b": 2}'
    assert sorted(p.name for p in again.parent.iterdir()) == [".input.version", "input"]


def test_a_failed_put_tree_leaves_nothing_under_the_key(s3_store, tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    write_random(tmp_path / "m" / "model.safetensors", 1000)

    def refuse(**_):
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "PutObject")

    monkeypatch.setattr(s3_store.client, "put_object", refuse)  # the manifest, written last, is refused
    with pytest.raises(StorageFailed, match="AccessDenied"):
        s3_store.put_tree("models/m", tmp_path / "m")
    assert object_keys(s3_store, "models/m/") == []
    assert (tmp_path / "m" / "model.safetensors").exists()  # not consumed: the caller's cleanup owns it
    with pytest.raises(NotFound):
        s3_store.local_tree("models/m", tmp_path / "input")


def test_delete_removes_files_and_trees_and_ignores_missing_keys(s3_store, tmp_path):
    write_random(tmp_path / "f", 10)
    s3_store.put_file("datasets/d/data.jsonl", tmp_path / "f")
    (tmp_path / "m").mkdir()
    write_random(tmp_path / "m" / "config.json", 10)
    s3_store.put_tree("models/m", tmp_path / "m")
    s3_store.delete("datasets/d/data.jsonl")
    s3_store.delete("models/m")
    s3_store.delete("models/never-stored")
    assert object_keys(s3_store) == []
    with pytest.raises(NotFound):
        s3_store.size("datasets/d/data.jsonl")
    with pytest.raises(NotFound):
        s3_store.local_file("datasets/d/data.jsonl", tmp_path / "x")


@pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/./b", "a\\b", ""])
def test_keys_stay_inside_the_prefix(s3_store, key):
    with pytest.raises(UnsafeInput):
        s3_store.object_key(key)


def test_presigned_url_serves_the_bytes_ranges_and_headers(s3_store, tmp_path):
    data = write_random(tmp_path / "a.zip", 50_000)
    s3_store.put_file("artifacts/j/model.zip", tmp_path / "a.zip")
    disposition = "attachment; filename=\"m.zip\"; filename*=UTF-8''m.zip"
    url = s3_store.presigned_url("artifacts/j/model.zip", 60, disposition, "application/zip")
    assert url is not None and "X-Amz-Expires=60" in url and "X-Amz-Signature=" in url
    response = httpx.get(url)
    assert response.status_code == 200 and response.content == data
    assert response.headers["content-disposition"] == disposition
    assert response.headers["content-type"] == "application/zip"
    partial = httpx.get(url, headers={"Range": "bytes=100-199"})
    assert partial.status_code == 206 and partial.content == data[100:200]


def test_an_unreachable_store_is_unavailable(aws_env):
    import boto3
    from botocore.config import Config

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = S3ArtifactStore("bucket", "", endpoint)
    store.client = boto3.client("s3", endpoint_url=endpoint, config=Config(retries={"total_max_attempts": 1}))
    with pytest.raises(Unavailable, match="unreachable"):  # 503 in the API, a retry in the worker
        store.size("artifacts/x")


def test_missing_credentials_are_named(s3_endpoint, s3_bucket, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = S3ArtifactStore(s3_bucket, "p", s3_endpoint)
    with pytest.raises(StorageFailed, match="credentials"):
        store.size("artifacts/x")


def test_the_setting_selects_the_store(s3_endpoint, s3_bucket, monkeypatch):
    monkeypatch.setenv("MCS_ARTIFACT_URL", f"s3://{s3_bucket}/some/prefix/")
    monkeypatch.setenv("MCS_S3_ENDPOINT_URL", s3_endpoint)
    get_settings.cache_clear()
    try:
        store = get_store()
        assert isinstance(store, S3ArtifactStore)
        assert (store.bucket, store.prefix) == (s3_bucket, "some/prefix")
        assert get_store() is store  # one client per process and configuration
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


@pytest.mark.parametrize("url", ["s3:/bucket", "http://bucket/prefix", "s3://", "/var/artifacts", "s3://b/p?x=1"])
def test_a_malformed_artifact_url_is_refused_at_start(url):
    with pytest.raises(ValidationError, match="MCS_ARTIFACT_URL"):
        Settings(artifact_url=url)


def test_parse_s3_url():
    assert parse_s3_url("s3://bucket") == ("bucket", "")
    assert parse_s3_url("s3://bucket/a/b/") == ("bucket", "a/b")
