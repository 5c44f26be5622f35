"""The per-step waterfall: after every step of an in-memory job, the size its weights would be stored at (the last
step's equals the artifact's), the evaluation subset's metrics (or the probe's cosine) and a latency; the
layer-by-layer and offloaded engines say why they skip it; the artifact's bytes by kind and encoding add up; the
standalone evaluation measures an artifact against its original, or a model alone."""

from pathlib import Path
from typing import Any

import pytest

from core.compression.evaluate import WATERFALL_SAMPLES, EvaluationRequest
from core.compression.execute import evaluate_standalone, execute_job
from core.compression.pipeline import StepHooks
from core.compression.spec import JobSpec
from core.compression.state import StepContext
from core.compression.waterfall import WATERFALL, tensor_kind
from core.errors import InvalidSpec
from tests.core.test_evaluate import CHOICE_ROWS, untied_llama
from tests.models import save_model_folder, tiny_tokenizer

PRUNE = {"type": "prune", "method": "magnitude", "sparsity": 0.5}
INT8 = {"type": "quantize", "method": "rtn", "bits": 8}
ROWS = CHOICE_ROWS * 7  # 42 rows: more than the waterfall's subset


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = save_model_folder(untied_llama(), tmp_path_factory.mktemp("llama"))
    tiny_tokenizer().save_pretrained(folder)
    return folder


def tensor_bytes(folder: Path) -> int:
    """Bytes of the tensors in a folder's safetensors files: each file less its 8-byte length and JSON header."""
    files = list(folder.glob("*.safetensors"))
    return sum(f.stat().st_size - 8 - int.from_bytes(f.read_bytes()[:8], "little") for f in files)


def run(folder: Path, work: Path, evaluation: EvaluationRequest | None = None,
        stream_above_bytes: int | None = None, steps: list[dict[str, Any]] | None = None) -> tuple[Any, list[Any]]:
    reports: list[Any] = []
    spec = JobSpec.model_validate({"steps": steps or [PRUNE, INT8]})
    outcome = execute_job(folder, spec, work, StepContext(), StepHooks(finished=lambda i, r: reports.append(r)),
                          {"job_id": "test"}, stream_above_bytes, evaluation)
    return outcome, [report.metrics[WATERFALL] for report in reports]


def test_every_in_memory_step_records_its_size_quality_and_latency(llama_folder: Path, tmp_path: Path) -> None:
    request = EvaluationRequest("dst_eval", ("perplexity", "accuracy"), ROWS)
    outcome, records = run(llama_folder, tmp_path / "work", request)
    pruned, quantized = records
    assert quantized["size_bytes"] < pruned["size_bytes"] < pruned["original_size_bytes"]
    assert pruned["size_ratio"] == pytest.approx(pruned["size_bytes"] / pruned["original_size_bytes"])
    # the last step's size is exactly what the artifact's weight file holds (its header aside)
    stored = tensor_bytes(tmp_path / "work" / "model")
    assert quantized["size_bytes"] == stored == outcome.metrics["bytes"]["total_bytes"]
    assert set(outcome.metrics["bytes"]["by_encoding"]) == {"sparse_bitmask", "int8_rtn", "plain f32"}
    for record in records:
        assert record["latency_ms"] > 0 and 0 < record["output_cosine"] <= 1.0 + 1e-6
        assert f"the first {WATERFALL_SAMPLES} of the {len(ROWS)} evaluation rows" in record["quality_subset"]
        ppl = record["quality"]["perplexity"]
        assert ppl["delta"] == pytest.approx(ppl["value"] - ppl["original"])
    assert records[0]["quality"]["perplexity"]["delta"] != 0  # pruning half the weights moves perplexity
    errors = outcome.metrics["layers"]["values"]  # per matrix: pruned ones moved far more than int8 alone moves
    assert 0.1 < errors["model.layers.0.self_attn.q_proj.weight"] < 1
    assert 0 < errors["model.embed_tokens.weight"] < 0.02


def test_without_evaluate_the_waterfall_uses_the_probe_cosine(llama_folder: Path, tmp_path: Path) -> None:
    outcome, records = run(llama_folder, tmp_path / "work", steps=[INT8])
    assert "quality" not in records[0] and "output cosine" in records[0]["note"]
    assert records[0]["output_cosine"] == pytest.approx(outcome.metrics["output_cosine"], abs=1e-5)


@pytest.mark.parametrize(("steps", "engine"), [([INT8], "layer_by_layer"),
                                               ([{"type": "quantize", "method": "gptq", "bits": 8,
                                                  "calibration": {"num_samples": 2, "seq_len": 8}}], "offloaded")])
def test_engines_that_never_hold_the_model_skip_the_waterfall_and_say_why(llama_folder: Path, tmp_path: Path,
                                                                         steps: list[dict[str, Any]],
                                                                         engine: str) -> None:
    outcome, records = run(llama_folder, tmp_path / "work", stream_above_bytes=0, steps=steps)
    assert outcome.metrics["engine"] == engine
    assert records[0]["size_bytes"] is None and records[0]["engine"] == engine
    assert "not measured after each step" in records[0]["note"]
    assert len(outcome.metrics["after"]["block_output_cosines"]) == 2  # the per-layer numbers it does have


def test_the_artifacts_bytes_add_up_by_kind_and_by_encoding(llama_folder: Path, tmp_path: Path) -> None:
    outcome, _ = run(llama_folder, tmp_path / "work", steps=[INT8])
    found = outcome.metrics["bytes"]
    assert sum(found["by_kind"].values()) == sum(found["by_encoding"].values()) == found["total_bytes"]
    assert found["total_bytes"] == tensor_bytes(tmp_path / "work" / "model")
    assert {"attention", "mlp", "embedding", "lm_head", "norm"} <= set(found["by_kind"])
    assert set(found["by_encoding"]) == {"int8_rtn", "plain f32"}  # the norms and the head stay float
    assert tensor_kind("bert.encoder.layer.0.attention.self.query.weight") == "attention"
    assert tensor_kind("bert.encoder.layer.0.intermediate.dense.weight") == "mlp"
    assert tensor_kind("classifier.bias") == "head"


def test_a_standalone_evaluation_compares_an_artifact_or_measures_a_model_alone(llama_folder: Path,
                                                                              tmp_path: Path) -> None:
    request = EvaluationRequest("dst_eval", ("perplexity", "accuracy"), ROWS[:6])
    outcome, _ = run(llama_folder, tmp_path / "job", request, steps=[INT8])
    for streams in (None, 0):
        compared = evaluate_standalone(llama_folder, outcome.artifact, request, tmp_path / f"e{streams}",
                                       StepContext(), streams)
        for name in ("perplexity", "accuracy"):  # what the job's own evaluation measured
            theirs = outcome.metrics["evaluation"]["metrics"][name]
            assert compared["metrics"][name]["artifact"] == pytest.approx(theirs["artifact"], rel=1e-5)
            assert compared["metrics"][name]["ci95"] == pytest.approx(theirs["ci95"], rel=1e-4, abs=1e-9)
    alone = evaluate_standalone(llama_folder, None, request, tmp_path / "alone", StepContext())
    ppl = alone["metrics"]["perplexity"]
    assert ppl["value"] == pytest.approx(outcome.metrics["evaluation"]["metrics"]["perplexity"]["original"])
    assert ppl["ci95"][0] <= ppl["value"] <= ppl["ci95"][1] and "delta" not in ppl
    with pytest.raises(InvalidSpec, match="compare a model with its original"):
        evaluate_standalone(llama_folder, None, EvaluationRequest("d", ("generation_agreement",), ROWS),
                            tmp_path / "refused", StepContext())
