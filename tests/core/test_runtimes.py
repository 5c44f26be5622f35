"""`"runtimes"`: the original and the artifact timed on each runtime a job names, with a flag where the artifact is
not faster or not smaller in memory there.

Timings on a shared CPU are noise, so nothing here asserts a speed: the tests check what is measured (workload,
figures with their spread, memory), the verdict's logic on given figures, and that the onnxruntime decode loop
generates what torch generates. llama.cpp tests run only where llama-cpp-python is installed (the `llamacpp` extra)
and print why they skip otherwise.
"""

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from core.compression.artifact import load_compressed, read_manifest, save_compressed, stored_encodings
from core.compression.exports.onnx import export_onnx_with_past
from core.compression.exports.onnx_nbits import plan_nbits
from core.compression.metrics import probe_inputs
from core.compression.pipeline import run_pipeline
from core.compression.runtime_rules import installed_runtimes, missing_runtimes, model_runtime_refusal
from core.compression.runtimes import (
    FASTER_BY,
    RuntimeModels,
    Workload,
    figure,
    measure_runtimes,
    onnx_greedy,
    onnx_session,
    time_alternating,
    torch_greedy,
    verdict,
    workload_for,
)
from core.compression.spec import JobSpec
from core.compression.state import ModelState, StepContext
from tests.models import save_model_folder, tiny_bert, tiny_llama

INT8 = {"type": "quantize", "bits": 8}
G32 = {"type": "quantize", "bits": 4, "granularity": "per_group", "group_size": 32}
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
NO_LLAMA_CPP = "llama-cpp-python is not installed (pip install '.[llamacpp]'; it builds llama.cpp from source)"


def artifact(build: Any, steps: list[dict[str, Any]], tmp_path: Path) -> tuple[Path, Path]:
    """(original folder, artifact folder) of a tiny model compressed with `steps`."""
    model_dir = save_model_folder(build(), tmp_path / "original")
    state = ModelState(build())
    run_pipeline(state, JobSpec(steps=steps).steps, StepContext())
    return model_dir, save_compressed(state, tmp_path / "artifact", {"job_id": "test"}, source_dir=model_dir)


def runtime_models(build: Any, steps: list[dict[str, Any]], tmp_path: Path) -> RuntimeModels:
    model_dir, folder = artifact(build, steps, tmp_path)
    loaded = load_compressed(folder)
    workload, inputs = workload_for(loaded, None, probe_inputs(loaded, batch=2, seq_len=16))
    return RuntimeModels(build(), loaded, folder, model_dir, tmp_path / "scratch", workload, inputs)


def speed(median: float) -> dict[str, float]:
    return {"median": median, "min": median, "max": median, "runs": 3}


# --- the verdict, on given figures --------------------------------------------------------------------------------


def test_an_artifact_faster_and_smaller_everywhere_carries_no_note() -> None:
    original = {"prefill_tokens_per_s": speed(100), "decode_tokens_per_s": speed(10), "memory_bytes": 1000}
    artifact = {"prefill_tokens_per_s": speed(150), "decode_tokens_per_s": speed(20), "memory_bytes": 300}
    result = verdict("onnxruntime", original, artifact)
    assert result == {"speedup": {"prefill": 1.5, "decode": 2.0}, "memory_ratio": 0.3, "faster": True,
                      "smaller_in_memory": True, "notes": []}


@pytest.mark.parametrize(("latency_ms", "memory", "faster", "smaller"), [
    (10.0, 1000, False, False),  # same speed, same memory: weight-only codes decoded to float32 in torch
    (10.0 / (FASTER_BY - 0.01), 500, False, True),  # a little faster, within the noise margin: not faster
    (10.0 / FASTER_BY, 1000, True, False),
    (12.0, 400, False, True),  # slower
])
def test_a_runtime_where_the_artifact_is_not_faster_or_not_smaller_is_flagged(latency_ms: float, memory: int,
                                                                                faster: bool, smaller: bool) -> None:
    original = {"batch_latency_ms": speed(10.0), "memory_bytes": 1000}
    result = verdict("torch", original, {"batch_latency_ms": speed(latency_ms), "memory_bytes": memory})
    assert (result["faster"], result["smaller_in_memory"]) == (faster, smaller)
    assert result["speedup"] == {"batch_latency": round(10.0 / latency_ms, 3)}
    assert any("torch: the artifact is not faster than the original" in n for n in result["notes"]) is not faster
    assert any("torch: the artifact is not smaller in memory" in n for n in result["notes"]) is not smaller


