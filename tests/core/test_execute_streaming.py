"""execute_job picks the layer-by-layer engine for models over the caller's threshold, writes the in-memory job's
artifact and measures it from the files; the worker passes the service's MCS_STREAM_ABOVE_BYTES."""

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from core.compression import execute
from core.compression.execute import execute_job
from core.compression.pipeline import StepHooks
from core.compression.spec import JobSpec
from core.compression.state import StepContext
from core.service.db.repositories import JobRuns
from core.service.db.session import session_scope
from core.service.settings import get_settings
from core.service.storage import get_store
from tests.core.test_sequential import stored
from tests.models import save_sharded_folder, tiny_llama
from worker import tasks

INT4 = {"type": "quantize", "method": "rtn", "bits": 4, "granularity": "per_group", "group_size": 32}


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_sharded_folder(tiny_llama(), tmp_path_factory.mktemp("llama") / "model", max_shard_size="60KB")


def run_job(source: Path, work: Path, steps: list[dict[str, Any]], stream_above_bytes: int | None,
            export: list[str] | None = None) -> tuple[dict[str, Any], list[int]]:
    """The job's metrics and the indices of the steps its hooks saw finish."""
    finished: list[int] = []
    spec = JobSpec.model_validate({"steps": steps, "export": export or []})
    outcome = execute_job(source, spec, work, StepContext(), StepHooks(finished=lambda i, r: finished.append(i)),
                          {"job_id": "test"}, stream_above_bytes)
    assert outcome.artifact.is_file()
    return outcome.metrics, finished


def test_a_model_over_the_threshold_streams_to_the_in_memory_artifact(sharded_llama: Path, tmp_path: Path) -> None:
    streamed, finished = run_job(sharded_llama, tmp_path / "streamed", [INT4], stream_above_bytes=0)
    in_memory, _ = run_job(sharded_llama, tmp_path / "in-memory", [INT4], stream_above_bytes=None)
    assert (streamed["engine"], in_memory["engine"], finished) == ("layer_by_layer", "in_memory", [0])
    expected, actual = stored(tmp_path / "in-memory" / "model"), stored(tmp_path / "streamed" / "model")
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[name], expected[name]) for name in expected)
    for key in ("size_bytes", "parameters"):
        assert streamed["after"][key] == in_memory["after"][key], key
    assert streamed["before"]["parameters"] == in_memory["before"]["parameters"]
    assert streamed["size_ratio"] == in_memory["size_ratio"]
    # the whole model run forward one block at a time computes what the loaded model computes
    assert streamed["output_cosine"] == pytest.approx(in_memory["output_cosine"], abs=1e-6)
    assert streamed["before"]["output_cosine"] == pytest.approx(in_memory["before"]["output_cosine"], abs=1e-6)


def test_a_streamed_job_reports_output_and_block_cosines_but_no_latency(sharded_llama: Path,
                                                                        tmp_path: Path) -> None:
    metrics, _ = run_job(sharded_llama, tmp_path / "work", [INT4], stream_above_bytes=0)
    after = metrics["after"]
    # Measured: int4 g32 on tiny_llama's two blocks gives 0.987 and 0.988, the whole model 0.986; the same model 1.0.
    assert 0.95 < after["block_output_cosine_min"] <= after["block_output_cosine_mean"] < 0.9999
    assert 0.95 < metrics["output_cosine"] < 0.9999
    assert metrics["before"]["output_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert (metrics["speedup"], after["latency_ms"], metrics["before"]["latency_ms"]) == (None, None, None)
    assert "latency_ms is not measured" in metrics["note"]


def test_blocks_that_cannot_run_leave_the_cosines_unmeasured_not_the_job_failed(
        sharded_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unusual_block(*args: Any) -> list[float]:
        raise TypeError("forward() missing 1 required positional argument: 'pixel_values'")

    monkeypatch.setattr(execute, "block_output_cosines", unusual_block)
    metrics, _ = run_job(sharded_llama, tmp_path / "work", [INT4], stream_above_bytes=0)
    assert metrics["after"]["block_output_cosine_min"] is None
    assert "pixel_values" in metrics["after"]["block_output_cosine_error"]


@pytest.mark.parametrize(("steps", "export", "threshold"), [
    ([INT4], None, 10**12),
    ([{"type": "prune", "method": "structured", "target": "neurons", "amount": 0.5, "importance": "l1"}], None, 0),
    ([INT4], ["compressed-tensors"], 0),
], ids=["under the threshold", "a step that needs the whole model", "an export"])
def test_other_jobs_stay_in_memory(sharded_llama: Path, tmp_path: Path, steps: list[dict[str, Any]],
                                   export: list[str] | None, threshold: int) -> None:
    metrics, _ = run_job(sharded_llama, tmp_path / "work", steps, threshold, export)
    assert metrics["engine"] == "in_memory" and metrics["speedup"] > 0


def run_over_threshold(client: TestClient, auth: dict[str, str], model_id: str, step: dict[str, Any], work: Path,
                       monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Submit a one-step job and run it in this process as the worker does, with MCS_STREAM_ABOVE_BYTES=0; the
    job's JSON once it ended."""
    job_id = client.post("/v1/jobs", json={"model_id": model_id, "steps": [step]}, headers=auth).json()["id"]
    with session_scope() as session:
        job = JobRuns(session).claim(job_id, timedelta(seconds=60), max_attempts=3)
        session.expunge(job)
    monkeypatch.setattr(tasks, "get_settings", lambda: get_settings().model_copy(update={"stream_above_bytes": 0}))
    tasks._execute(job, get_store(), work)
    return client.get(f"/v1/jobs/{job_id}", headers=auth).json()


def test_the_worker_passes_the_stream_setting(client: TestClient, auth: dict[str, str], upload: Callable[..., dict],
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = run_over_threshold(client, auth, upload()["id"], INT4, tmp_path / "work", monkeypatch)
    assert result["status"] == "succeeded" and result["metrics"]["engine"] == "layer_by_layer"
