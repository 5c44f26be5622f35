"""A shallower student (DistilBERT-style): keep k evenly spaced transformer layers of the model, the last included.

Recorded as a `keep_layers` rewrite; the config's `num_hidden_layers` becomes k, so the artifact's config.json
builds the shallow model directly and the replay on load is then a no-op.
"""

from torch import nn

from core.compression.rewrites import apply_rewrite, register_rewrite
from core.compression.state import ModelState, Rewrite
from core.errors import InvalidSpec, UnsupportedModel


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer layers: the one with `config.num_hidden_layers` entries."""
    count = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return name, module
    raise UnsupportedModel(f"{type(model).__name__}: no list of {count} transformer layers found")


def kept_layers(total: int, keep: int) -> list[int]:
    """Evenly spaced indices ending at the last layer: 6 → 3 keeps [1, 3, 5]."""
    return [round((i + 1) * total / keep) - 1 for i in range(keep)]


def shrink(state: ModelState, keep: int) -> list[int]:
    """Keep `keep` layers of `state.model` in place; return which teacher layer each kept layer came from."""
    name, layers = layer_stack(state.model)
    if not 1 <= keep < len(layers):
        raise InvalidSpec(f"distill: student layers must be between 1 and {len(layers) - 1} for this "
                          f"{len(layers)}-layer model, got {keep}", details={"field": "student.layers"})
    indices = kept_layers(len(layers), keep)
    _rename_records(state, name, indices)
    apply_rewrite(state, Rewrite("keep_layers", name, {"keep": indices, "of": len(layers)}))
    return indices


@register_rewrite("keep_layers")
def _keep_layers(model: nn.Module, name: str, meta: dict) -> None:
    layers = model.get_submodule(name)
    if len(layers) == len(meta["keep"]):  # already built at the student's depth from its config.json
        return
    if len(layers) != meta["of"]:
        raise UnsupportedModel(f"keep_layers: {name} has {len(layers)} layers, expected {meta['of']}")
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, nn.ModuleList(layers[i] for i in meta["keep"]))
    _renumber(model, model.get_submodule(name), meta["keep"])


def _renumber(model: nn.Module, layers: nn.ModuleList, keep: list[int]) -> None:
    """Layer indices used by KV caches and per-layer config lists follow the new depth."""
    config = model.config
    config.num_hidden_layers = len(keep)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in keep]
    for index, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index


def _rename_records(state: ModelState, stack: str, indices: list[int]) -> None:
    """Encodings and earlier rewrites of kept layers move to the new index; those of dropped layers go."""
    renames = {f"{stack}.{old}.": f"{stack}.{new}." for new, old in enumerate(indices)}

    def moved(name: str) -> str | None:
        if not name.startswith(f"{stack}."):
            return name
        prefix = next((p for p in renames if name.startswith(p)), None)
        return None if prefix is None else renames[prefix] + name.removeprefix(prefix)

    state.encodings = {moved(n): e for n, e in state.encodings.items() if moved(n) is not None}
    kept = []
    for rewrite in state.rewrites:
        module = moved(rewrite.module)
        if module is not None:
            rewrite.module = module
            kept.append(rewrite)
    state.rewrites = kept
