"""The streaming engine: compress a model folder block by block, so peak memory follows the largest tensor (plus
one output shard being filled), not the model, and a model larger than the worker's RAM still compresses.

The model is built on the meta device (names, shapes, tied weights; no memory), the steps' selections come from the
same `select_modules` the in-memory handlers use, and each block's tensors are read from the memory-mapped input
shards in their stored dtype, upcast to float32 one tensor (or chunk of rows) at a time, encoded by the same
functions (`quantize_rtn`, `quantize_fp8`), and written to output shards of bounded size with
`model.safetensors.index.json`.
Plain tensors are stored in float32, as the in-memory path (which loads the model in float32) stores them, so both
engines write the same artifact. Only steps whose traits say `streams_per_tensor` can run here.
"""

import copy
import ctypes
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import groupby
from math import prod
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel

from core.compression import metrics
from core.compression.artifact import (
    WEIGHTS_FILE,
    copy_tokenizer_files,
    encoded_tensors,
    encoding_record,
    read_manifest,
    save_configs,
    write_manifest,
)
from core.compression.configs.base import StepConfig
from core.compression.configs.quantize import QuantizeFP8, QuantizeRTN
from core.compression.encoding import INT8_RTN, PACKED_INT, decode, quantize_rtn
from core.compression.modelio import (
    WEIGHTS_INDEX,
    check_named_files,
    meta_model,
    model_class_for,
    read_generation_config,
    read_model_config,
    weight_files,
)
from core.compression.quant.fp8 import quantize_fp8
from core.compression.quant.weights import selected_weights
from core.compression.rewrites import replay
from core.compression.select import held_back_note
from core.compression.spec import FAMILIES
from core.compression.state import Encoding, Rewrite, StepContext, StepReport
from core.errors import InvalidSpec, JobCancelled, UnsupportedModel

# An output shard is held in memory until it is written, so its size adds to the peak; 256 MiB of int4 output is
# ~1 GiB of bf16 input, ~140 files for a 70 B model.
DEFAULT_SHARD_BYTES = 256 * 1024**2
# Weights over this many elements are encoded by chunks of rows where each row is encoded on its own: the float32
# copy and the arithmetic's temporaries (~4x the float32 size for int4 groups) of a 70 B model's 1 B-parameter
# embedding would otherwise need ~20 GB at once; 4 M elements keep them near 80 MB.
CHUNK_ELEMENTS = 1 << 22
# The stored dtypes `read_upcast` reads by chunks of rows (safetensors' names).
FLOAT_DTYPES = frozenset({"BF16", "F16", "F32", "F64"})
# A name inside a numbered block (`model.layers.3.mlp.up_proj.weight`) belongs to that block (`model.layers.3`).
BLOCK_PREFIX = re.compile(r"^(.*?\.\d+)\.")

TensorEncoder = Callable[[Any, torch.Tensor], Encoding]
ManifestOf = Callable[[list[StepReport]], Mapping[str, Any]]
# The per-tensor arithmetic of each streamable step: the functions its in-memory handler calls.
TENSOR_ENCODERS: dict[type[StepConfig], TensorEncoder] = {
    QuantizeRTN: lambda config, weight: quantize_rtn(
        weight, config.bits, config.granularity, config.symmetric, config.columns_per_scale),
    QuantizeFP8: lambda config, weight: quantize_fp8(weight, config.granularity),
}


@dataclass
class PlannedTensor:
    """One tensor of the model: every state_dict name that views it, the name it is stored (and encoded) under, the
    steps that encode it in recipe order, and its meta-device shape and dtype."""

    names: list[str]
    stored: str
    steps: list[int]
    shape: torch.Size
    is_float: bool


@dataclass
class _StepTotals:
    tensors: int = 0
    params: int = 0
    original_bytes: int = 0
    stored_bytes: int = 0


@dataclass
class _Totals:
    """What the run learnt for compression.json and the step reports."""

    records: dict[str, dict[str, Any]]
    per_step: list[_StepTotals]