def test_one_slower_phase_makes_an_llm_not_faster() -> None:
    original = {"prefill_tokens_per_s": speed(100), "decode_tokens_per_s": speed(10), "memory_bytes": 1000}
    artifact = {"prefill_tokens_per_s": speed(300), "decode_tokens_per_s": speed(9), "memory_bytes": 500}
    result = verdict("llama.cpp", original, artifact)
    assert not result["faster"] and result["notes"] == [
        "llama.cpp: the artifact is not faster than the original (prefill 3.0x, decode 0.9x the original's speed; "
        f"faster means at least {FASTER_BY}x)"]


def test_figures_are_medians_of_alternating_runs_with_their_spread() -> None:
    order: list[str] = []

    def runner(name: str, seconds: float) -> Any:
        return lambda: order.append(name) or {"prefill": seconds, "decode": 2 * seconds}

    runs = time_alternating([runner("a", 0.5), runner("b", 0.25)], budget_s=0.0, min_runs=3)
    assert order == ["a", "b"] * 4  # one warm-up each, then three rounds in turn
    workload = Workload("causal_lm", batch=2, sequence=8, new_tokens=4)
    assert figure(workload, runs[1]) == {"prefill_tokens_per_s": {"median": 64.0, "min": 64.0, "max": 64.0, "runs": 3},
                                         "decode_tokens_per_s": {"median": 16.0, "min": 16.0, "max": 16.0, "runs": 3}}
    fast = time_alternating([lambda: {"batch": 0.0}], budget_s=60.0, min_runs=3, max_runs=7)
    assert len(fast[0]) == 7  # a tiny model stops at max_runs however much budget is left


# --- measured on tiny models --------------------------------------------------------------------------------------


def test_an_encoder_is_timed_on_torch_and_onnxruntime_with_batch_and_length_stated(tmp_path: Path) -> None:
    models = runtime_models(tiny_bert, [INT8], tmp_path)
    results = measure_runtimes(["onnxruntime", "torch"], models, budget_s=0.2)
    assert list(results) == ["torch", "onnxruntime"]  # torch first, whatever the order asked
    for runtime, record in results.items():
        assert record["workload"] == {"kind": "encoder", "batch": 2, "sequence": 16, "new_tokens": 0,
                                      "threads": torch.get_num_threads()}
        for side in ("original", "artifact"):
            latency = record[side]["batch_latency_ms"]
            assert 0 < latency["min"] <= latency["median"] <= latency["max"] and latency["runs"] >= 3
        assert record["faster"] == (record["speedup"]["batch_latency"] >= FASTER_BY), runtime
        assert record["smaller_in_memory"] == (record["memory_ratio"] < 1), runtime
    # weight-only int8 decodes to float32 in torch; in ONNX Runtime it stays int8 (MatMulNBits)
    assert results["torch"]["memory_ratio"] == 1.0 and not results["torch"]["smaller_in_memory"]
    assert "torch: the artifact is not smaller in memory" in " ".join(results["torch"]["notes"])
    assert results["onnxruntime"]["memory_ratio"] < 0.6 and results["onnxruntime"]["smaller_in_memory"]
    assert not models.scratch.exists()  # the timing-only exports are gone


def test_a_causal_lm_is_timed_by_prefill_and_decode_on_its_kv_cache_graph_which_generates(tmp_path: Path) -> None:
    """The job's KV-cache ONNX export (MatMulNBits layers) is what onnxruntime times, and its decode loop is a real
    generation: its greedy tokens equal the torch artifact's, prompt by prompt."""
    models = runtime_models(tiny_llama, [G32], tmp_path)
    assert models.workload == Workload("causal_lm", 1, 64, 32, torch.get_num_threads())  # cut to 128 positions
    plan = plan_nbits(models.artifact, stored_encodings(models.folder), read_manifest(models.folder).aliases)
    exported = export_onnx_with_past(models.artifact, models.folder, plan)  # as the job's ONNX export writes it
    record = measure_runtimes(["onnxruntime"], models, budget_s=0.2)["onnxruntime"]
    assert record["original"]["form"] == "float32 ONNX KV-cache graph"
    assert record["artifact"]["memory_bytes"] == exported.stat().st_size
    for side in ("original", "artifact"):
        assert record[side]["prefill_tokens_per_s"]["median"] > 0 and record[side]["decode_tokens_per_s"]["runs"] >= 3
    assert set(record["speedup"]) == {"prefill", "decode"} and record["memory_ratio"] < 1
    session = onnx_session(exported, threads=1)
    generator = torch.Generator().manual_seed(5)
    for length in (1, 7, 30):
        prompt = torch.randint(0, 512, (1, length), generator=generator)
        assert onnx_greedy(session, prompt.numpy(), 12)[1] == torch_greedy(models.artifact, prompt, 12)[1]


