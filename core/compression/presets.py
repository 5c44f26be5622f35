"""Named recipes: the best settings the benchmarks found (docs/benchmarks.md), under one word each, as
llm-compressor's schemes (`W4A16`) and Olive's presets give them.

A job names one (`"preset": "w4a16-gptq"`) instead of writing steps, with optional `overrides` merged into every
step that has the field (`{"calibration": {"dataset_id": "dst_..."}}` calibrates on the user's own text, which is
what moves pruning and low-bit results the most).
"""

from dataclasses import dataclass, field
from typing import Any

from core.compression.spec import config_class
from core.errors import InvalidSpec

# GPTQ then scales refitted to its codes, GPTQ again on them, refitted again (QuantizeGPTQ.refit_rounds)
REFIT_ROUNDS = 2
# Block-wise scale tuning after GPTQ: on SmolLM2 (64 calibration windows, same CPU) perplexity 39.53 -> 37.63.
SCALE_TUNING = {"epochs": 2, "lr": 0.005}
SPARSEGPT_CALIBRATION = {"num_samples": 64, "seq_len": 512}
# The recovery training of bench.distill_minilm (its checkpoint_every, raised there only to time the run, is left
# at the default here so a restarted job resumes)
DISTILL = {"type": "distill", "lr": 0.0007, "batch_size": 8, "seq_len": 32}
DEEP_DISTILL = {**DISTILL, "train_embeddings": True, "loss": {"hidden_mse": 1.0}}
# bench.gguf_smollm2's recipes: groups of 32 (GGUF's block), the embedding / lm_head in int8 (Q8_0)
GGUF_EMBEDDING = {"type": "quantize", "method": "rtn", "bits": 8, "granularity": "per_group", "group_size": 32,
                  "targets": ["model.embed_tokens", "lm_head"]}


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    steps: list[dict[str, Any]]
    measured: str  # what the benchmarks measured with it, and where
    export: list[str] = field(default_factory=list)  # formats the job adds to the artifact (JobSpec.export)


