"""How much memory and time a job will take, from the model's size and the recipe alone (nothing is loaded).

Submission uses it to refuse a job no worker can hold and to size the job's time limits. The coefficients are
measured on Llama shapes (rtn, CPU); every other step is an upper-side guess from what it holds in memory, noted in
the estimate.

Example: `estimate_job(ModelFacts(num_parameters=1_100_000_000, weight_bytes=2_200_000_000),
[QuantizeRTN], "cpu", streaming_threshold=2 * 1024**3)` peaks near 7.6 GB of host RAM, in memory.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from core.compression.configs.base import StepConfig

Engine = Literal["in_memory", "streaming", "offloaded"]

GB = 1_000_000_000
IMPORTS_BYTES = int(0.4 * GB)  # torch + transformers imported in the job process (measured)
FP32_BYTES = 4
# The in-memory path holds the fp32 model plus the job's measuring copies (reference for latency, reloaded artifact):
# 3.42 GB peak for 0.40 B params and 7.01 GB for 1.10 B with rtn, i.e. 6.0-7.6 B/param above the imports.
IN_MEMORY_BYTES_PER_PARAM = 6.5
# distill/lora hold teacher + student + gradients + Adam state: about 4 fp32 models where a plain step holds one.
TRAINING_EXTRA_BYTES_PER_PARAM = 3 * FP32_BYTES
# Calibrated steps (gptq, wanda, asvd, ...) keep activations and a d x d fp32 Hessian per Linear of one block: an
# upper-side guess of a quarter of the fp32 model.
CALIBRATION_EXTRA_BYTES_PER_PARAM = 1.0
# The streaming engine holds one tensor, one output shard and the imports whatever the model's size (1.0-1.2 GB).
STREAM_SHARD_BYTES = 256 * 1024**2
CUDA_CONTEXT_BYTES = int(0.5 * GB)
# Seconds per parameter and step, on a CPU worker; a GPU runs the same step about 10x faster (guesses on the safe side).
# The pool process has torch imported already; loading and saving the weights are in the per-parameter cost.
STARTUP_SECONDS = 1.0
SECONDS_PER_PARAM = {"plain": 5e-8, "calibrated": 1e-6, "trains": 1e-5}
GPU_SPEEDUP = 10.0


@dataclass(frozen=True)
class ModelFacts:
    """What is known of a model without loading it: stored at upload (`num_parameters`, `weight_bytes`), and the
    largest single tensor when the config was read (else assumed a fifth of the weights, e.g. an embedding)."""

    num_parameters: int
    weight_bytes: int
    largest_tensor_bytes: int | None = None


@dataclass(frozen=True)
class Estimate:
    peak_host_bytes: int
    peak_gpu_bytes: int
    seconds: float
    engine: Engine
    notes: list[str] = field(default_factory=list)


def estimate_job(model: ModelFacts, steps: Sequence[type[StepConfig]], device: Literal["cpu", "cuda"],
                 streaming_threshold: int, exports: bool = False) -> Estimate:
    """Peak host RAM, peak GPU memory and run time of a job running `steps` (their config classes) on `model`;
    `exports`: the job asks for an export (which needs the whole model in memory)."""
    engine = choose_engine(model, steps, streaming_threshold, exports)
    seconds = _seconds(model, steps, device)
    if engine == "streaming":
        return Estimate(_streaming_peak(model), 0, seconds, engine,
                        ["streaming engine: one tensor and one output shard in memory at a time"])
    host = _in_memory_peak(model, steps)
    gpu = host - IMPORTS_BYTES + CUDA_CONTEXT_BYTES if device == "cuda" else 0
    return Estimate(host, gpu, seconds, engine, _in_memory_notes(steps))


def choose_engine(model: ModelFacts, steps: Sequence[type[StepConfig]], streaming_threshold: int | None,
                  exports: bool = False) -> Engine:
    """The engine `execute_job` runs a job on: for weights over `streaming_threshold` (None: never) and no export,
    "streaming" when every step encodes tensor by tensor, "offloaded" when every step runs block by block;
    otherwise "in_memory"."""
    if streaming_threshold is None or exports or not steps or model.weight_bytes <= streaming_threshold:
        return "in_memory"
    if all(step.traits.streams_per_tensor for step in steps):
        return "streaming"
    return "offloaded" if all(step.traits.runs_by_block for step in steps) else "in_memory"


def _streaming_peak(model: ModelFacts) -> int:
    largest = model.largest_tensor_bytes or model.weight_bytes // 40
    # the tensor being encoded is held as read and as its encoding (measured 1.0-1.2 GB for Llama-7B shapes)
    return IMPORTS_BYTES + STREAM_SHARD_BYTES + 2 * largest


def _in_memory_peak(model: ModelFacts, steps: Sequence[type[StepConfig]]) -> int:
    per_param = IN_MEMORY_BYTES_PER_PARAM + max((_extra_per_param(step) for step in steps), default=0.0)
    return IMPORTS_BYTES + int(model.num_parameters * per_param)


def _extra_per_param(step: type[StepConfig]) -> float:
    if step.traits.trains:
        return TRAINING_EXTRA_BYTES_PER_PARAM
    return CALIBRATION_EXTRA_BYTES_PER_PARAM if _calibrated(step) else 0.0


def _calibrated(step: type[StepConfig]) -> bool:
    return "calibration" in step.model_fields


def _kind(step: type[StepConfig]) -> str:
    if step.traits.trains:
        return "trains"
    return "calibrated" if _calibrated(step) else "plain"


def _seconds(model: ModelFacts, steps: Sequence[type[StepConfig]], device: str) -> float:
    per_param = sum(SECONDS_PER_PARAM[_kind(step)] for step in steps)
    speedup = GPU_SPEEDUP if device == "cuda" else 1.0
    return STARTUP_SECONDS + model.num_parameters * per_param / speedup


def _in_memory_notes(steps: Sequence[type[StepConfig]]) -> list[str]:
    notes = ["in-memory engine: the fp32 model and the job's measuring copies are held at once"]
    if any(step.traits.trains for step in steps):
        notes.append("a training step holds teacher, student and optimizer state (about 4 fp32 models)")
    elif any(_calibrated(step) for step in steps):
        notes.append("a calibrated step also holds activations and per-layer Hessians (an upper-side guess)")
    return notes
