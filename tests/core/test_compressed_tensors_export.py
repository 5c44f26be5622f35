"""`"export": ["compressed-tensors"]`: our artifact written in compressed-tensors' format and loaded by transformers.

Each case compresses a tiny Llama with our pipeline, saves our artifact, exports it, loads the export with
`transformers.AutoModelForCausalLM.from_pretrained` (transformers decompresses compressed-tensors on CPU) and checks
that every weight equals our own `load_compressed` artifact's bit for bit, that the logits match, and that bits and
sparsity are what the recipe made. vLLM cannot be tested here (no GPU, not installable on this machine): the folder
follows the layout vLLM's compressed-tensors integration reads (pack-quantized, naive-quantized, `ignore`).
"""

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from core.compression.artifact import load_compressed, save_compressed
from core.compression.execute import execute_job
from core.compression.exports.compressed_tensors import export_compressed_tensors
from core.compression.pipeline import StepHooks, run_pipeline
from core.compression.spec import JobSpec
from core.compression.state import ModelState, StepContext
from core.errors import UnsupportedModel
from tests.models import save_model_folder, tiny_llama

INT4_G32 = {"type": "quantize", "bits": 4, "granularity": "per_group", "group_size": 32}
CALIBRATION = {"num_samples": 2, "seq_len": 16}
LOGIT_TOLERANCE = 1e-5  # measured 0.0: the weights are bit-identical, so only kernel order could differ

# name: (steps, expected format, expected weight args of the single config group or None)
CASES: dict[str, tuple[list[dict[str, Any]], str, dict[str, Any] | None]] = {
    "rtn-int4-g32": ([INT4_G32], "pack-quantized",
                     {"num_bits": 4, "strategy": "group", "group_size": 32, "symmetric": True}),
    "rtn-int4-g32-asymmetric": ([{**INT4_G32, "symmetric": False}], "pack-quantized",
                                {"num_bits": 4, "strategy": "group", "symmetric": False}),
    "rtn-int4-channel": ([{"type": "quantize", "bits": 4}], "pack-quantized",
                         {"num_bits": 4, "strategy": "channel"}),
    "rtn-int8-channel": ([{"type": "quantize", "bits": 8}], "pack-quantized",
                         {"num_bits": 8, "strategy": "channel", "symmetric": True}),
    "rtn-int8-asymmetric": ([{"type": "quantize", "bits": 8, "symmetric": False}], "pack-quantized",
                            {"num_bits": 8, "strategy": "channel", "symmetric": False}),
    "gptq-int4-g32": ([{"type": "quantize", "method": "gptq", "group_size": 32, "calibration": CALIBRATION}],
                      "pack-quantized", {"num_bits": 4, "strategy": "group", "group_size": 32}),
    "fp8": ([{"type": "quantize", "method": "fp8"}], "naive-quantized",
            {"num_bits": 8, "type": "float", "strategy": "channel"}),
    "magnitude-unstructured": ([{"type": "prune", "sparsity": 0.5}], "dense", None),
    "wanda-2:4+rtn-int4": ([{"type": "prune", "method": "wanda", "pattern": "2:4",
                             "calibration": CALIBRATION},
                            INT4_G32], "pack-quantized", {"num_bits": 4, "group_size": 32}),
}


def compress_and_export(steps: list[dict[str, Any]], tmp_path: Path) -> tuple[ModelState, Path, Any]:
    state = ModelState(tiny_llama())
    run_pipeline(state, JobSpec(steps=steps, export=["compressed-tensors"]).steps, StepContext())
    artifact = save_compressed(state, tmp_path / "artifact", {})
    return state, artifact, export_compressed_tensors(artifact, tmp_path / "artifact" / "compressed-tensors")


def load_exported(folder: Path) -> Any:
    """`AutoModelForCausalLM.from_pretrained(folder)`, weights decompressed. Asymmetric exports need
    dequantize=True (the old run_compressed=False): transformers' default path cannot load packed asymmetric zero
    points with compressed-tensors 0.20. Symmetric ones take the default path, whose packed weights
    compressed-tensors decompresses on the first forward (its dequantizing path would apply the first scheme of a
    mixed-precision config to every layer)."""
    groups = quantization_config(folder).get("config_groups") or {}
    if any(not group["weights"]["symmetric"] for group in groups.values()):
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=CompressedTensorsConfig(
            dequantize=True)).eval()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long))  # compressed-tensors' hook decompresses on the first forward
    return model


def quantization_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_transformers_with_our_exact_weights(case: str, tmp_path: Path) -> None:
    steps, fmt, weight_args = CASES[case]
    _, artifact, export = compress_and_export(steps, tmp_path)
    ours = load_compressed(artifact)
    theirs = load_exported(export.folder)

    config = quantization_config(export.folder)
    assert config["quant_method"] == "compressed-tensors" and config["format"] == export.format == fmt
    for name, weight in ours.named_parameters():
        assert torch.equal(theirs.get_parameter(name), weight), name
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (theirs(ids).logits - ours(ids).logits).abs().max().item()
    assert difference <= LOGIT_TOLERANCE
    if weight_args is not None:
        [group] = config["config_groups"].values()
        assert group["targets"] == ["Linear"] and config["ignore"] == ["lm_head"]
        assert weight_args.items() <= group["weights"].items()


