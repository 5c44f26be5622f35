"""How much memory and time a job will take, from the model's size and the recipe alone (nothing is loaded).

Submission uses it to refuse a job no worker can hold and to size the job's time limits. The coefficients are
measured on Llama shapes (rtn, CPU); every other step is an upper-side guess from what it holds in memory, noted in
the estimate.

Example: `estimate_job(ModelFacts(num_parameters=1_100_000_000, weight_bytes=2_200_000_000),
[QuantizeRTN], "cpu", streaming_threshold=2 * 1024**3)` peaks near 8 GB of host RAM, in memory.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from core.compression.configs.base import StepConfig
from core.compression.configs.calibration import Reconstruction

Engine = Literal["in_memory", "streaming", "offloaded"]

GB = 1_000_000_000
IMPORTS_BYTES = int(0.4 * GB)  # torch + transformers imported in the job process (measured)
# The before/after measurements: the probe's logits (8 x 64 tokens x the vocabulary, float32) in their copies and the
# tokenizer. Without it SmolLM2-135M's rtn job (49k vocabulary) was estimated 1.27 GB in memory and 0.72 GB layer
# by layer against 1.74 and 1.16 measured (bench.big_calibrated --smollm2-peaks). The in-memory and offloaded terms
# add it; the streaming engine's measuring term scales with the largest tensor instead (MEASURED_TENSOR_COPIES).
PROBE_BYTES = int(0.4 * GB)
FP32_BYTES = 4
# The in-memory path holds the fp32 model plus the job's measuring copies (reference for latency, reloaded artifact):
# 3.42 GB peak for 0.40 B params and 7.01 GB for 1.10 B with rtn, i.e. 5.6-6.6 B/param above the imports and probe.
IN_MEMORY_BYTES_PER_PARAM = 6.5
# distill/lora hold teacher + student + gradients + Adam state: about 4 fp32 models where a plain step holds one.
TRAINING_EXTRA_BYTES_PER_PARAM = 3 * FP32_BYTES
# Calibrated steps (gptq, wanda, asvd, ...) keep activations and a d x d fp32 Hessian per Linear of one block: an
# upper-side guess of a quarter of the fp32 model.
CALIBRATION_EXTRA_BYTES_PER_PARAM = 1.0
# The streaming engine compresses with an output shard being filled (up to 256 MiB) or, larger at 7B, a tensor kept
# as it is (embeddings, head) read and upcast to float32 by chunks of rows. In a worker's pool process that costs twice
# the float32 tensor: the 7B shape's job through the API grew the pool process by 1.03 GB reading its 0.52 GB
# float32 embeddings, all of it released when they were written out (a bare process, bench.phase_peaks: 0.44 GB; the
# excess was not traced). SmolLM2 (a tied 28 M-parameter one, a 0.2 GB artifact: one shard pending to the end) 0.2 GB.
STREAM_SHARD_BYTES = 256 * 1024**2
KEPT_TENSOR_COPIES = 2.0
# The streaming engine measures (as the offloaded one does) with one module's weights in float32 at a time (read,
# upcast or decoded by chunks of rows), the largest being the embeddings or the head, next to the probe's logits,
# which follow the vocabulary as that tensor does: 0.77 GB above the imports at 7B widths (0.52 GB tensor), 0.19 GB
# on SmolLM2 (0.11).
MEASURED_TENSOR_COPIES = 1.5
# The block-offloading engine's measuring term keeps its fit from before db48690 (one float32 block, or half the part
# outside the blocks, 1.5 times, plus the probe), though it measures one module at a time too: it never sets the
# TinyLlama shape's peak (saving does), but sets SmolLM2's (0.88 GB against 0.99 measured before db48690), and which
# phase peaks there was not profiled. Re-fit it from bench.phase_peaks on an offloaded job.
OFFLOADED_MEASURED_BLOCK_COPIES = 1.5
# The block-offloading engine (measured on the TinyLlama-1.1B shape, gptq and sparsegpt, CPU): the steps' statistics
# per element of the block's Hessians (sum of in_features² over its Linears): gptq keeps float32 ones, sparsegpt and
# svd_llm float64 Gram matrices; the solver's float64 work on the largest of them (~0.6 of the sum for a Llama
# block: down_proj's) is the other transient.
STATISTICS_BYTES_PER_HESSIAN_ELEMENT = {"quantize:gptq": 4, "prune:sparsegpt": 8, "decompose:svd_llm": 8}
SOLVER_BYTES_PER_HESSIAN_ELEMENT = {"quantize:gptq": 10, "prune:sparsegpt": 10, "decompose:svd_llm": 10,
                                    "decompose:asvd": 4}
DEFAULT_CALIBRATION_TOKENS = 32 * 512  # the calibration block's defaults, assumed when only a step's class is given
ACTIVATION_COPIES = 2  # a block's inputs and its outputs, carried to the next block
RECONSTRUCT_ACTIVATION_COPIES = 2  # block reconstruction also carries the float model's stream and its block outputs
BLOCK_COPIES = 1.3  # the float32 block plus the stored tensor being upcast
# The artifact's part outside the blocks is written together (tied weights are stored once): in float32, in the
# output shard pending and as that shard's serialised bytes (measured 1.98 GB on the TinyLlama shape, 0.52 GB parts).
SAVED_OUTSIDE_COPIES = 3
FORWARD_TOKENS = 8 * 512  # gptq's mini-batch of 8 windows
FORWARD_BYTES_PER_TOKEN_FEATURE = 72  # attention and MLP intermediates of one forward (measured 0.6 GB at 4096 x 2048)
# Block reconstruction's backward keeps the forward's intermediates and their gradients: gptq with `reconstruct` on
# the TinyLlama shape peaked 0.55 GB above plain gptq while compressing (2.35 vs 1.80 GB, bench.phase_peaks, 6 layers,
# 16 x 512 tokens, 2026-12-05), 0.13 GB of it the two extra streams, the rest 0.7x the forward's transient.
RECONSTRUCT_FORWARD_FACTOR = 1.7
CUDA_CONTEXT_BYTES = int(0.5 * GB)
# Seconds per parameter and step, on a CPU worker; a GPU runs the same step about 10x faster (guesses on the safe side).
# The pool process has torch imported already; loading and saving the weights are in the per-parameter cost.
STARTUP_SECONDS = 1.0
SECONDS_PER_PARAM = {"plain": 5e-8, "trains": 1e-5}
# Calibrated steps run every calibration token through every block: seconds per parameter and token (1e-6 s per
# parameter at the default 32 x 512 tokens; SmolLM2-135M's gptq on 256 x 512 tokens took 1004 s, this gives 1080 s).
CALIBRATED_SECONDS_PER_PARAM_TOKEN = 1e-6 / DEFAULT_CALIBRATION_TOKENS
# Block reconstruction trains the block on those tokens for `epochs` (forward, backward, Adam): SmolLM2-135M's
# sparsegpt on 64 x 512 tokens with 2 epochs took 2059 s, about 1790 s of it reconstructing.
RECONSTRUCT_SECONDS_PER_PARAM_TOKEN_EPOCH = 2e-10
GPU_SPEEDUP = 10.0


@dataclass(frozen=True)
class BlockShape:
    """What the block-offloading engine's memory follows, read from the meta model at upload (`block_shape`)."""

    count: int  # repeated blocks (decoder layers)
    params: int  # parameters of the largest block
    outside_params: int  # parameters outside the blocks (embeddings, head, final norm), a tied one once
    hessian_elements: int  # sum of in_features² over that block's Linear layers (one Hessian each)
    hidden_size: int  # features of the hidden state the blocks pass on
    # parameters of the model's largest tensor (a Llama's embeddings or head), a tied one counted once; 0 in the
    # shapes stored before it was recorded: half the part outside the blocks is assumed (an untied Llama's)
    largest_params: int = 0


