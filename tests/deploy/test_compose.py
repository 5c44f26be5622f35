"""docker-compose.yml and the Dockerfile, checked without a Docker engine (there is none here).

The compose file is validated against the Compose Specification's JSON schema, vendored as compose-spec.json (the
compose-spec project's schema/compose-spec.json, as shipped in the npm package dclint 3.1.0: no network at test
time). Beyond the schema, the properties the deployment relies on: health checks, the GPU worker behind a profile,
API and workers meeting only through the bucket, and only settings that exist.
"""

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from core.service.settings import Settings
from core.service.storage.s3 import parse_s3_url

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((Path(__file__).parent / "compose-spec.json").read_text())
WORKERS = ("worker", "worker-gpu")
APP_SERVICES = ("migrate", "api", *WORKERS)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # resolves the `<<` merge keys, as compose does


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    return env if isinstance(env, dict) else dict(item.split("=", 1) for item in env)


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(SCHEMA).iter_errors(compose)]
    assert errors == []


def test_the_schema_refuses_what_compose_refuses(compose: dict[str, Any]) -> None:
    """The validation has teeth: a misspelt key and a wrongly typed healthcheck are errors."""
    broken = json.loads(json.dumps(compose))
    broken["services"]["api"]["healthcheck"]["intervall"] = "5s"
    broken["services"]["worker"]["profiles"] = "gpu"
    messages = [e.message for e in jsonschema.Draft7Validator(SCHEMA).iter_errors(broken)]
    assert any("intervall" in message for message in messages)
    assert any("is not of type 'array'" in message for message in messages)


def test_api_and_workers_have_health_checks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    for name in WORKERS:
        check, command = services[name]["healthcheck"]["test"], services[name]["command"]
        # the check pings this container's own Celery node: the name it was started with, %h being its hostname
        node = option(command, "--hostname").replace("%h", "$$HOSTNAME")
        assert f"inspect ping --destination {node}" in " ".join(check), name


def test_the_gpu_worker_is_opt_in_and_the_cpu_stack_starts_without_it(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["worker-gpu"]["profiles"] == ["gpu"]
    assert [name for name, service in services.items() if "profiles" in service] == ["worker-gpu"]
    assert option(services["worker"]["command"], "--queues") == "cpu"
    assert option(services["worker-gpu"]["command"], "--queues") == "gpu"
    assert services["worker"]["build"]["target"] == "cpu"
    assert services["worker-gpu"]["build"]["target"] == "cuda"
    assert services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_api_and_workers_share_no_disk_only_the_bucket(compose: dict[str, Any]) -> None:
    services = compose["services"]
    mounted = {name: {_volume_source(v) for v in services[name].get("volumes", [])} for name in ("api", *WORKERS)}
    for name in WORKERS:
        assert mounted["api"] & mounted[name] == set(), name
    urls = {environment(services[name])["MCS_ARTIFACT_URL"] for name in ("api", *WORKERS)}
    assert len(urls) == 1
    bucket, _ = parse_s3_url(urls.pop())
    init = " ".join(services["minio-init"]["command"])
    assert re.search(rf"mc mb --ignore-existing \w+/{re.escape(bucket)}\b", init)
    for name in APP_SERVICES:
        env = environment(services[name])
        assert env["MCS_S3_ENDPOINT_URL"] == "http://minio:9000", name
        assert env["AWS_ACCESS_KEY_ID"] == services["minio"]["environment"]["MINIO_ROOT_USER"], name
        assert env["AWS_SECRET_ACCESS_KEY"] == services["minio"]["environment"]["MINIO_ROOT_PASSWORD"], name


def test_every_mcs_variable_is_a_real_setting(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for variable in environment(service):
            if variable.startswith("MCS_"):
                assert variable.removeprefix("MCS_").lower() in Settings.model_fields, f"{name}: {variable}"


def _volume_source(volume: str | dict[str, Any]) -> str:
    if isinstance(volume, dict):
        return str(volume.get("source", ""))
    return volume.split(":", 1)[0] if ":" in volume else ""


def test_dockerfile_builds_both_images_on_the_tested_torch() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    tested = re.search(r"MCS_TORCH_VERSION:-([\d.]+)", setup)
    assert tested is not None
    assert f"ARG TORCH_VERSION={tested.group(1)}\n" in dockerfile
    stages = re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.MULTILINE)
    assert {"cpu", "cuda"} <= set(stages)
    assert stages[-1] == "cpu"  # a plain `docker build .` gives the CPU image
    assert "https://download.pytorch.org/whl/cpu" in dockerfile
    # the service runs as a user that owns its var dir, where `mcs migrate` and the metrics write
    var_dir = re.search(r"^ENV MCS_VAR_DIR=(\S+)", dockerfile, re.MULTILINE)
    assert var_dir is not None and var_dir.group(1) == "/var/lib/mcs"
    assert "chown mcs:mcs /var/lib/mcs" in dockerfile
    assert dockerfile.count("\nUSER mcs\n") == 2


def test_the_image_context_holds_every_package_it_installs() -> None:
    allowed = {line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    assert {"pyproject.toml", "README.md", "core", "api", "worker", "cli", "client", "migrations"} <= allowed