def test_packed_codes_keep_their_width_and_the_tokenizer_files_travel(tmp_path: Path) -> None:
    # lm_head named, so quantized too (it is left out unless named)
    state, artifact, export = compress_and_export(
        [{"type": "quantize", "bits": 4, "include_embeddings": False, "targets": ["*", "lm_head"]}], tmp_path)
    (artifact / "tokenizer.json").write_text("{}")  # any tokenizer file of the artifact is copied along
    export = export_compressed_tensors(artifact, tmp_path / "again")
    with safe_open(export.folder / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
        packed = weights.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
        scale = weights.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (64, 128 * 4 // 32)  # 8 int4 codes per int32
    assert tuple(scale.shape) == (64, 1)
    assert "model.layers.0.mlp.down_proj.weight" not in names and "model.embed_tokens.weight" in names
    # lm_head shares the embedding: written once as plain values, not packed
    assert export.dense_weights.keys() == {"lm_head.weight"} and "lm_head.weight_packed" not in names
    assert (export.folder / "tokenizer.json").is_file()


def test_symmetric_export_loads_without_any_option(tmp_path: Path) -> None:
    _, artifact, export = compress_and_export([INT4_G32], tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(export.folder).eval()
    ours = load_compressed(artifact)
    ids = torch.arange(20).view(1, 20)
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids).logits).abs().max().item() <= LOGIT_TOLERANCE


@pytest.mark.parametrize(("pattern", "structure"), [("unstructured", "unstructured"), ("2:4", "2:4")])
def test_sparsity_is_kept_exactly_and_recorded(pattern: str, structure: str, tmp_path: Path) -> None:
    steps = [{"type": "prune", "pattern": pattern}, {**INT4_G32, "include_embeddings": False}]
    state, _, export = compress_and_export(steps, tmp_path)
    theirs = load_exported(export.folder)
    sparsity = quantization_config(export.folder)["sparsity_config"]
    assert sparsity["format"] == "dense" and sparsity["sparsity_structure"] == structure == export.sparsity[
        "sparsity_structure"]
    assert len(sparsity["targets"]) == 14  # every Linear of the two blocks; the tied lm_head is not pruned
    for name in sparsity["targets"]:
        weight = theirs.get_submodule(name).weight
        assert torch.equal(weight == 0, state.model.get_submodule(name).weight == 0)
        assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
        if structure == "2:4":
            assert bool(((weight != 0).view(weight.shape[0], -1, 4).sum(-1) <= 2).all())


def test_group_size_that_does_not_divide_a_row_is_refused(tmp_path: Path) -> None:
    state = ModelState(tiny_llama())
    run_pipeline(state, JobSpec(steps=[{**INT4_G32, "group_size": 48}]).steps, StepContext())
    artifact = save_compressed(state, tmp_path / "artifact", {})
    with pytest.raises(UnsupportedModel, match="group_size 48 does not divide"):
        export_compressed_tensors(artifact, tmp_path / "ct")


@pytest.mark.parametrize(("step", "reason"), [
    ({"type": "quantize", "method": "kmeans"}, "k-means codebook"),
    ({"type": "quantize", "method": "dynamic"}, "W8A8"),
    ({"type": "quantize", "method": "mixed", "symmetric": False}, "asymmetric zero points"),
    ({"type": "prune", "method": "structured"}, "structurally pruned"),
    ({"type": "decompose", "method": "svd", "rank_ratio": 0.5}, "low-rank"),
    ({"type": "lora", "merge": False}, "unmerged LoRA"),
])
def test_recipes_compressed_tensors_cannot_hold_are_refused_at_submission(step: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        JobSpec(steps=[step], export=["compressed-tensors"])
    JobSpec(steps=[step])  # the same recipe without the export is fine


def test_entropy_coding_is_refused_and_exports_are_listed_once() -> None:
    with pytest.raises(ValidationError, match="entropy-coded"):
        JobSpec(steps=[{"type": "quantize"}, {"type": "encode"}], export=["compressed-tensors"])
    with pytest.raises(ValidationError, match="twice"):
        JobSpec(steps=[{"type": "quantize"}], export=["compressed-tensors", "compressed-tensors"])
    both = JobSpec(steps=[{"type": "quantize"}], export=["onnx", "compressed-tensors"])
    assert both.export == ["onnx", "compressed-tensors"]


def test_mixed_precision_gets_one_group_per_width(tmp_path: Path) -> None:
    mixed = {"type": "quantize", "method": "mixed", "bits": [4, 8], "budget": {"avg_bits": 6.0},
             "granularity": "per_group", "group_size": 32, "include_embeddings": False, "calibration": CALIBRATION}
    state, artifact, export = compress_and_export([mixed], tmp_path)
    groups = quantization_config(export.folder)["config_groups"].values()
    widths = {state.encodings[f"{name}.weight"].meta["bits"]: group["weights"]["num_bits"]
              for group in groups for name in group["targets"]}
    assert sorted(widths.items()) == [(4, 4), (8, 8)]  # every module's group has its own chosen width
    assert sum(len(group["targets"]) for group in groups) == export.quantized_modules == 14
    ours, theirs = load_compressed(artifact), load_exported(export.folder)
    for name, weight in ours.named_parameters():
        assert torch.equal(theirs.get_parameter(name), weight), name


def test_job_writes_the_folder_into_the_artifact_and_checks_it_in_transformers(tmp_path: Path) -> None:
    folder = save_model_folder(tiny_llama(), tmp_path / "model")
    spec = JobSpec(steps=[INT4_G32], export=["compressed-tensors"])
    outcome = execute_job(folder, spec, tmp_path / "work", StepContext(), StepHooks(), {"job_id": "test"})
    after = outcome.metrics["after"]
    assert after["compressed_tensors_output_cosine"] == pytest.approx(after["output_cosine"], abs=1e-6)
    assert after["compressed_tensors"]["format"] == "pack-quantized"
    assert after["compressed_tensors"]["quantized_modules"] == 14
    names = zipfile.ZipFile(outcome.artifact).namelist()
    assert {"compressed-tensors/config.json", "compressed-tensors/model.safetensors"} <= set(names)