def block_shape(model: nn.Module) -> BlockShape | None:
    """The BlockShape of a model (on the meta device is enough): its blocks are the nn.ModuleList of more than one
    module holding the most parameters; None without one."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if not lists:
        return None
    blocks = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    largest = max(blocks, key=lambda b: sum(p.numel() for p in b.parameters()))
    linears = [m for m in largest.modules() if isinstance(m, nn.Linear)]
    params = sum(p.numel() for p in largest.parameters())
    inside = sum(p.numel() for p in blocks.parameters())
    return BlockShape(count=len(blocks), params=params,
                      outside_params=sum(p.numel() for p in model.parameters()) - inside,
                      hessian_elements=sum(m.in_features**2 for m in linears),
                      hidden_size=linears[0].in_features if linears else 0,  # a block's first Linear reads it
                      largest_params=max(p.numel() for p in model.parameters()))


@dataclass(frozen=True)
class ModelFacts:
    """What is known of a model without loading it: stored at upload (`num_parameters`, `weight_bytes`, and the
    `blocks` shape when it has repeated blocks), and the largest single tensor when the config was read (else
    assumed a fortieth of the weights, e.g. an embedding)."""

    num_parameters: int
    weight_bytes: int
    largest_tensor_bytes: int | None = None
    blocks: BlockShape | None = None


@dataclass(frozen=True)
class Estimate:
    peak_host_bytes: int
    peak_gpu_bytes: int
    seconds: float
    engine: Engine
    notes: list[str] = field(default_factory=list)


StepLike = StepConfig | type[StepConfig]


def estimate_job(model: ModelFacts, steps: Sequence[StepLike], device: Literal["cpu", "cuda"],
                 streaming_threshold: int, exports: bool = False) -> Estimate:
    """Peak host RAM, peak GPU memory and run time of a job running `steps` on `model`: the job's step configs (their
    calibration sizes count), or only their classes (the default calibration assumed); `exports`: the job asks for
    an export (which needs the whole model in memory)."""
    engine = choose_engine(model, steps, streaming_threshold, exports)
    seconds = _seconds(model, steps, device)
    if engine == "streaming":
        return Estimate(_streaming_peak(model), 0, seconds, engine,
                        ["streaming engine: one tensor and one output shard in memory at a time; measured one "
                         "layer's float32 weights at a time"])
    if engine == "offloaded" and model.blocks is not None:
        host, gpu = _offloaded_peak(model.blocks, steps, device)
        return Estimate(host, gpu, seconds, engine, [
            "block-offloading engine: one decoder block in float32 (the embeddings and head only while a step or a "
            f"measurement reads them), its calibration activations ({_carried_tokens(steps):,} tokens) "
            "and its per-layer statistics at a time"])
    host = _in_memory_peak(model, steps)
    gpu = host - IMPORTS_BYTES + CUDA_CONTEXT_BYTES if device == "cuda" else 0
    return Estimate(host, gpu, seconds, engine, _in_memory_notes(steps))


def choose_engine(model: ModelFacts, steps: Sequence[StepLike], streaming_threshold: int | None,
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
    """The larger of compressing (an output shard filling up, or the largest tensor kept in float32 as it is read)
    and measuring: both follow the model's largest tensor, never a block."""
    largest = FP32_BYTES * _largest_tensor_params(model)
    compressing = max(STREAM_SHARD_BYTES, int(KEPT_TENSOR_COPIES * largest))
    return IMPORTS_BYTES + max(compressing, _measuring_bytes(largest))


