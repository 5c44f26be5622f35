"""Blocks offloaded to disk: the calibrated steps (gptq, wanda, sparsegpt, asvd, svd_llm, mixed, the W8A8 steps) on a
model larger than memory, run by the same handlers as in memory.

The model is built with its parameters on the meta device and its buffers real (rotary tables are computed, not
stored). Everything outside the repeated blocks (embeddings, final norm, lm_head) is read from the shards in
float32, as `load_model` would. A block's weights are read only when a block runner reaches it (`load`), in the
stored dtype, upcast to float32 for the block's compute, and let go once the runner has computed the next block's
inputs (`release`): the block's current weights go to a scratch folder (encoded ones as their packed tensors), its
parameters back to the meta device. Parameter objects are swapped in place (`torch.utils.swap_tensors`), never
replaced, so selections made on the meta model stay valid. A later step (or the final write) reads a released block
back from the scratch folder, so recipes of several block-by-block steps work too.

Peak memory is the part outside the blocks, one block in float32, the calibration activations and the step's own
statistics (GPTQ's Hessians), not the model.
"""

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils import swap_tensors
from transformers import PreTrainedModel

from core.compression.artifact import (
    copy_tokenizer_files,
    encoded_tensors,
    encoding_record,
    packed_tensors,
    save_configs,
    write_manifest,
)
from core.compression.modelio import (
    check_named_files,
    model_class_for,
    parameters_on_meta,
    read_generation_config,
    read_model_config,
)
from core.compression.sequential import (
    DEFAULT_SHARD_BYTES,
    PlannedTensor,
    ShardWriter,
    check_coverage,
    checked_tensor,
    decoded,
    plan_tensors,
    return_freed_memory,
    source_files,
)
from core.compression.sparsity.blockwise import transformer_blocks
from core.compression.state import Encoding, ModelState
from core.errors import UnsupportedModel


