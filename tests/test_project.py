"""Project-level contracts: configuration defaults and the compose file users run."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from core.service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_embedded_defaults_need_no_server(tmp_path, monkeypatch):
    for name in ("MCS_DATABASE_URL", "MCS_BROKER_URL", "MCS_ARTIFACT_DIR"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(var_dir=tmp_path)
    assert settings.database_url == f"sqlite:///{tmp_path}/mcs.sqlite"
    assert settings.broker_url == f"sqla+sqlite:///{tmp_path}/broker.sqlite"
    assert settings.artifact_dir == tmp_path / "artifacts"


def test_soft_time_limit_must_be_below_hard():
    with pytest.raises(ValidationError, match="SOFT_TIME_LIMIT"):
        Settings(job_soft_time_limit_s=100, job_hard_time_limit_s=100)


def test_compose_runs_the_production_stack_with_a_gpu_worker():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "api", "worker-gpu"} <= set(services)
    assert services["migrate"]["command"] == ["mcs", "migrate"]
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "gpu" in " ".join(services["worker-gpu"]["command"])
    for name in ("api", "worker-gpu", "migrate"):
        env = services[name]["environment"]
        assert env["MCS_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["MCS_BROKER_URL"].startswith("redis://")


def test_recipes_validate_without_torch():
    """The API validates recipes on hosts that never run a model: importing the configs must not import torch."""
    probe = "import sys, core.compression.spec; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
