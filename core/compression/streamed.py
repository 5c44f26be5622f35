"""Whole-model forward passes of a model too big to hold: a model folder (or an artifact) runs as the in-memory model
would, with each layer's weights read from the shards only while the forward pass is inside that layer.

The model is built with its parameters on the meta device (an artifact's structure replayed from its manifest), and
a hook around each module that holds parameters of its own (each Linear and norm of a block, the embeddings,
lm_head) reads its weights in float32 (an artifact's decoded, as `load_compressed` decodes them) just before it runs
and returns them to the meta device just after. Every number is computed by the same float32 arithmetic as on the
loaded model, so the before/after numbers of a layer-by-layer job are those the in-memory path would report, while
memory holds one layer's weights (the largest: the embeddings or the head) and the activations. Loading whole blocks
held a 7B block's 0.8 GB of float32 weights at once.
"""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from core.compression.artifact import MANIFEST_FILE, read_manifest
from core.compression.offload import (
    assign_tensor,
    not_loaded,
    skeleton_model,
    unload_block,
)
from core.compression.rewrites import replay
from core.compression.sequential import (
    artifact_tensors,
    parameter_holders,
    plan_tensors,
    read_upcast,
    return_freed_memory,
    source_files,
)
from core.compression.sparsity.blockwise import transformer_blocks
from core.compression.state import Rewrite
from core.errors import UnsupportedModel


class _FolderReader:
    """Reads a model folder's tensors by state_dict name as the loaders give them: float ones in float32, an
    artifact's encoded ones decoded, a tied one from wherever it is stored."""

    def __init__(self, folder: Path, model: PreTrainedModel, encodings: Mapping[str, object],
                 aliases: Mapping[str, str]) -> None:
        self.sources = source_files(folder)
        self.encodings = encodings
        stored = set(self.sources) | set(encodings)
        tied = {name: next((alias for alias in t.names if alias in stored), name)
                for t in plan_tensors(model, []) for name in t.names}
        self.stored_as = {name: aliases.get(name, tied[name]) for name in tied}

    def read(self, name: str) -> torch.Tensor:
        stored = self.stored_as.get(name, name)
        if stored in self.encodings:
            return _float32(artifact_tensors([stored], self.sources, self.encodings)[stored])
        return read_upcast(self.sources[stored], stored)


def _float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor


@contextmanager
def streamed_model(folder: Path, device: torch.device | str = "cpu") -> Iterator[PreTrainedModel]:
    """The model of `folder` (an uploaded model or a `save_compressed` artifact) ready to run forward with one
    layer's weights in memory at a time. UnsupportedModel when it has no repeated blocks.

    Run it under `torch.no_grad()`: autograd would keep references to the weights a block lets go of.
    Example: `with streamed_model(Path("llama-7b")) as model, torch.no_grad(): logits = model(**inputs).logits`.
    """
    device = torch.device(device)
    model = skeleton_model(folder)
    encodings: Mapping[str, object] = {}
    aliases: Mapping[str, str] = {}
    if (folder / MANIFEST_FILE).is_file():
        manifest = read_manifest(folder)
        encodings, aliases = manifest.encodings, manifest.aliases
        with torch.device("meta"):  # factored layers and other rewrites, still without memory
            for record in manifest.rewrites:
                replay(model, Rewrite(record.kind, record.module, record.meta))
    found = transformer_blocks(model)
    if found is None:
        raise UnsupportedModel("a streamed forward pass needs a model made of repeated blocks (decoder layers)")
    reader = _FolderReader(folder, model, encodings, aliases)
    units = parameter_holders(model)
    for name in model.state_dict():  # the rest: buffers of modules without parameters
        if not any(name.startswith(unit + ".") for unit in units):
            assign_tensor(model, name, reader.read(name).to(device))
    hooks = []
    for unit in units:
        module = model.get_submodule(unit)
        hooks.append(module.register_forward_pre_hook(_loader(reader, unit, device)))
        hooks.append(module.register_forward_hook(_unloader))
    model.config.use_cache = False  # a KV cache would hold every block's keys and values of the pass
    try:
        yield model.eval()
    finally:
        for hook in hooks:
            hook.remove()
        unload_block(model)  # the caller's reference to the model keeps no weights
        return_freed_memory()


def _loader(reader: _FolderReader, name: str, device: torch.device):  # noqa: ANN202 (a forward pre-hook)
    def load(module: nn.Module, args: object) -> None:
        # Its own weights and those of its children that are still on the meta device (a module that uses a
        # child's weight without calling the child, as nn.MultiheadAttention does its out_proj's), each tensor
        # upcast as it is read: a stored (bf16) copy and its float32 one are never both whole in memory.
        for key in not_loaded(module):
            assign_tensor(module, key, reader.read(f"{name}.{key}").to(device))
    return load


def _unloader(module: nn.Module, args: object, output: object) -> None:
    unload_block(module)
    return_freed_memory()  # else the C heap keeps what each layer freed, and RSS climbs to the largest ones