@dataclass
class DiskBlocks:
    """The `BlockResidency` of a model whose blocks are read from the input shards, or from `scratch` once a step
    has released them: the blocks under `prefix` (`model.layers`), and the `parts` outside them that hold
    parameters (`model.embed_tokens`, `lm_head`), which move the same way. A part a forward pass needs (the
    embeddings, to compute the first block's inputs) is read when the pass reaches it and let go, unchanged, when
    the next block is loaded: a 7B model's float32 embeddings and head are 1 GB that no block runner needs."""

    prefix: str
    sources: Mapping[str, Path]
    stored_as: Mapping[str, str]  # each state_dict name -> the name its tensor is stored under in `sources`
    scratch: Path
    device: torch.device
    parts: list[str] = field(default_factory=list)
    released: set[str] = field(default_factory=set)
    in_forward: dict[str, nn.Module] = field(default_factory=dict)  # parts loaded by a forward pass

    def load(self, name: str, block: nn.Module, state: ModelState) -> None:
        """Put block (or part) `name`'s current weights (and, after a step, its encodings) on the device; a
        weight already there (one a tied part shares) is left as it is."""
        if self.in_blocks(name):
            self._drop_forward_parts(state)
        values = self._released(name, state) if name in self.released else self._original(name, block)
        wanted = not_loaded(block)
        for key, value in values.items():
            if key.removeprefix(name + ".") in wanted:
                assign_tensor(block, key.removeprefix(name + "."), value.to(self.device))

    def attach(self, state: ModelState) -> None:
        """Read each part when a forward pass of `state.model` reaches it."""
        for part in self.parts:
            state.model.get_submodule(part).register_forward_pre_hook(self._forward_loader(part, state))

    def _forward_loader(self, part: str, state: ModelState) -> Callable[[nn.Module, Any], None]:
        def load(module: nn.Module, args: Any) -> None:
            if not_loaded(module):
                self.load(part, module, state)
                self.in_forward[part] = module
        return load

    @contextmanager
    def whole_model_passes(self, state: ModelState) -> Iterator[None]:
        """While active, a forward pass reads each block that is not in memory when the pass reaches it and
        discards it after (read-only passes: the W8A8 steps' statistics, mixed's reference); a block a runner has
        loaded is left to the runner."""
        hooks = []
        for name, block in self.blocks(state.model):
            hooks.append(block.register_forward_pre_hook(self._block_reader(name, state)))
            hooks.append(block.register_forward_hook(self._block_dropper(name, state)))
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            self._drop_forward_parts(state)

    def _block_reader(self, name: str, state: ModelState) -> Callable[[nn.Module, Any], None]:
        def load(block: nn.Module, args: Any) -> None:
            if any(param.is_meta for param in block.parameters()):
                self.load(name, block, state)
                self.in_forward[name] = block
        return load

    def _block_dropper(self, name: str, state: ModelState) -> Callable[[nn.Module, Any, Any], None]:
        def drop(block: nn.Module, args: Any, output: Any) -> None:
            if self.in_forward.pop(name, None) is not None:
                self.discard(name, block, state)
                return_freed_memory()
        return drop

    def _drop_forward_parts(self, state: ModelState) -> None:
        for part, module in self.in_forward.items():
            self.discard(part, module, state)
        self.in_forward.clear()

    def release(self, name: str, block: nn.Module, state: ModelState) -> None:
        """Write block `name`'s weights and encodings to the scratch folder and return its parameters to meta."""
        encodings = {key: state.encodings.pop(key) for key in list(state.encodings) if key.startswith(name + ".")}
        tensors: dict[str, torch.Tensor] = {}
        for key, param in block.named_parameters(prefix=name):
            if key in encodings:
                tensors.update(encoded_tensors(key, encodings[key]))
            else:
                tensors[key] = param.detach().cpu().contiguous()
        self.scratch.mkdir(parents=True, exist_ok=True)
        save_file(tensors, self.scratch / f"{name}.safetensors")
        records = {key: encoding_record(encoding) for key, encoding in encodings.items()}
        (self.scratch / f"{name}.json").write_text(json.dumps(records), encoding="utf-8")
        # What stays behind is each encoding's shape on the meta device: the steps' reports count its bytes, and
        # later steps see that the weight is encoded, without holding its tensors.
        state.encodings.update({key: _on_meta(encoding) for key, encoding in encodings.items()})
        self.released.add(name)
        unload_block(block)
        return_freed_memory()

    def discard(self, name: str, block: nn.Module, state: ModelState) -> None:
        """Let block `name` go without writing it: what a read-only pass looked at stays as it was stored."""
        for key in [key for key in state.encodings if key.startswith(name + ".")]:
            state.encodings[key] = _on_meta(state.encodings[key])
        unload_block(block)

    def blocks(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        blocks = model.get_submodule(self.prefix)
        assert isinstance(blocks, nn.ModuleList)
        for index, block in enumerate(blocks):
            yield f"{self.prefix}.{index}", block

    def in_blocks(self, name: str) -> bool:
        return name.startswith(self.prefix + ".")

    def block_of(self, model: nn.Module, name: str) -> tuple[str, nn.Module] | None:
        """(`model.layers.3`, that block) for a module or parameter name inside it, or the part holding it
        (`lm_head`); None for anything else."""
        if self.in_blocks(name):
            block = f"{self.prefix}.{name[len(self.prefix) + 1:].split('.')[0]}"
            return block, model.get_submodule(block)
        part = max((p for p in self.parts if name == p or name.startswith(p + ".")), key=len, default=None)
        return None if part is None else (part, model.get_submodule(part))

    def _original(self, name: str, block: nn.Module) -> dict[str, torch.Tensor]:
        """The block's parameters and stored buffers as the input shards hold them, upcast to float32."""
        wanted = [f"{name}.{key}" for key in block.state_dict(keep_vars=True)]
        return {key: value.float() if value.is_floating_point() else value
                for key, value in self._stored(wanted, block, name).items()}

    def _stored(self, names: list[str], block: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
        shapes = block.state_dict(keep_vars=True)
        values = {}
        for key in names:
            stored = self.stored_as[key]
            expected = shapes[key.removeprefix(prefix + ".")]
            planned = PlannedTensor([key], stored, [], expected.shape, expected.is_floating_point())
            with safe_open(self.sources[stored], framework="pt") as handle:
                values[key] = checked_tensor(planned, stored, handle.get_tensor(stored))
        return values

    def _released(self, name: str, state: ModelState) -> dict[str, torch.Tensor]:
        """The block as a step released it: plain tensors, and encoded ones decoded (their encodings restored)."""
        records = json.loads((self.scratch / f"{name}.json").read_text(encoding="utf-8"))
        with safe_open(self.scratch / f"{name}.safetensors", framework="pt") as handle:
            stored = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        values = {}
        for key, record in records.items():
            tensors = {part: stored.pop(f"{key}.{part}") for part in record["tensors"]}
            state.encodings[key] = Encoding(record["format"], {part: t.to(self.device) for part, t in tensors.items()},
                                            record["meta"])
            values[key] = decoded(state.encodings[key])
        return {**stored, **values}


def outside_parts(model: nn.Module, prefix: str) -> list[str]:
    """The modules outside the blocks under `prefix` that hold parameters of their own (`model.embed_tokens`,
    `model.norm`, `lm_head`), in model order."""
    return [name for name, module in model.named_modules()
            if name and not (name == prefix or name.startswith(prefix + "."))
            and any(param is not None for param in module._parameters.values())]


def not_loaded(module: nn.Module) -> set[str]:
    """The state_dict keys of `module` a load must fill: its parameters still on the meta device, and its
    buffers (the stored value, not the constructor's)."""
    return {key for key, tensor in module.state_dict(keep_vars=True).items()
            if not isinstance(tensor, nn.Parameter) or tensor.is_meta}


def unload_block(block: nn.Module) -> None:
    """Return the block's parameters to the meta device, keeping the Parameter objects. Modules that keep a copy
    derived from their weights (the int8 modules' packed kernel weight) drop it through their `drop_kernel`."""
    for param in block.parameters():
        swap_tensors(param, nn.Parameter(torch.empty_like(param, device="meta"), param.requires_grad))
    for module in block.modules():
        drop_kernel = getattr(module, "drop_kernel", None)
        if callable(drop_kernel):
            drop_kernel()


def _on_meta(encoding: Encoding) -> Encoding:
    return Encoding(encoding.format, {key: t.to("meta") for key, t in encoding.tensors.items()}, encoding.meta)


def offloaded_state(model_dir: Path, scratch: Path, device: torch.device | str = "cpu",
                    tokenizer: Any = None) -> ModelState:
    """The model of folder `model_dir` with its parameters on the meta device, its repeated blocks (and the parts
    outside them) to be loaded one at a time (float32, on `device`) by the block runners, `each_in_memory` and
    forward passes; released blocks go to `scratch`. UnsupportedModel when the model has no repeated blocks or its
    files do not cover it.

    Example: `state = offloaded_state(Path("llama-7b"), Path("work/blocks"), "cuda")`, then `run_pipeline(state,
    [QuantizeGPTQ()], ctx)` and `save_offloaded(state, Path("out"), {})`.
    """
    check_named_files(model_dir)
    model = skeleton_model(model_dir)
    found = transformer_blocks(model)
    if found is None:
        raise UnsupportedModel("the layer-by-layer engine needs a model made of repeated blocks (decoder layers)")
    tensors = plan_tensors(model, [])
    sources = source_files(model_dir)
    check_coverage(tensors, sources)
    stored_as = {name: next(alias for alias in t.names if alias in sources) for t in tensors for name in t.names}
    blocks = DiskBlocks(found[0], sources, stored_as, scratch, torch.device(device), outside_parts(model, found[0]))
    _load_buffers_outside(model, tensors, blocks)
    state = ModelState(model.eval(), tokenizer=tokenizer, blocks=blocks)
    blocks.attach(state)
    return state


def save_offloaded(state: ModelState, out_dir: Path, manifest: Mapping[str, Any], source_dir: Path | None = None,
                   max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write an offloaded `state` as the artifact `save_compressed` would write for it (sharded when over
    `max_shard_bytes`), one block in memory at a time."""
    blocks = state.blocks
    if not isinstance(blocks, DiskBlocks) or not isinstance(state.model, PreTrainedModel):
        raise TypeError("save_offloaded needs the state offloaded_state made")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_configs(state.model, out_dir)
    writer = ShardWriter(out_dir, max_shard_bytes)
    records: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    for part_name in blocks.parts:
        blocks.load(part_name, state.model.get_submodule(part_name), state)
    outside = {name: t for name, t in state.model.state_dict().items() if not blocks.in_blocks(name)}
    _write_part(writer, outside, state.encodings, records, aliases)
    del outside
    for part_name in blocks.parts:
        unload_block(state.model.get_submodule(part_name))
    for name, block in blocks.blocks(state.model):
        blocks.load(name, block, state)
        part = {f"{name}.{key}": value for key, value in block.state_dict().items()}
        encodings = {key: state.encodings.pop(key) for key in part if key in state.encodings}
        _write_part(writer, part, encodings, records, aliases)
        unload_block(block)
    writer.finish()
    write_manifest(out_dir, manifest, records, aliases, state.rewrites)
    if source_dir is not None:
        copy_tokenizer_files(source_dir, out_dir)
    return out_dir


def _write_part(writer: ShardWriter, part: dict[str, torch.Tensor], encodings: Mapping[str, Encoding],
                records: dict[str, Any], aliases: dict[str, str]) -> None:
    tensors, part_aliases = packed_tensors(part, {k: e for k, e in encodings.items() if k in part})
    writer.add({name: tensor.cpu() for name, tensor in tensors.items()})
    records.update({name: encoding_record(encoding) for name, encoding in encodings.items() if name in part})
    aliases.update(part_aliases)


def skeleton_model(model_dir: Path) -> PreTrainedModel:
    """The folder's model with parameters on the meta device and real buffers, configured as `load_model`
    configures the in-memory one (float32, the folder's generation config)."""
    config = read_model_config(model_dir)
    cls = model_class_for(config)
    try:
        with parameters_on_meta():
            model = cls(config)
    except Exception as exc:  # a config transformers accepts can still describe an impossible model
        raise UnsupportedModel(f"config.json: cannot build {cls.__name__} from it: {exc}") from exc
    model.config.dtype = torch.float32
    generation_config = read_generation_config(model_dir)
    if generation_config is not None and model.can_generate():
        model.generation_config = generation_config
    return model


def _load_buffers_outside(model: PreTrainedModel, tensors: list[PlannedTensor], blocks: DiskBlocks) -> None:
    """Read the stored tensors that neither a block nor a part holds (buffers of modules without parameters)."""
    for tensor in tensors:
        if blocks.block_of(model, tensor.names[0]) is not None:
            continue
        stored = blocks.stored_as[tensor.names[0]]
        with safe_open(blocks.sources[stored], framework="pt") as handle:
            value = checked_tensor(tensor, stored, handle.get_tensor(stored))
        assign_tensor(model, tensor.names[0], (value.float() if tensor.is_float else value).to(blocks.device))


@torch.no_grad()
def assign_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Give parameter (or buffer) `name` of `root` the value `value`, keeping the Parameter object."""
    owner, _, attr = name.rpartition(".")
    module = root.get_submodule(owner)
    if attr in module._parameters:
        param = module._parameters[attr]
        assert param is not None
        swap_tensors(param, nn.Parameter(value, param.requires_grad))
    else:
        module._buffers[attr] = value
