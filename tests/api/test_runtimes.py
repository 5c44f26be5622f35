"""`"runtimes"` at submission: an unknown runtime is a 422 like any bad field; a runtime no live worker of the queue
advertises is a 422 naming it (a queue with no live worker accepts the job unchecked, as the capacity check does).
A job that names runtimes records a figure per runtime, and a note where the artifact is not faster or smaller."""

from datetime import timedelta

from core.compression.runtime_rules import installed_runtimes
from core.compression.runtimes import FASTER_BY
from core.service.db.repositories import JobRuns, Workers
from core.service.db.session import session_scope
from core.service.storage import get_store
from tests.api.test_jobs import INT8, queued_job_ids
from worker import tasks

GB = 1_000_000_000


def add_worker(name: str, runtimes: list[str] | None, queues: tuple[str, ...] = ("cpu",)) -> None:
    with session_scope() as session:
        if runtimes is None:  # a worker from before runtimes were advertised
            Workers(session).report(name, list(queues), 64 * GB, 32 * GB, None, None)
        else:
            Workers(session).report(name, list(queues), 64 * GB, 32 * GB, None, None, runtimes)


def submit(client, auth, model_id: str, runtimes: list[str], **extra) -> tuple[int, dict]:
    body = {"model_id": model_id, "steps": [INT8], "runtimes": runtimes, **extra}
    response = client.post("/v1/jobs", json=body, headers=auth)
    return response.status_code, response.json()


def test_an_unknown_runtime_is_422_listing_the_known_ones(client, auth, upload):
    status, body = submit(client, auth, upload()["id"], ["tensorrt"])
    assert status == 422, body
    assert "'torch', 'onnxruntime' or 'llama.cpp'" in str(body["error"]["details"])
    assert queued_job_ids() == []


def test_a_runtime_no_live_worker_of_the_queue_has_is_422_naming_it(client, auth, upload):
    model = upload()
    add_worker("celery@plain", ["torch"])
    add_worker("celery@old", None)
    add_worker("celery@gpu", ["torch", "onnxruntime", "llama.cpp"], queues=("gpu",))
    status, body = submit(client, auth, model["id"], ["torch", "onnxruntime"])
    assert status == 422, body
    error = body["error"]
    assert "no live worker of queue 'cpu' has the runtime(s) onnxruntime" in error["message"]
    assert "pip install onnxruntime" in error["message"]  # how to install it
    assert error["details"]["missing_runtimes"] == ["onnxruntime"]
    assert error["details"]["workers"] == {"celery@plain": ["torch"], "celery@old": ["torch"]}
    assert queued_job_ids() == []
    add_worker("celery@onnx", ["torch", "onnxruntime"])
    status, body = submit(client, auth, model["id"], ["torch", "onnxruntime"])
    assert status == 202, body
    assert queued_job_ids() == [body["id"]]


def test_without_a_live_worker_a_job_with_runtimes_is_accepted_unchecked(client, auth, upload):
    status, body = submit(client, auth, upload()["id"], ["torch", "onnxruntime"])
    assert status == 202, body
    assert any("accepted unchecked" in note for note in body["estimate"]["notes"])


def test_llama_cpp_for_a_model_gguf_cannot_write_is_422(client, auth, upload):
    status, body = submit(client, auth, upload()["id"], ["llama.cpp"],
                          steps=[{"type": "quantize", "bits": 8, "granularity": "per_group", "group_size": 32}])
    assert status == 422, body
    assert 'runtime "llama.cpp" runs the GGUF export' in body["error"]["message"]
    assert "not BertModel" in body["error"]["message"]


def test_a_job_with_runtimes_records_each_figure_and_flags_weight_only_int8(client, auth, upload, tmp_path):
    """A tiny BERT encoder (MiniLM's architecture) with weight-only int8, timed on torch and onnxruntime by the
    worker's own code path: both runtimes' figures land in the job's metrics; torch runs the decoded float32 weights,
    so its memory is not smaller (flagged, always) and its speed flag follows its measured ratio."""
    add_worker("celery@here", installed_runtimes())
    status, body = submit(client, auth, upload()["id"], ["torch", "onnxruntime"])
    assert status == 202, body
    with session_scope() as session:  # run it in this process as the worker does
        job = JobRuns(session).claim(body["id"], timedelta(seconds=60), max_attempts=3)
        session.expunge(job)
    tasks._execute(job, get_store(), tmp_path / "work")
    result = client.get(f"/v1/jobs/{body['id']}", headers=auth).json()
    assert result["status"] == "succeeded", result
    runtimes, notes = result["metrics"]["runtimes"], result["metrics"]["notes"]
    assert list(runtimes) == ["torch", "onnxruntime"]
    for name, record in runtimes.items():
        assert record["workload"]["kind"] == "encoder" and record["workload"]["batch"] == 8
        assert record["workload"]["sequence"] == 64  # no tokenizer: the probe's seeded random ids
        assert record["original"]["batch_latency_ms"]["runs"] >= 3 and record["artifact"]["batch_latency_ms"]["median"]
        assert record["faster"] == (record["speedup"]["batch_latency"] >= FASTER_BY)
        assert any(note.startswith(f"{name}: the artifact is not faster") for note in notes) is not record["faster"]
    assert not runtimes["torch"]["smaller_in_memory"] and runtimes["torch"]["memory_ratio"] == 1.0
    assert any(note.startswith("torch: the artifact is not smaller in memory") for note in notes)
    assert runtimes["onnxruntime"]["smaller_in_memory"]  # int8 MatMulNBits vs the float32 ONNX
    assert not any(note.startswith("onnxruntime: the artifact is not smaller") for note in notes)
