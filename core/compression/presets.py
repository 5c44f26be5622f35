"""Named recipes: the best settings the benchmarks found (docs/benchmarks.md), under one word each, as
llm-compressor's schemes (`W4A16`) and Olive's presets give them.

A job names one (`"preset": "w4a16-gptq"`) instead of writing steps, with optional `overrides` merged into every
step that has the field (`{"calibration": {"dataset_id": "dst_..."}}` calibrates on the user's own text, which is
what moves pruning and low-bit results the most).
"""

from dataclasses import dataclass
from typing import Any

from core.compression.spec import config_class
from core.errors import InvalidSpec

GPTQ_CALIBRATION = {"num_samples": 256, "seq_len": 512}
SPARSEGPT_CALIBRATION = {"num_samples": 64, "seq_len": 512}


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    steps: list[dict[str, Any]]
    measured: str  # what the benchmarks measured with it, and where


PRESETS = {preset.name: preset for preset in [
    Preset("w8a16-rtn", "int8 weights per channel (round to nearest), every Linear and the (tied) embedding; "
           "float activations: a quarter of the size for almost no quality",
           [{"type": "quantize", "method": "rtn", "bits": 8, "targets": ["*", "lm_head"],
             "include_embeddings": True}],
           "SmolLM2-135M: 0.252x size, perplexity 1.001x fp32; all-MiniLM-L6-v2: embedding cosine 0.9999 "
           "(docs/benchmarks.md, bench.quant_smollm2 and bench.quant_minilm)"),
    Preset("w4a16-gptq", "int4 weights in groups of 128 with zero points (GPTQ on 256 x 512 calibration tokens); "
           "the output head and its tied embedding stay float",
           [{"type": "quantize", "method": "gptq", "bits": 4, "granularity": "per_group", "group_size": 128,
             "symmetric": False, "calibration": GPTQ_CALIBRATION}],
           "SmolLM2-135M: perplexity 37.97, 1.149x fp32, 0.315x size (bench.quant_smollm2)"),
    Preset("w8a8-smoothquant", "int8 weights and int8 activations (SmoothQuant alpha 0.75, dynamic activation "
           "ranges): int8 GEMMs on CPUs with VNNI/AMX",
           [{"type": "quantize", "method": "smoothquant", "alpha": 0.75,
             "calibration": {"num_samples": 16, "seq_len": 256}}],
           "SmolLM2-135M: perplexity 1.062x fp32, 0.41x size (bench.w8a8_smollm2)"),
    Preset("int8-cpu-dynamic", "int8 weights and activations quantized per input at run time, no calibration: "
           "for encoders (sentence embeddings, classifiers) on CPU",
           [{"type": "quantize", "method": "dynamic"}],
           "all-MiniLM-L6-v2: int8 GEMM speed-up over fp32 in bench.w8a8_minilm; on SmolLM2 perplexity 1.69x: "
           "use w8a8-smoothquant for LLMs"),
    Preset("sparse50-sparsegpt", "50% unstructured sparsity (SparseGPT on 64 x 512 tokens, each block then "
           "reconstructed): a smaller file, not a faster model with dense kernels; calibrate on your own text "
           "with overrides {\"calibration\": {\"dataset_id\": ...}}",
           [{"type": "prune", "method": "sparsegpt", "sparsity": 0.5, "calibration": SPARSEGPT_CALIBRATION,
             "reconstruct": {"epochs": 2, "lr": 0.0003}}],
           "SmolLM2-135M, calibrated in domain: perplexity 1.36x fp32 (bench.prune_smollm2)"),
    Preset("2of4-sparsegpt", "2:4 semi-structured sparsity (SparseGPT): the pattern sparse tensor cores run",
           [{"type": "prune", "method": "sparsegpt", "pattern": "2:4", "calibration": SPARSEGPT_CALIBRATION}],
           "SmolLM2-135M, calibrated in domain: perplexity 3.00x fp32 (bench.prune_smollm2)"),
]}


def expand_preset(name: str, overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The steps of preset `name` with `overrides` merged into each step that has the field (nested objects
    merged key by key). InvalidSpec names an unknown preset, or an override no step of the preset takes.

    Example: `expand_preset("w4a16-gptq", {"calibration": {"dataset_id": "dst_1"}})`.
    """
    preset = PRESETS.get(name)
    if preset is None:
        raise InvalidSpec(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}", details={"preset": name})
    overrides = overrides or {}
    steps = [dict(step) for step in preset.steps]
    unused = set(overrides)
    for step in steps:
        config = config_class(step)
        assert config is not None, step  # every preset names its step's config (tests/core/test_presets.py)
        fields = config.model_fields
        for key, value in overrides.items():
            if key in fields:
                step[key] = _merged(step.get(key), value)
                unused.discard(key)
    if unused:
        raise InvalidSpec(f"preset {name!r} has no step that takes {', '.join(sorted(unused))}",
                          details={"preset": name, "unused_overrides": sorted(unused)})
    return steps


def _merged(base: Any, value: Any) -> Any:
    if isinstance(base, dict) and isinstance(value, dict):
        return {**base, **{key: _merged(base.get(key), item) for key, item in value.items()}}
    return value
