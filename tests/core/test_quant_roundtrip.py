"""Every weight-only method: save the artifact, load it back with load_compressed, get the same outputs."""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel

from core.compression.artifact import load_compressed, save_compressed
from core.compression.metrics import model_outputs, probe_inputs, weights_size_bytes
from tests.core.quant_helpers import quantize_with
from tests.models import save_model_folder, tiny_bert, tiny_llama

CALIBRATION = {"num_samples": 4, "seq_len": 16}
METHODS = {
    "rtn int4 g16 asym": ({"bits": 4, "granularity": "per_group", "group_size": 16, "symmetric": False}, 0.2),
    "rtn int3 per-row": ({"bits": 3}, 0.15),
    "kmeans int4 per-row": ({"method": "kmeans", "bits": 4}, 0.3),
    "gptq int4 g16": ({"method": "gptq", "group_size": 16, "calibration": CALIBRATION}, 0.2),
    "fp8": ({"method": "fp8"}, 0.3),
    "mixed 4/8": ({"method": "mixed", "bits": [4, 8], "budget": {"avg_bits": 5}, "calibration": CALIBRATION}, 0.25),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
def test_saved_artifact_loads_back_bit_identical_and_small(
    tmp_path: Path, build: Callable[[], PreTrainedModel], method: str
) -> None:
    fields, max_ratio = METHODS[method]
    fields = {**fields, "targets": ["*", "lm_head"]}  # a causal LM's (tied) head too: it is kept unless named
    state, _ = quantize_with(build(), **fields)
    folder = save_compressed(state, tmp_path / "artifact", {"steps": [fields]})
    loaded = load_compressed(folder)
    inputs = probe_inputs(state.model)
    assert torch.equal(model_outputs(state.model, inputs), model_outputs(loaded, inputs))
    fp32_size = weights_size_bytes(save_model_folder(build(), tmp_path / "fp32"))
    assert weights_size_bytes(folder) < max_ratio * fp32_size


def test_packed_codes_are_what_the_file_holds(tmp_path: Path) -> None:
    state, _ = quantize_with(tiny_llama(), bits=4, granularity="per_group", group_size=32)
    stored = load_file(save_compressed(state, tmp_path / "artifact", {}) / "model.safetensors")
    qweight = stored["model.layers.0.mlp.down_proj.weight.qweight"]
    assert qweight.dtype == torch.uint8 and qweight.numel() == 64 * 128 // 2
    assert stored["model.layers.0.mlp.down_proj.weight.scale"].dtype == torch.float16
