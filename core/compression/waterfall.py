"""What each step of a job cost (the per-step waterfall), where the artifact's bytes went, and how far each weight
moved: the numbers the job report (core.service.reports) draws.

Pure library: the engines in core.compression.execute call these; the worker only stores what comes back (each
step's `waterfall` record lands in that step's metrics).
"""

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from core.compression import metrics
from core.compression.artifact import read_manifest
from core.compression.evaluate import StepQuality
from core.compression.state import ModelState

WATERFALL = "waterfall"  # the key of a step's metrics that holds its record
LATENCY_WARMUP, LATENCY_RUNS = 1, 3  # one step's latency: fewer runs than the final before/after timing
IN_MEMORY_NOTE = ("measured on the model in memory right after the step: size_bytes = its weights as the artifact "
                  "would store them (packed where encoded, tied weights once); quality = {quality}; latency_ms = "
                  f"median of {LATENCY_RUNS} forwards of the probe batch of the model as it is in memory (decoded "
                  "float weights unless a step replaced modules)")
SKIPPED_NOTES = {
    "layer_by_layer": "not measured after each step: the layer-by-layer engine runs all steps together, one tensor "
                      "or block at a time, so no whole model exists between steps; the job's before/after numbers "
                      "are measured from the files",
    "offloaded": "not measured after each step: the block-offloading engine keeps the blocks on disk between "
                 "steps, and measuring the model would read every block again; each step's own stored_bytes "
                 "(the weights it touched) and the job's before/after numbers (from the files) still apply",
}
# safetensors dtype names -> bytes per element
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
               "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# The first pattern found in a tensor's name names its kind (checked in this order: `lm_head` before `head`).
KINDS = (
    ("embedding", ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings")),
    ("lm_head", ("lm_head",)),
    ("norm", ("norm", "ln_", "layernorm")),
    ("attention", ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value")),
    ("mlp", ("mlp", "gate_proj", "up_proj", "down_proj", "intermediate", "output.dense", "fc1", "fc2", "c_fc")),
    ("head", ("classifier", "pooler", "score", "head")),
)


def tensor_kind(name: str) -> str:
    """The part of the model a tensor belongs to, from its name: embedding, lm_head, norm, attention, mlp, head or
    other. Example: `tensor_kind("model.layers.0.self_attn.q_proj.weight")` is "attention"."""
    lowered = name.lower()
    return next((kind for kind, patterns in KINDS if any(p in lowered for p in patterns)), "other")


def stored_bytes(state: ModelState) -> int:
    """Bytes of the model's weights as `save_compressed` would store them: an encoded weight's packed tensors, every
    other state_dict tensor as it is, tensors shared by several names (tied weights) once."""
    state_dict = state.model.state_dict()
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, tensor in state_dict.items():
        memory = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        groups.setdefault((*memory, tensor.dtype), []).append(name)
    total = 0
    for names in groups.values():
        encoded = next((state.encodings[name] for name in names if name in state.encodings), None)
        tensor = state_dict[names[0]]
        total += encoded.nbytes() if encoded is not None else tensor.numel() * tensor.element_size()
    return total


@dataclass
class Waterfall:
    """Measures the model after each step (`run_pipeline(..., evaluate=waterfall)`): made with `start` before the
    first step, while the model is still the original."""

    cosine: Callable[[nn.Module], float]  # output cosine vs the original on the fixed probe inputs
    inputs: dict[str, torch.Tensor]  # the probe batch, timed for latency
    quality: StepQuality | None  # the evaluation set's subset when the job has `evaluate`
    original_bytes: int
    original_latency_ms: float  # timed like each step's, so the first bar compares with the others

    @classmethod
    def start(cls, state: ModelState, cosine: Callable[[nn.Module], float], inputs: dict[str, torch.Tensor],
              quality: StepQuality | None) -> "Waterfall":
        return cls(cosine, inputs, quality, stored_bytes(state), _latency_ms(state.model, inputs))

    def __call__(self, state: ModelState) -> dict[str, Any]:
        size, cosine = stored_bytes(state), self.cosine(state.model)
        quality = "the probe's output cosine vs the original (the job has no `evaluate`)"
        record: dict[str, Any] = {
            "size_bytes": size, "original_size_bytes": self.original_bytes,
            "size_ratio": round(size / self.original_bytes, 6) if self.original_bytes else None,
            "output_cosine": cosine,
            "latency_ms": _latency_ms(state.model, self.inputs), "original_latency_ms": self.original_latency_ms,
        }
        if self.quality is not None:
            record["quality"] = self.quality.measure(state.model)
            record["quality_subset"] = quality = self.quality.subset
        record["note"] = IN_MEMORY_NOTE.format(quality=quality)
        return {"output_cosine": cosine, WATERFALL: record}


def _latency_ms(model: nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    return metrics.median_latency_ms(model, inputs, LATENCY_WARMUP, LATENCY_RUNS)


def skipped(engine: str) -> dict[str, Any]:
    """The waterfall record of a step on an engine that cannot measure the model between steps (and why)."""
    return {"size_bytes": None, "output_cosine": None, "latency_ms": None, "engine": engine,
            "note": SKIPPED_NOTES[engine]}


def byte_breakdown(folder: Path) -> dict[str, Any]:
    """Where an artifact folder's weight bytes went, by tensor kind (`tensor_kind`) and by encoding (the manifest's
    format of an encoded weight, else `plain <dtype>`), read from the safetensors headers (nothing is loaded)."""
    encodings = read_manifest(folder).encodings
    owners = {f"{name}.{key}": name for name, record in encodings.items() for key in record.tensors}
    by_kind: Counter[str] = Counter()
    by_encoding: Counter[str] = Counter()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as weights:
            for key in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                sliced = weights.get_slice(key)
                nbytes = math.prod(sliced.get_shape()) * DTYPE_BYTES.get(sliced.get_dtype(), 4)
                owner = owners.get(key)  # the encoded weight this tensor is part of (`<name>.inner.qweight`, ...)
                encoding = encodings[owner].format if owner else f"plain {sliced.get_dtype().lower()}"
                by_kind[tensor_kind(owner or key)] += nbytes
                by_encoding[encoding] += nbytes
    return {"total_bytes": sum(by_kind.values()), "by_kind": dict(by_kind.most_common()),
            "by_encoding": dict(by_encoding.most_common()),
            "note": "tensor bytes from the artifact's safetensors headers (file headers not counted); kind from "
                    "each tensor's name, encoding from compression.json"}


def weight_errors(original: nn.Module, artifact: nn.Module) -> dict[str, float]:
    """Relative error ||W_artifact - W_original|| / ||W_original|| of every matrix both models hold under the same
    name and shape (a factored or removed layer has no counterpart and is left out)."""
    theirs = dict(artifact.named_parameters())
    errors = {}
    with torch.no_grad():
        for name, weight in original.named_parameters():
            other = theirs.get(name)
            if weight.dim() != 2 or other is None or other.shape != weight.shape:
                continue
            norm = weight.float().norm().item()
            errors[name] = (other.float() - weight.float()).norm().item() / norm if norm else 0.0
    return errors
