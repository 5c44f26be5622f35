"""A real S3 endpoint for the storage tests: moto's standalone server, which scripts/services.sh starts on
127.0.0.1:9555 (MCS_TEST_S3_PORT) as it starts PostgreSQL and Redis. Run alone (pytest tests/storage) without it,
the suite starts its own on a free port. Each session works in a bucket of its own, removed at the end."""

import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cli.stack import free_port, spawn
from core.service.settings import get_settings
from core.service.storage.s3 import S3ArtifactStore
from tests.models import save_model_folder, tiny_bert
from tests.storage.helpers import AWS_ENV, MiB, s3_settings


def _moto_up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/moto-api/", timeout=2).status_code == 200  # data.json, a state dump, can 500
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = f"http://127.0.0.1:{os.environ.get('MCS_TEST_S3_PORT', '9555')}"
    if _moto_up(url):
        yield url
        return
    port, log = free_port(), tmp_path_factory.mktemp("moto") / "moto.log"
    server = spawn([sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p", str(port)],
                   dict(os.environ), log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not _moto_up(url):
        assert server.poll() is None and time.monotonic() < deadline, f"moto_server did not start; see {log}"
        time.sleep(0.2)
    try:
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="session")
def aws_env() -> Iterator[dict[str, str]]:
    saved = {name: os.environ.get(name) for name in AWS_ENV}
    os.environ.update(AWS_ENV)
    yield AWS_ENV
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint: str, aws_env: dict[str, str]) -> Iterator[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"mcs-test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    yield bucket
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if objects:
            client.delete_objects(Bucket=bucket, Delete={"Objects": objects})
    client.delete_bucket(Bucket=bucket)


@pytest.fixture()
def s3_prefix() -> str:
    """A prefix of the test's own inside the session's bucket."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture()
def s3_store(s3_endpoint: str, s3_bucket: str, s3_prefix: str) -> S3ArtifactStore:
    """Multipart from 5 MiB (S3's smallest part), so the tests exercise it with small files."""
    return S3ArtifactStore(s3_bucket, s3_prefix, s3_endpoint, multipart_threshold=5 * MiB, multipart_chunk=5 * MiB)


@pytest.fixture()
def use_s3(s3_endpoint: str, s3_bucket: str, s3_prefix: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    """This process's settings point at the test bucket (get_store() answers an S3ArtifactStore)."""
    for name, value in s3_settings(s3_endpoint, s3_bucket, s3_prefix).items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    yield {"bucket": s3_bucket, "prefix": s3_prefix, "endpoint": s3_endpoint}
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.fixture()
def small_parts(use_s3, monkeypatch):
    monkeypatch.setenv("MCS_S3_MULTIPART_CHUNK_BYTES", str(5 * MiB))
    get_settings.cache_clear()
    yield use_s3
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def big_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BERT whose weights (11.6 MB) take two full 5 MiB parts and a last one."""
    return save_model_folder(tiny_bert(vocab_size=45_000), tmp_path_factory.mktemp("big-bert"))