def test_a_runtime_the_process_lacks_or_cannot_run_is_reported_not_raised(tmp_path: Path) -> None:
    models = runtime_models(tiny_bert, [INT8], tmp_path)
    record = measure_runtimes(["llama.cpp"], models, budget_s=0.1)["llama.cpp"]
    assert record["measured"] is False
    expected = "runs causal LMs only" if HAS_LLAMA_CPP else "this worker has no llama_cpp package"
    assert expected in record["reason"] and record["notes"] == [f"llama.cpp: not measured: {record['reason']}"]


# --- what a worker advertises, what a recipe may ask ---------------------------------------------------------------


def test_a_process_advertises_torch_and_each_importable_runtime() -> None:
    assert installed_runtimes() == ["torch", "onnxruntime", *(["llama.cpp"] if HAS_LLAMA_CPP else [])]
    assert missing_runtimes(["torch", "llama.cpp"], None) == ["llama.cpp"]  # a row from before runtimes: torch
    assert missing_runtimes(["onnxruntime"], ["torch", "onnxruntime"]) == []


def test_recipes_a_runtime_cannot_run_are_refused() -> None:
    with pytest.raises(ValidationError, match="runtimes lists a runtime twice"):
        JobSpec(steps=[INT8], runtimes=["torch", "torch"])
    with pytest.raises(ValidationError, match='runtime "llama.cpp" runs the gguf export.*group_size: 32'):
        JobSpec(steps=[INT8], runtimes=["llama.cpp"])
    with pytest.raises(ValidationError, match="Input should be 'torch', 'onnxruntime' or 'llama.cpp'"):
        JobSpec(steps=[INT8], runtimes=["tensorrt"])
    assert JobSpec(steps=[{**G32, "bits": 8}], runtimes=["llama.cpp", "onnxruntime"]).runtimes == ["llama.cpp",
                                                                                                   "onnxruntime"]
    assert "Llama-family causal LMs" in (model_runtime_refusal(["llama.cpp"], "BertModel") or "")
    assert model_runtime_refusal(["torch", "onnxruntime"], "BertModel") is None


# --- llama.cpp (only where llama-cpp-python is installed) -----------------------------------------------------------


@pytest.fixture()
def llama_cpp() -> None:
    if not HAS_LLAMA_CPP:
        print(f"skipped: {NO_LLAMA_CPP}")
        pytest.skip(NO_LLAMA_CPP)


@pytest.mark.usefixtures("llama_cpp")
def test_llama_cpp_times_our_gguf_against_an_f16_gguf_of_the_original(tmp_path: Path) -> None:
    models = runtime_models(tiny_llama, [G32], tmp_path)
    record = measure_runtimes(["llama.cpp"], models, budget_s=0.2)["llama.cpp"]
    assert record.get("measured", True), record.get("reason")
    assert record["original"]["form"] == "F16 GGUF of the original"
    for side in ("original", "artifact"):
        assert record[side]["prefill_tokens_per_s"]["median"] > 0 and record[side]["decode_tokens_per_s"]["runs"] >= 3
    assert record["memory_ratio"] < 1 and record["smaller_in_memory"]  # Q4_0 blocks vs F16


@pytest.mark.usefixtures("llama_cpp")
def test_llama_cpp_greedy_tokens_follow_the_model(tmp_path: Path) -> None:
    """llama.cpp's decode loop runs the model (not a stub): on an F32 GGUF of the original, its greedy tokens equal
    torch's for a short continuation."""
    from llama_cpp import Llama

    from core.compression.exports.gguf import export_gguf
    from core.compression.runtimes import llama_greedy

    model = tiny_llama()
    model_dir = save_model_folder(model, tmp_path / "original")
    folder = save_compressed(ModelState(tiny_llama()), tmp_path / "plain", {}, source_dir=model_dir)
    path = export_gguf(folder, tmp_path / "plain.gguf").path
    llm = Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False)
    prompt = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(2))
    assert llama_greedy(llm, prompt[0].tolist(), 6)[1] == torch_greedy(model, prompt, 6)[1]
