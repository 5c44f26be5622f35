"""Test configuration: the real PostgreSQL and Redis on 127.0.0.1, configured through the same MCS_ settings
production uses. The environment is set before any service module is imported (settings are read once)."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

PG_ADMIN = os.environ.get("MCS_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
# Separate names let several suites run side by side on one machine (e.g. MCS_TEST_DB=mcs_test_b MCS_TEST_REDIS_DB=11).
TEST_DB = os.environ.get("MCS_TEST_DB", "mcs_test")
REDIS_DB = int(os.environ.get("MCS_TEST_REDIS_DB", "15"))
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
E2E_BROKER_URL = f"redis://127.0.0.1:6379/{REDIS_DB - 1}"
ARTIFACT_ROOT = Path(tempfile.mkdtemp(prefix="mcs-test-artifacts-"))

os.environ.update(
    MCS_DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:5432/{TEST_DB}",
    MCS_BROKER_URL=REDIS_URL,
    MCS_ARTIFACT_DIR=str(ARTIFACT_ROOT),
    MCS_VAR_DIR=str(ARTIFACT_ROOT / "var"),
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(ARTIFACT_ROOT, ignore_errors=True)


@pytest.fixture(scope="session")
def database_url() -> str:
    """A fresh `mcs_test` database built by the real Alembic migrations."""
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {TEST_DB} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {TEST_DB}")
    from core.db.migrate import upgrade

    url = os.environ["MCS_DATABASE_URL"]
    upgrade(url)
    return url


@pytest.fixture()
def db(database_url: str) -> Iterator[str]:
    """Every test that touches the database starts from empty tables and an empty test queue."""
    yield database_url
    from sqlalchemy import text

    from core.db.models import Base
    from core.db.session import engine

    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    with engine().begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} CASCADE"))
    redis.Redis.from_url(REDIS_URL).flushdb()
    for child in ARTIFACT_ROOT.iterdir():
        shutil.rmtree(child, ignore_errors=True)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked `gpu` need CUDA: skipped, with the reason, on machines without it (CI here has none)."""
    if item.get_closest_marker("gpu") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs CUDA (marker gpu)")


@pytest.fixture()
def device(request: pytest.FixtureRequest) -> "torch.device":  # noqa: F821 (torch is imported lazily)
    """The device a test runs its model on: CUDA for a test marked `gpu`, the CPU otherwise."""
    import torch

    return torch.device("cuda" if request.node.get_closest_marker("gpu") else "cpu")
