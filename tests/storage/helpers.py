"""Helpers of the storage tests (the fixtures are in conftest.py)."""

import os
import random
from pathlib import Path

from core.service.storage.s3 import S3ArtifactStore

MiB = 1024**2
# moto accepts any credentials; fixed ones keep a developer's real AWS settings out of the tests
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


def s3_settings(endpoint: str, bucket: str, prefix: str, **extra: str) -> dict[str, str]:
    """The MCS_ variables that point a process at the test bucket."""
    return {"MCS_ARTIFACT_URL": f"s3://{bucket}/{prefix}", "MCS_S3_ENDPOINT_URL": endpoint,
            **{f"MCS_{name.upper()}": value for name, value in extra.items()}}


def object_keys(store: S3ArtifactStore, under: str = "") -> list[str]:
    """The store's object keys under `under` (relative to its prefix), sorted."""
    prefix = f"{store.prefix}/{under}" if store.prefix else under
    pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=prefix)
    return sorted(item["Key"].removeprefix(f"{store.prefix}/") for page in pages for item in page.get("Contents", []))


def write_random(path: Path, size: int, seed: int = 0) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data