def _largest_tensor_params(model: ModelFacts) -> int:
    """Parameters of the model's largest tensor: recorded in its block shape, else half of the part outside the
    blocks, else from `largest_tensor_bytes` (or a fortieth of the weights) in the stored dtype."""
    if model.blocks is not None:
        return model.blocks.largest_params or model.blocks.outside_params // 2
    stored = model.largest_tensor_bytes or model.weight_bytes // 40
    return int(stored * model.num_parameters / max(model.weight_bytes, 1))


def _measuring_bytes(largest_fp32_bytes: int) -> int:
    """The streaming engine's measurements (`execute._measure_streamed`): one module's float32 weights at a time
    and the probe's logits, both following the largest tensor (embeddings or head) and the vocabulary."""
    return int(MEASURED_TENSOR_COPIES * largest_fp32_bytes)


def _offloaded_peak(blocks: BlockShape, steps: Sequence[StepLike], device: str) -> tuple[int, int]:
    """(host, GPU) peak of the block-offloading engine, the larger of its two phases. Compressing: one float32
    block, the carried activations and the steps' statistics, plus the larger of the two transients (a block's
    forward on a mini-batch, a solver's float64 work on the largest Hessian). Measuring: one block, or the
    embeddings or head (about half the part outside the blocks of an untied Llama), read and upcast."""
    reconstructs = any(_reconstructs(step) for step in steps)
    copies = ACTIVATION_COPIES + (RECONSTRUCT_ACTIVATION_COPIES if reconstructs else 0)
    carried = copies * _carried_tokens(steps) * blocks.hidden_size * FP32_BYTES
    stats = max(STATISTICS_BYTES_PER_HESSIAN_ELEMENT.get(step.tag(), 0) for step in steps) * blocks.hessian_elements
    solver = max(SOLVER_BYTES_PER_HESSIAN_ELEMENT.get(step.tag(), 0) for step in steps) * blocks.hessian_elements
    forward = (FORWARD_BYTES_PER_TOKEN_FEATURE * FORWARD_TOKENS * blocks.hidden_size
               * (RECONSTRUCT_FORWARD_FACTOR if reconstructs else 1.0))
    compressing = FP32_BYTES * BLOCK_COPIES * blocks.params + carried + stats + max(forward, solver)
    measuring = (FP32_BYTES * OFFLOADED_MEASURED_BLOCK_COPIES * max(blocks.params, blocks.outside_params // 2)
                 + PROBE_BYTES)
    saving = FP32_BYTES * SAVED_OUTSIDE_COPIES * blocks.outside_params
    on_device = int(max(compressing, measuring, saving))
    if device == "cuda":
        return IMPORTS_BYTES + STREAM_SHARD_BYTES + 2 * blocks.params * FP32_BYTES, CUDA_CONTEXT_BYTES + on_device
    return IMPORTS_BYTES + on_device, 0


def _in_memory_peak(model: ModelFacts, steps: Sequence[StepLike]) -> int:
    per_param = IN_MEMORY_BYTES_PER_PARAM + max((_extra_per_param(step) for step in steps), default=0.0)
    return IMPORTS_BYTES + PROBE_BYTES + int(model.num_parameters * per_param)


def _extra_per_param(step: StepLike) -> float:
    if step.traits.trains:
        return TRAINING_EXTRA_BYTES_PER_PARAM
    return CALIBRATION_EXTRA_BYTES_PER_PARAM if _calibrated(step) else 0.0


def _calibrated(step: StepLike) -> bool:
    return "calibration" in _config_class(step).model_fields


def _config_class(step: StepLike) -> type[StepConfig]:
    return step if isinstance(step, type) else type(step)


def _calibration_tokens(step: StepLike) -> int:
    """Tokens a calibrated step runs through each block: its own calibration size; a bare class, the defaults."""
    data = None if isinstance(step, type) else getattr(step, "calibration", None)
    return data.num_samples * data.seq_len if data is not None else DEFAULT_CALIBRATION_TOKENS


def _reconstructs(step: StepLike) -> Reconstruction | None:
    """The step's block reconstruction settings, or None (a bare class never reconstructs)."""
    return None if isinstance(step, type) else getattr(step, "reconstruct", None)


def _carried_tokens(steps: Sequence[StepLike]) -> int:
    return max((_calibration_tokens(step) for step in steps if _calibrated(step)), default=DEFAULT_CALIBRATION_TOKENS)


def _kind(step: StepLike) -> str:
    if step.traits.trains:
        return "trains"
    return "calibrated" if _calibrated(step) else "plain"


def _seconds(model: ModelFacts, steps: Sequence[StepLike], device: str) -> float:
    speedup = GPU_SPEEDUP if device == "cuda" else 1.0
    return STARTUP_SECONDS + sum(_step_seconds(model.num_parameters, step) for step in steps) / speedup


def _step_seconds(num_parameters: int, step: StepLike) -> float:
    kind = _kind(step)
    if kind != "calibrated":
        return num_parameters * SECONDS_PER_PARAM[kind]
    tokens = _calibration_tokens(step)
    reconstruct = _reconstructs(step)
    epochs = reconstruct.epochs if reconstruct is not None else 0
    return num_parameters * tokens * (CALIBRATED_SECONDS_PER_PARAM_TOKEN
                                      + epochs * RECONSTRUCT_SECONDS_PER_PARAM_TOKEN_EPOCH)


def _in_memory_notes(steps: Sequence[StepLike]) -> list[str]:
    notes = ["in-memory engine: the fp32 model and the job's measuring copies are held at once"]
    if any(step.traits.trains for step in steps):
        notes.append("a training step holds teacher, student and optimizer state (about 4 fp32 models)")
    elif any(_calibrated(step) for step in steps):
        notes.append("a calibrated step also holds activations and per-layer Hessians (an upper-side guess)")
    return notes