PRESETS = {preset.name: preset for preset in [
    Preset("w8a16-rtn", "int8 weights per channel (round to nearest), every Linear and the (tied) embedding; "
           "float activations: a quarter of the size for almost no quality",
           [{"type": "quantize", "method": "rtn", "bits": 8, "targets": ["*", "lm_head"],
             "include_embeddings": True}],
           "SmolLM2-135M: 0.252x size, perplexity 1.001x fp32; all-MiniLM-L6-v2: embedding cosine 0.9999 "
           "(docs/benchmarks.md, bench.quant_smollm2 and bench.quant_minilm)"),
    Preset("w4a16-gptq", "int4 weights in groups of 128 with zero points (GPTQ on 64 x 512 calibration tokens, "
           "the scales refitted to its codes, then tuned so that each block's outputs match the float model's); "
           "the output head and its tied embedding stay float",
           [{"type": "quantize", "method": "gptq", "bits": 4, "granularity": "per_group", "group_size": 128,
             "symmetric": False, "refit_rounds": REFIT_ROUNDS, "calibration": {"num_samples": 64, "seq_len": 512},
             "reconstruct": SCALE_TUNING}],
           "SmolLM2-135M, 0.315x size: through the API perplexity 37.63, 1.138x fp32 (95% CI 1.125-1.150, "
           "bench.presets_api); without the scale tuning 39.53 on the same CPU"),
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
    Preset("half-depth-distill", "a student with every other transformer layer (half the depth, the last layer "
           "kept), distilled from the original for 2,400 steps: about half the latency; the loss is the model "
           "kind's default (hidden states for encoders, token distributions for causal LMs); train on your own "
           "text with overrides {\"dataset_id\": ...} (the default corpus is Wikipedia)",
           [{**DISTILL, "student": {"fraction": 0.5}, "max_steps": 2400}],
           "all-MiniLM-L6-v2 (3 of 6 layers, hidden-state loss): latency 0.50x fp32, 0.766x size, embedding "
           "cosine 0.908 on held-out training text, 0.883 on review sentences (bench.distill_minilm --only "
           "student)"),
    Preset("deep-compression", "Han et al.'s chain for BERT-family encoders (its patterns name BertModel's "
           "modules): 50% global magnitude pruning with the embeddings, distilled; 4-bit k-means codebooks on the "
           "feed-forward layers, distilled; then on the embeddings and attention, distilled; Huffman-coded storage",
           [{"type": "prune", "method": "magnitude", "sparsity": 0.5, "scope": "global", "include_embeddings": True,
             "exclude": ["embeddings.position_embeddings", "embeddings.token_type_embeddings"]},
            {**DEEP_DISTILL, "max_steps": 3000},
            {"type": "quantize", "method": "kmeans", "bits": 4, "granularity": "per_channel",
             "targets": ["*.intermediate.dense", "*.output.dense"], "exclude": ["*.attention.*"]},
            {**DEEP_DISTILL, "max_steps": 1000},
            {"type": "quantize", "method": "kmeans", "bits": 4, "granularity": "per_column",
             "targets": ["embeddings.word_embeddings", "embeddings.position_embeddings"]},
            {"type": "quantize", "method": "kmeans", "bits": 4, "granularity": "per_tensor",
             "targets": ["embeddings.token_type_embeddings", "*.attention.*", "pooler.*"]},
            {**DEEP_DISTILL, "max_steps": 1000},
            {"type": "encode", "method": "huffman"}],
           "all-MiniLM-L6-v2: 0.099x size (8.96 of 90.87 MB), embedding cosine 0.951 on held-out training text, "
           "0.940 on review sentences (bench.distill_minilm --only chain)"),
    Preset("gguf-q4", "a GGUF file for llama.cpp / Ollama (Llama-family causal LMs): GPTQ int4 in groups of 32 "
           "on all 16 codes, as Q4_0 rounds (Q4_0), scales refitted to the codes, on every Linear of the blocks, "
           "the embedding / lm_head int8 (Q8_0)",
           [{"type": "quantize", "method": "gptq", "bits": 4, "granularity": "per_group", "group_size": 32,
             "full_range": True, "refit_rounds": REFIT_ROUNDS, "exclude": ["model.embed_tokens", "lm_head"],
             "calibration": {"num_samples": 128, "seq_len": 512}},
            GGUF_EMBEDDING],
           "SmolLM2-135M: model.gguf 91.7 MB, 0.170x the fp32 weights, perplexity 36.58 in PyTorch (1.19x fp32) and "
           "36.69 in llama.cpp, 0.975x llama.cpp's own Q4_0 (37.62; 95% CI 0.960-0.992 over 32 windows); decode "
           "1.70x the F16 GGUF (bench.llamacpp_smollm2)",
           export=["gguf"]),
    Preset("gguf-q8", "a GGUF file for llama.cpp / Ollama (Llama-family causal LMs): int8 in groups of 32 (Q8_0) "
           "on every Linear and the embedding, round to nearest, no calibration",
           [{"type": "quantize", "method": "rtn", "bits": 8, "granularity": "per_group", "group_size": 32,
             "targets": ["*", "lm_head"], "include_embeddings": True}],
           "SmolLM2-135M: model.gguf 144.8 MB, 0.269x the fp32 weights, perplexity 33.08 (1.001x fp32), every "
           "tensor bit-exact with the artifact (bench.gguf_smollm2)",
           export=["gguf"]),
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


def preset_job(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job fields of preset `name`: its `steps` (`expand_preset`) and, when it writes one, its `export`.

    Example: `preset_job("gguf-q8")` gives `{"steps": [...], "export": ["gguf"]}`.
    """
    steps = expand_preset(name, overrides)
    export = PRESETS[name].export
    return {"steps": steps, **({"export": list(export)} if export else {})}


def _merged(base: Any, value: Any) -> Any:
    if isinstance(base, dict) and isinstance(value, dict):
        return {**base, **{key: _merged(base.get(key), item) for key, item in value.items()}}
    return value
