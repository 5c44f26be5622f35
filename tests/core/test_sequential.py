"""The layer-by-layer engine writes the artifact the in-memory path writes, bit for bit, in bounded shards."""

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from core.compression import sequential
from core.compression.artifact import load_compressed, save_compressed
from core.compression.configs.base import StepConfig
from core.compression.configs.quantize import QuantizeFP8, QuantizeGPTQ, QuantizeRTN
from core.compression.modelio import load_model
from core.compression.pipeline import run_pipeline
from core.compression.sequential import compress_streaming
from core.compression.state import ModelState, StepContext
from core.errors import InvalidSpec, JobCancelled, UnsafeInput, UnsupportedModel
from tests.models import save_model_folder, save_sharded_folder, tiny_llama

SHARD_BYTES = 40_000  # tiny_llama's packed int4 output then spans several shards

RECIPES: dict[str, list[StepConfig]] = {
    "int8 per channel": [QuantizeRTN()],
    "int4 g32 asymmetric": [QuantizeRTN(bits=4, granularity="per_group", group_size=32, symmetric=False)],
    "int4 g32, tied weight under lm_head": [
        QuantizeRTN(bits=4, granularity="per_group", group_size=32, include_embeddings=False)],
    "int8 per tensor asymmetric, mlp excluded": [
        QuantizeRTN(granularity="per_tensor", symmetric=False, exclude=["*.mlp.*"])],
    "fp8 per channel": [QuantizeFP8()],
    "fp8 per tensor on mlp, then rtn int4 on the rest": [
        QuantizeFP8(granularity="per_tensor", targets=["*.mlp.*"]),
        QuantizeRTN(bits=4, granularity="per_group", group_size=32, exclude=["*.mlp.*"])],
}


def untied_bf16_llama() -> PreTrainedModel:
    """A 2-layer Llama with its own lm_head, stored in bf16 as big checkpoints are."""
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(1)
    return LlamaForCausalLM(config).eval().to(torch.bfloat16)


def in_memory_artifact(source: Path, steps: list[StepConfig], out: Path) -> Path:
    """What a job's in-memory path writes: load in fp32, run the pipeline, save."""
    state = ModelState(load_model(source))
    run_pipeline(state, steps, StepContext())
    return save_compressed(state, out, {"job_id": "job-1"}, source_dir=source)


def stored(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an artifact's safetensors files, shards merged."""
    return {name: t for file in sorted(folder.glob("*.safetensors")) for name, t in load_file(file).items()}


def assert_same_artifact(streamed: Path, in_memory: Path) -> None:
    expected, actual = stored(in_memory), stored(streamed)
    assert actual.keys() == expected.keys()
    assert all(actual[name].dtype == expected[name].dtype and torch.equal(actual[name], expected[name])
               for name in expected)
    for name in ("compression.json", "config.json", "generation_config.json"):
        assert (streamed / name).read_text() == (in_memory / name).read_text(), name
    decoded, reference = load_compressed(streamed).state_dict(), load_compressed(in_memory).state_dict()
    assert decoded.keys() == reference.keys()
    assert all(torch.equal(decoded[name], reference[name]) for name in reference)


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded input, row chunks", "single-file input"])
@pytest.mark.parametrize("recipe", RECIPES, ids=list(RECIPES))
def test_streamed_artifact_is_the_in_memory_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recipe: str,
                                                sharded: bool) -> None:
    if sharded:  # chunks of 32 rows: the embedding in 16, each projection in 2 to 4
        monkeypatch.setattr(sequential, "CHUNK_ELEMENTS", 2048)
    model = tiny_llama()
    source = save_sharded_folder(model, tmp_path / "src") if sharded else save_model_folder(model, tmp_path / "src")
    steps = RECIPES[recipe]
    compress_streaming(source, steps, tmp_path / "streamed", manifest={"job_id": "job-1"},
                       max_shard_bytes=SHARD_BYTES)
    assert_same_artifact(tmp_path / "streamed", in_memory_artifact(source, steps, tmp_path / "in-memory"))