@dataclass
class ShardWriter:
    """Collects output tensors and writes them as a safetensors shard each time `max_bytes` would be exceeded."""

    out_dir: Path
    max_bytes: int
    pending: dict[str, torch.Tensor] = field(default_factory=dict)
    pending_bytes: int = 0
    files: list[Path] = field(default_factory=list)
    weight_map: dict[str, int] = field(default_factory=dict)
    total_bytes: int = 0

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending.update(tensors)
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        path = self.out_dir / f".partial-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, path, metadata={"format": "pt"})
        self.weight_map.update({name: len(self.files) for name in self.pending})
        self.files.append(path)
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        """Write the last shard, then give the shards their final names: model.safetensors when there is one,
        else `model-0000i-of-0000n.safetensors` and the index naming each tensor's shard."""
        if self.pending:
            self.flush()
        if len(self.files) == 1:
            self.files[0].rename(self.out_dir / WEIGHTS_FILE)
            return
        names = [f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors" for i in range(len(self.files))]
        for path, name in zip(self.files, names, strict=True):
            path.rename(self.out_dir / name)
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": {tensor: names[i] for tensor, i in sorted(self.weight_map.items())}}
        (self.out_dir / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")


def compress_streaming(model_dir: Path, steps: list[StepConfig], out_dir: Path, ctx: StepContext | None = None,
                       manifest: Mapping[str, Any] | ManifestOf | None = None,
                       max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[StepReport]:
    """Compress the model folder `model_dir` with `steps` into the artifact folder `out_dir` block by block, and
    return one report per step. The artifact is the one `save_compressed` writes for the same recipe (sharded when
    over `max_shard_bytes`); `manifest` goes into compression.json, or is made from the step reports when it is a
    function of them. Every step must have the `streams_per_tensor` trait (InvalidSpec otherwise); `ctx` gets
    progress per block and is polled for cancellation between blocks.

    Example: `compress_streaming(Path("llama-7b"), [QuantizeRTN(bits=4, granularity="per_group", group_size=128)],
    Path("out"))`.
    """
    check_streamable(steps)
    ctx = ctx or StepContext()
    check_named_files(model_dir)
    model = _meta_model(model_dir)
    tensors = plan_tensors(model, steps)
    sources = source_files(model_dir)
    check_coverage(tensors, sources)
    out_dir.mkdir(parents=True, exist_ok=True)
    totals = _Totals({}, [_StepTotals() for _ in steps])
    _stream_blocks(tensors, sources, steps, ShardWriter(out_dir, max_shard_bytes), totals, ctx)
    save_configs(model, out_dir)
    reports = [_step_report(model, step, step_totals)
               for step, step_totals in zip(steps, totals.per_step, strict=True)]
    fields = manifest(reports) if callable(manifest) else manifest
    write_manifest(out_dir, dict(fields or {}), totals.records, _aliases(tensors), [])
    copy_tokenizer_files(model_dir, out_dir)
    return reports


def check_streamable(steps: list[StepConfig]) -> None:
    """InvalidSpec unless every step encodes each weight on its own (the `streams_per_tensor` trait)."""
    refused = [f"step {index} ({step.tag()})" for index, step in enumerate(steps)
               if not step.traits.streams_per_tensor]
    if refused:
        streamable = [config.tag() for family in FAMILIES for config in family if config.traits.streams_per_tensor]
        raise InvalidSpec(f"the layer-by-layer engine cannot run {', '.join(refused)}: it needs the whole model or "
                          f"data; steps it runs: {', '.join(streamable)}", details={"refused": refused})


def _meta_model(model_dir: Path) -> PreTrainedModel:
    """The model on the meta device, configured as `load_model` configures the in-memory one (float32, the
    folder's generation config), so the configs written next to the weights are the same."""
    config = read_model_config(model_dir)
    model = meta_model(model_class_for(config), config)
    model.config.dtype = torch.float32  # what the in-memory path loads and stores plain tensors in
    generation_config = read_generation_config(model_dir)
    if generation_config is not None and model.can_generate():
        model.generation_config = generation_config
    return model


def plan_tensors(model: PreTrainedModel, steps: list[StepConfig]) -> list[PlannedTensor]:
    """Every tensor of the model's state_dict once, in state_dict order, with the steps that encode it; a tensor
    several names share is stored under the first name a step selected it by, else its first name (as
    `save_compressed` stores it)."""
    groups: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
        tensors[id(tensor)] = tensor
    encoders: dict[int, list[int]] = {}
    encoded_as: dict[int, str] = {}
    for index, step in enumerate(steps):
        for shared in selected_weights(model, step):
            encoders.setdefault(id(shared.weight), []).append(index)
            encoded_as.setdefault(id(shared.weight), shared.name)
    return [PlannedTensor(names, encoded_as.get(key, names[0]), encoders.get(key, []), tensors[key].shape,
                    tensors[key].is_floating_point()) for key, names in groups.items()]


def source_files(model_dir: Path) -> dict[str, Path]:
    """Each stored tensor name of the folder's safetensors files (checked as `load_model` checks them), mapped to
    its file; only the headers are read."""
    sources: dict[str, Path] = {}
    for file in weight_files(model_dir):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                if name in sources:
                    raise UnsupportedModel(f"{file.name} stores {name!r}, which another shard stores too")
                sources[name] = file
    return sources


def check_coverage(tensors: list[PlannedTensor], sources: Mapping[str, Path]) -> None:
    missing = [t.names[0] for t in tensors if not any(name in sources for name in t.names)]
    if missing:
        raise UnsupportedModel(f"the layer-by-layer engine needs every tensor stored under its state_dict name; "
                               f"missing: {', '.join(missing[:5])}", {"missing": missing[:20]})


def _stream_blocks(tensors: list[PlannedTensor], sources: Mapping[str, Path], steps: list[StepConfig],
                   writer: ShardWriter, totals: _Totals, ctx: StepContext) -> None:
    """Read, encode and write the model one block at a time; the writer's shards are named at the end."""
    blocks = [list(block) for _, block in groupby(tensors, key=lambda t: _block_of(t.names[0]))]
    for index, block in enumerate(blocks):
        if ctx.should_stop():
            raise JobCancelled(f"cancelled while compressing, before {_block_of(block[0].names[0])}")
        _write_block(block, sources, steps, writer, totals)
        return_freed_memory()
        ctx.report((index + 1) / len(blocks), f"compressed {_block_of(block[0].names[0])}")
    writer.finish()


def _write_block(block: list[PlannedTensor], sources: Mapping[str, Path], steps: list[StepConfig],
                 writer: ShardWriter, totals: _Totals) -> None:
    """Encode and queue each tensor of one block. Its own function so that the last stored tensor read (a view
    that keeps its file pages resident: the 7B head's 0.26 GB) is let go before the last shard is written."""
    for tensor, weight in _read_block(block, sources):
        writer.add(_output_tensors(tensor, weight, steps, totals))


def return_freed_memory() -> None:
    """glibc keeps freed heap memory for reuse, so without this the worker's RSS (what the pre-flight estimate and
    an operator's memory limit see) would climb to the high-water mark of every block before it; after a block is
    released, what it freed goes back to the system. A no-op where the C library has no malloc_trim (musl, macOS)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        return


def _block_of(name: str) -> str:
    match = BLOCK_PREFIX.match(name)
    return match.group(1) if match else name


def _read_block(block: list[PlannedTensor],
                sources: Mapping[str, Path]) -> Iterator[tuple[PlannedTensor, torch.Tensor]]:
    """Each tensor of the block in its stored dtype, as a view of its memory-mapped file: its pages are read as the
    encoder reaches them. The file is opened for each tensor: an open handle keeps every page read through it
    resident until it closes (a 7B block's 0.4 GB of bf16 pages), a closed one lets them go with the tensor."""
    for tensor in block:
        name = next(name for name in tensor.names if name in sources)
        if tensor.is_float and not tensor.steps:  # stored in float32 as it is: no view needed
            yield tensor, checked_tensor(tensor, name, read_upcast(sources[name], name))
            continue
        with safe_open(sources[name], framework="pt") as handle:
            value = handle.get_tensor(name)
        yield tensor, checked_tensor(tensor, name, value)


def read_upcast(file: Path, name: str) -> torch.Tensor:
    """Tensor `name` of safetensors `file`, a float one in float32, read by chunks of rows (each through its own
    handle) when it is over `CHUNK_ELEMENTS`: an upcast through one view kept the whole stored copy resident beside
    the float32 one (0.26 GB more for a 7B model's bf16 head). The values are those of `.float()`.

    Example: `read_upcast(Path("llama-7b/model-00003.safetensors"), "lm_head.weight")`.
    """
    with safe_open(file, framework="pt") as handle:
        part = handle.get_slice(name)
        shape, dtype = part.get_shape(), part.get_dtype()
        if dtype not in FLOAT_DTYPES or len(shape) < 2 or prod(shape) <= CHUNK_ELEMENTS:
            value = handle.get_tensor(name)
            return value.float() if value.is_floating_point() else value
    out = torch.empty(shape, dtype=torch.float32)
    rows = max(1, CHUNK_ELEMENTS // (prod(shape) // shape[0]))
    for start in range(0, shape[0], rows):
        with safe_open(file, framework="pt") as handle:
            out[start:start + rows] = handle.get_slice(name)[start:start + rows]
    return out


def checked_tensor(tensor: PlannedTensor, name: str, value: torch.Tensor) -> torch.Tensor:
    """`value`, once its shape and kind are those the model config needs."""
    if value.shape != tensor.shape or value.is_floating_point() != tensor.is_float:
        raise UnsupportedModel(f"{name} is stored as {value.dtype} {list(value.shape)}; the model config needs "
                               f"{'a float' if tensor.is_float else 'an integer'} tensor {list(tensor.shape)}")
    return value


def _output_tensors(tensor: PlannedTensor, weight: torch.Tensor, steps: list[StepConfig],
                    totals: _Totals) -> dict[str, torch.Tensor]:
    """What the artifact stores for one tensor: its last encoding's tensors, or the plain tensor. Each step
    encodes what the previous one decoded to, as the in-memory steps do on the decoded weights they leave."""
    encoding: Encoding | None = None
    for index in tensor.steps:
        if encoding is not None:
            weight = decode(encoding)
        encoding = _encode(steps[index], weight)
        _count(totals.per_step[index], weight, encoding)
    if encoding is None:  # stored as the in-memory path, which loads every float tensor in float32, stores it
        return {tensor.stored: weight.float().contiguous() if tensor.is_float else weight.contiguous()}
    totals.records[tensor.stored] = encoding_record(encoding)
    return encoded_tensors(tensor.stored, encoding)


def _encode(config: StepConfig, weight: torch.Tensor) -> Encoding:
    """`TENSOR_ENCODERS` on `weight` upcast to float32, by chunks of rows when rows are encoded independently
    (per channel or per group): each row's codes and scales are then the same as from the whole tensor."""
    encoder = TENSOR_ENCODERS[type(config)]
    rows = _chunk_rows(weight, config)
    if rows is None:
        return encoder(config, weight.float())
    return _concatenated([encoder(config, weight[start:start + rows].float())
                          for start in range(0, weight.shape[0], rows)], weight.shape)


def _chunk_rows(weight: torch.Tensor, config: Any) -> int | None:
    if weight.ndim != 2 or config.granularity == "per_tensor" or weight.numel() <= CHUNK_ELEMENTS:
        return None
    # A multiple of 8 rows: at any code width 8 codes fill whole bytes, so each chunk's packed codes end on a byte
    # boundary and the chunks' bytes laid end to end are the whole tensor's.
    return max(8, CHUNK_ELEMENTS // weight.shape[1] // 8 * 8)


def _concatenated(chunks: list[Encoding], shape: torch.Size) -> Encoding:
    """One encoding from those of consecutive row chunks: codes (flat or by row) and scales follow the rows."""
    first = chunks[0]
    tensors = {key: torch.cat([chunk.tensors[key] for chunk in chunks]) for key in first.tensors}
    # packed_int records the weight's shape in its meta; every other meta field is the same for each chunk.
    meta = {**first.meta, "shape": list(shape)} if "shape" in first.meta else first.meta
    return Encoding(first.format, tensors, meta)


def _count(step_totals: _StepTotals, weight: torch.Tensor, encoding: Encoding) -> None:
    step_totals.tensors += 1
    step_totals.params += weight.numel()
    step_totals.original_bytes += weight.numel() * weight.element_size()
    step_totals.stored_bytes += encoding.nbytes()


def _aliases(tensors: list[PlannedTensor]) -> dict[str, str]:
    """{name: stored name} for every other name of a shared tensor (tied embeddings), as `save_compressed`."""
    return {name: t.stored for t in tensors for name in t.names if name != t.stored}


def _step_report(model: PreTrainedModel, step: StepConfig, totals: _StepTotals) -> StepReport:
    ratio = totals.stored_bytes / totals.original_bytes if totals.original_bytes else 1.0
    metrics: dict[str, float | int | str] = {
        "tensors_quantized": totals.tensors, "params_quantized": totals.params,
        "original_bytes": totals.original_bytes, "stored_bytes": totals.stored_bytes, "stored_ratio": ratio}
    notes = [f"{step.tag()}: {totals.tensors} weights encoded layer by layer"]
    held_back = held_back_note(model, step)
    return StepReport(metrics=metrics, notes=notes if held_back is None else [*notes, held_back])


def block_output_cosines(model_dir: Path, artifact_dir: Path, tokens: int = 64, seed: int = 0) -> list[float]:
    """The output cosine of each numbered block (decoder layer) of the artifact `artifact_dir` vs the same block of
    the original `model_dir`, both run in float32 on one seeded random hidden state (2 rows of `tokens`): one
    block's weights at a time, read from the shards (the artifact's decoded from its packed tensors), so memory
    follows a block, not the model. It measures each block's own error, not how errors add up through the model.
    The cosine is of what each block adds to its input (output minus input): with the input included, the residual
    path dominates and int4 g32 on tiny_llama scored 0.999999, hiding the error.

    Example: `min(block_output_cosines(Path("llama-7b"), Path("job/model")))`.
    """
    model, rebuilt = _meta_model(model_dir), _meta_model(model_dir)
    original, compressed = source_files(model_dir), source_files(artifact_dir)
    manifest = read_manifest(artifact_dir)
    with torch.device("meta"):  # the artifact's structure (factored layers, ...), still without memory
        for record in manifest.rewrites:
            replay(rebuilt, Rewrite(record.kind, record.module, record.meta))
    hidden = torch.randn(2, tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    extra = _block_arguments(model, hidden)
    cosines = []
    for prefix in _numbered_blocks(model):
        reference = _run_block(model.get_submodule(prefix), prefix,
                               lambda name: _stored_tensors([name], original)[name], hidden, extra)
        candidate = _run_block(rebuilt.get_submodule(prefix), prefix,
                               lambda name: artifact_tensors([name], compressed, manifest.encodings)[name], hidden,
                               extra)
        cosines.append(metrics.output_cosine(reference - hidden, candidate - hidden))
    return cosines


def _names(block: torch.nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}.{name}" for name in block.state_dict()]


def _numbered_blocks(model: PreTrainedModel) -> list[str]:
    """The block prefixes in state_dict order (`model.layers.0`, ...), each once."""
    return list(dict.fromkeys(_block_of(name) for name in model.state_dict() if _block_of(name) != name))


def _block_arguments(model: PreTrainedModel, hidden: torch.Tensor) -> dict[str, Any]:
    """Rotary models compute the position embeddings once, outside the blocks, and hand them to every block."""
    rotary = next((module for name, module in model.named_modules() if name.endswith("rotary_emb")), None)
    if rotary is None:
        return {}
    positions = torch.arange(hidden.shape[1]).expand(hidden.shape[0], -1)
    with torch.no_grad():
        return {"position_embeddings": type(rotary)(model.config)(hidden, positions)}


def _stored_tensors(names: list[str], sources: Mapping[str, Path]) -> dict[str, torch.Tensor]:
    """The tensors `names` as stored, each read from its shard."""
    tensors = {}
    for name in names:
        with safe_open(sources[name], framework="pt") as handle:
            tensors[name] = handle.get_tensor(name)
    return tensors


def artifact_tensors(names: list[str], sources: Mapping[str, Path],
                      encodings: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The block's weights as `load_compressed` rebuilds them: encoded ones decoded from their packed tensors."""
    tensors = _stored_tensors([name for name in names if name not in encodings], sources)
    for name in names:
        if name in encodings:
            record = encodings[name]
            packed = _stored_tensors([f"{name}.{key}" for key in record.tensors], sources)
            encoding = Encoding(record.format, {key: packed[f"{name}.{key}"] for key in record.tensors}, record.meta)
            tensors[name] = decoded(encoding)
    return tensors


def decoded(encoding: Encoding) -> torch.Tensor:
    """`decode(encoding)`, by chunks of rows into one float32 tensor when each row is encoded on its own (packed_int
    per channel or per group, int8 per channel) and the weight is over `CHUNK_ELEMENTS`: a whole-tensor decode's
    temporaries (codes, expanded scales, products: ~4x the float32 size) were 1.9 GB for the int4 embedding of a
    7B model, a chunk's are ~80 MB. Each row is decoded by the same arithmetic, so the values are the same.

    Example: `decoded(quantize_rtn(weight, 4, "per_group", group_size=128))`.
    """
    shape = _row_encoded_shape(encoding)
    if shape is None or shape[0] * shape[1] <= CHUNK_ELEMENTS:
        return decode(encoding)
    out = torch.empty(shape, dtype=torch.float32, device=encoding.tensors["scale"].device)
    rows = max(8, CHUNK_ELEMENTS // shape[1] // 8 * 8)  # a multiple of 8 rows starts on a byte of packed codes
    for start in range(0, shape[0], rows):
        out[start:start + rows] = decode(_rows(encoding, start, min(start + rows, shape[0]), shape[1]))
    return out


def _row_encoded_shape(encoding: Encoding) -> tuple[int, int] | None:
    """(rows, columns) of an encoding whose rows decode on their own; None for any other."""
    if encoding.format == PACKED_INT and encoding.meta["granularity"] != "per_tensor":
        rows, columns = encoding.meta["shape"]
        return rows, columns
    codes, scale = encoding.tensors.get("qweight"), encoding.tensors.get("scale")
    if (encoding.format == INT8_RTN and encoding.meta.get("granularity") == "per_channel" and codes is not None
            and codes.ndim == 2 and scale is not None and scale.ndim == 2 and scale.shape[0] == codes.shape[0]):
        return codes.shape[0], codes.shape[1]
    return None


def _rows(encoding: Encoding, start: int, stop: int, columns: int) -> Encoding:
    """The encoding of rows `start:stop` (the inverse of `_concatenated`): per-row tensors sliced, and packed_int's
    flat codes from the byte where row `start` begins."""
    tensors = {key: tensor[start:stop] for key, tensor in encoding.tensors.items()}
    if encoding.format != PACKED_INT:
        return Encoding(encoding.format, tensors, encoding.meta)
    bits, codes = encoding.meta["bits"], encoding.tensors["qweight"]
    last = codes.numel() if stop == encoding.meta["shape"][0] else stop * columns * bits // 8
    tensors["qweight"] = codes[start * columns * bits // 8:last]
    return Encoding(PACKED_INT, tensors, {**encoding.meta, "shape": [stop - start, columns]})


@torch.no_grad()
def _run_block(block: torch.nn.Module, prefix: str,
               tensors: dict[str, torch.Tensor] | Callable[[str], torch.Tensor], hidden: torch.Tensor,
               extra: Mapping[str, Any]) -> torch.Tensor:
    """The meta block `prefix` run on the CPU in float32 on `hidden`, with its tensors from `tensors` (full names to
    stored tensors, consumed; or a function that reads one by full name). Each module that holds parameters of its
    own gets them (upcast as each is read) just before it runs and lets them go just after, so a 7B block costs its
    largest layer's float32 size (180 MB), not the block's (0.8 GB)."""
    read = tensors if callable(tensors) else tensors.pop
    real = copy.deepcopy(block)
    holders = parameter_holders(real)
    rest = [key for key in real.state_dict() if not any(not name or key.startswith(f"{name}.") for name in holders)]
    real.load_state_dict(_upcast(prefix, rest, read), strict=False, assign=True)  # buffers of modules without weights
    for name in holders:
        module = real.get_submodule(name)
        module.register_forward_pre_hook(_materialise(read, f"{prefix}.{name}" if name else prefix))
        module.register_forward_hook(_dematerialise)
    output = real(hidden, **extra)
    return output[0] if isinstance(output, tuple) else output


def parameter_holders(model: torch.nn.Module) -> list[str]:
    """The modules that hold parameters of their own (`model.layers.0.self_attn.q_proj`, `model.norm`, `lm_head`),
    in model order: the units a forward pass reads one at a time (`_run_block`, `streamed_model`)."""
    return [name for name, module in model.named_modules()
            if any(param is not None for param in module._parameters.values())]


def _materialise(read: Callable[[str], torch.Tensor], prefix: str) -> Callable[[torch.nn.Module, Any], None]:
    def load(module: torch.nn.Module, args: Any) -> None:
        missing = [key for key, tensor in module.state_dict().items() if tensor.is_meta]
        module.load_state_dict(_upcast(prefix, missing, read), strict=False, assign=True)
    return load


def _dematerialise(module: torch.nn.Module, args: Any, output: Any) -> None:
    module.to("meta")


def _upcast(prefix: str, keys: list[str], read: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """{key: the tensor of `prefix.key`, float32 when it is a float} for each of `keys`."""
    values = {}
    for key in keys:
        tensor = read(f"{prefix}.{key}")
        values[key] = tensor.float() if tensor.is_floating_point() else tensor
    return values