def test_bf16_shards_with_an_untied_head_give_the_in_memory_artifact(tmp_path: Path) -> None:
    source = save_sharded_folder(untied_bf16_llama(), tmp_path / "src")
    steps: list[StepConfig] = [QuantizeRTN(bits=4, granularity="per_group", group_size=32)]
    compress_streaming(source, steps, tmp_path / "streamed", manifest={"job_id": "job-1"})
    assert_same_artifact(tmp_path / "streamed", in_memory_artifact(source, steps, tmp_path / "in-memory"))


def test_output_shards_are_bounded_and_indexed(tmp_path: Path) -> None:
    source = save_model_folder(tiny_llama(), tmp_path / "src")
    step = QuantizeRTN(bits=4, granularity="per_group", group_size=32, include_embeddings=True)
    [report] = compress_streaming(source, [step], tmp_path / "out", max_shard_bytes=SHARD_BYTES)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) > 1 and not (tmp_path / "out" / "model.safetensors").exists()
    assert shards == sorted(path.name for path in (tmp_path / "out").glob("model-*-of-*.safetensors"))
    contents = {name: load_file(tmp_path / "out" / name) for name in shards}
    assert index["weight_map"] == {tensor: name for name, tensors in contents.items() for tensor in tensors}
    sizes = [sum(t.numel() * t.element_size() for t in tensors.values()) for tensors in contents.values()]
    assert index["metadata"]["total_size"] == sum(sizes) and max(sizes) <= SHARD_BYTES
    assert report.metrics["tensors_quantized"] == 15  # 7 Linear per block x 2, and the tied embedding once


def test_a_step_without_the_trait_is_refused_before_any_work(tmp_path: Path) -> None:
    source = save_model_folder(tiny_llama(), tmp_path / "src")
    with pytest.raises(InvalidSpec, match=r"step 1 \(quantize:gptq\).*quantize:rtn, quantize:fp8"):
        compress_streaming(source, [QuantizeRTN(), QuantizeGPTQ()], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_progress_is_reported_per_block_and_cancellation_is_polled(tmp_path: Path) -> None:
    source = save_model_folder(tiny_llama(), tmp_path / "src")
    messages: list[str] = []
    compress_streaming(source, [QuantizeRTN()], tmp_path / "out",
                       StepContext(report=lambda fraction, message: messages.append(message)))
    assert messages == ["compressed model.embed_tokens.weight", "compressed model.layers.0",
                        "compressed model.layers.1", "compressed model.norm.weight"]
    with pytest.raises(JobCancelled, match="before model.embed_tokens.weight"):
        compress_streaming(source, [QuantizeRTN()], tmp_path / "again", StepContext(should_stop=lambda: True))


def test_a_tensor_missing_from_the_shards_is_refused(tmp_path: Path) -> None:
    source = save_sharded_folder(tiny_llama(), tmp_path / "src")
    index_path = source / "model.safetensors.index.json"
    index: dict[str, Any] = json.loads(index_path.read_text())
    dropped = index["weight_map"].pop("model.norm.weight")
    kept = load_file(source / dropped)
    kept.pop("model.norm.weight")
    save_file(kept, source / dropped, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    with pytest.raises(UnsupportedModel, match="missing: model.norm.weight"):
        compress_streaming(source, [QuantizeRTN()], tmp_path / "out")


def test_an_artifact_index_naming_a_file_outside_its_folder_is_refused(tmp_path: Path) -> None:
    source = save_model_folder(tiny_llama(), tmp_path / "src")
    out = tmp_path / "out"
    compress_streaming(source, [QuantizeRTN(bits=4, granularity="per_group", group_size=32)], out,
                       max_shard_bytes=SHARD_BYTES)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "../src/model.safetensors"
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafeInput, match="not a plain file name"):
        load_compressed(out)
