"""Structured pruning: remove whole attention heads, FFN neurons, conv channels or blocks.

Heads, neurons and channels are all "units" between producers and one consumer: unit u owns `rows` consecutive
output rows of each producer (query/key/value, gate/up, a conv and its BatchNorm) and `cols` consecutive input
columns of the consumer (the attention output projection, the FFN down projection, the next conv). Removing a unit
slices all of them, so the model stays a plain dense model with smaller shapes. With grouped KV heads a unit is one
KV head together with the query heads that share it.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import reduce
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.compression.configs.prune import PruneStructured
from core.compression.rewrites import apply_rewrite, register_rewrite
from core.compression.select import is_selected, refuse_encoded
from core.compression.sparsity.blockwise import Batch, calibration_batches, on_device, transformer_blocks
from core.compression.state import ModelState, Rewrite, StepContext, StepReport, model_device
from core.errors import InvalidSpec

SHRINK_UNITS, DROP_BLOCKS = "shrink_units", "drop_blocks"


@dataclass
class UnitGroup:
    """Units of one block; names are relative to `block`; `attrs` are module attributes set to per_unit × kept."""

    block: str
    producers: dict[str, int]
    consumer: str
    cols: int
    units: int
    attrs: dict[str, int] = field(default_factory=dict)

    def module(self, model: nn.Module, relative: str) -> nn.Module:
        return model.get_submodule(f"{self.block}.{relative}" if self.block else relative)


def prune_structured(state: ModelState, config: PruneStructured, ctx: StepContext) -> StepReport:
    before = sum(p.numel() for p in state.model.parameters())
    notes = _drop_layers(state, config, ctx) if config.target == "layers" else _shrink(state, config, ctx)
    after = sum(p.numel() for p in state.model.parameters())
    metrics: dict[str, float | int | str] = {"params_before": before, "params_after": after,
                                             "params_ratio": after / before}
    notes.append("a smaller dense model: it runs faster with ordinary kernels; quality needs checking (no recovery "
                 "training was done)")
    return StepReport(metrics=metrics, notes=notes)


def _shrink(state: ModelState, config: PruneStructured, ctx: StepContext) -> list[str]:
    groups = [g for g in _groups(state.model, config.target) if _selected(g, config)]
    if not groups:
        raise InvalidSpec(f"prune: found no {config.target} to prune in {type(state.model).__name__} "
                          f"(targets {config.targets}, exclude {config.exclude})", details={"target": config.target})
    refuse_encoded(state, _parameter_names(state.model, groups), "structured pruning")
    scores, notes = _unit_scores(state, config, ctx, groups)
    removed = 0
    for group, score in zip(groups, scores, strict=True):
        keep = _kept(score, config.amount)
        removed += group.units - len(keep)
        meta = {"producers": group.producers, "consumer": group.consumer, "cols": group.cols, "keep": keep,
                "attrs": group.attrs}
        apply_rewrite(state, Rewrite(SHRINK_UNITS, group.block, meta))
    return [*notes, f"removed {removed} of {sum(g.units for g in groups)} {config.target} ({config.importance})"]


def _kept(score: torch.Tensor, amount: float) -> list[int]:
    count = max(1, score.numel() - round(amount * score.numel()))
    return sorted(torch.topk(score, count).indices.tolist())


def _selected(group: UnitGroup, config: PruneStructured) -> bool:
    name = f"{group.block}.{group.consumer}" if group.block else group.consumer
    return is_selected(name, config)


def _parameter_names(model: nn.Module, groups: list[UnitGroup]) -> list[str]:
    names = []
    for group in groups:
        for relative in [*group.producers, group.consumer]:
            prefix = f"{group.block}.{relative}" if group.block else relative
            names += [f"{prefix}.{name}" for name, _ in group.module(model, relative).named_parameters()]
    return names


# ---- finding the units ----------------------------------------------------------------------------------------

def _groups(model: nn.Module, target: str) -> list[UnitGroup]:
    if target == "channels":
        return _channel_groups(model)
    found = transformer_blocks(model)
    if found is None:
        return []
    prefix, blocks = found
    finder = _head_group if target == "heads" else _neuron_group
    groups = [finder(f"{prefix}.{i}", block) for i, block in enumerate(blocks)]
    return [group for group in groups if group is not None]


def _has(block: nn.Module, *names: str) -> bool:
    return all(_get(block, name) is not None for name in names)


def _get(block: nn.Module, name: str) -> Any:
    try:
        return block.get_submodule(name)
    except AttributeError:
        return None


def _head_group(name: str, block: nn.Module) -> UnitGroup | None:
    if _has(block, "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
        attention = block.get_submodule("attention.self")  # BERT-style
        size = attention.attention_head_size
        qkv = {f"attention.self.{p}": size for p in ("query", "key", "value")}
        attrs = {"attention.self.num_attention_heads": 1, "attention.self.all_head_size": size}
        return UnitGroup(name, qkv, "attention.output.dense", size, attention.num_attention_heads, attrs)
    if _has(block, "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
        attention = block.get_submodule("self_attn")  # Llama-style, grouped KV heads
        size, per_kv = attention.head_dim, attention.num_key_value_groups
        producers = {"self_attn.q_proj": per_kv * size, "self_attn.k_proj": size, "self_attn.v_proj": size}
        units = attention.k_proj.out_features // size
        return UnitGroup(name, producers, "self_attn.o_proj", per_kv * size, units)
    return None


def _neuron_group(name: str, block: nn.Module) -> UnitGroup | None:
    if _has(block, "intermediate.dense", "output.dense"):
        units = block.get_submodule("intermediate.dense").out_features
        return UnitGroup(name, {"intermediate.dense": 1}, "output.dense", 1, units)
    if _has(block, "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        units = block.get_submodule("mlp.up_proj").out_features
        return UnitGroup(name, {"mlp.gate_proj": 1, "mlp.up_proj": 1}, "mlp.down_proj", 1, units)
    return None


def _channel_groups(model: nn.Module) -> list[UnitGroup]:
    """Inner channels of residual blocks (ResNet-style: a `layer` sequence of conv + norm + activation modules);
    block outputs feed the residual sum and keep their width."""
    groups = []
    for name, module in model.named_modules():
        layers = getattr(module, "layer", None)
        if not isinstance(layers, nn.Sequential | nn.ModuleList):
            continue
        for i in range(len(layers) - 1):
            conv, norm = _get(layers[i], "convolution"), _get(layers[i], "normalization")
            following = _get(layers[i + 1], "convolution")
            plain = isinstance(conv, nn.Conv2d) and isinstance(following, nn.Conv2d)
            if plain and conv.groups == following.groups == 1:
                producers = {f"layer.{i}.convolution": 1}
                if isinstance(norm, nn.BatchNorm2d):
                    producers[f"layer.{i}.normalization"] = 1
                groups.append(UnitGroup(name, producers, f"layer.{i + 1}.convolution", 1, conv.out_channels))
    return groups


# ---- importance -----------------------------------------------------------------------------------------------

def _unit_scores(state: ModelState, config: PruneStructured, ctx: StepContext,
                 groups: list[UnitGroup]) -> tuple[list[torch.Tensor], list[str]]:
    if config.importance == "l1":
        return [_l1_score(state.model, group) for group in groups], []
    data = calibration_batches(state, config, ctx)
    consumers = [group.module(state.model, group.consumer) for group in groups]
    column_scores = _column_scores(state.model, consumers, data.batches, config.importance)
    scores = [score.view(g.units, g.cols).sum(dim=1) for g, score in zip(groups, column_scores, strict=True)]
    return scores, data.notes


def _l1_score(model: nn.Module, group: UnitGroup) -> torch.Tensor:
    consumer = group.module(model, group.consumer).weight.detach()
    score = consumer.abs().transpose(0, 1).reshape(group.units, -1).sum(dim=1)
    for relative in group.producers:
        producer = group.module(model, relative)
        if isinstance(producer, nn.Linear | nn.Conv2d):
            score = score + producer.weight.detach().abs().reshape(group.units, -1).sum(dim=1)
    return score


def _column_scores(model: nn.Module, consumers: list[nn.Module], batches: list[Batch],
                   importance: str) -> list[torch.Tensor]:
    """Per input column of each consumer: mean|x|·‖W[:, j]‖ ("activation") or |Σ x·∂L/∂x| ("taylor")."""
    device = model_device(model)
    totals = [torch.zeros(_in_width(c), dtype=torch.float64, device=device) for c in consumers]
    for batch in batches:
        batch = on_device(batch, device)
        with _consumer_inputs(consumers, keep_grad=importance == "taylor") as inputs:
            if importance == "taylor":
                with torch.enable_grad():
                    _taylor_loss(model, batch).backward()
            else:
                with torch.no_grad():
                    model(**batch)
            for index, x in enumerate(inputs):
                totals[index] += _batch_column_score(consumers[index], x, importance)
    model.zero_grad(set_to_none=True)
    return totals


def _in_width(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def _batch_column_score(consumer: nn.Module, x: torch.Tensor, importance: str) -> torch.Tensor:
    channel_dim = 1 if isinstance(consumer, nn.Conv2d) else -1
    x64 = x.detach().to(torch.float64).movedim(channel_dim, -1).reshape(-1, _in_width(consumer))
    if importance == "taylor":
        return (x64 * x.grad.to(torch.float64).movedim(channel_dim, -1).reshape(x64.shape)).sum(dim=0).abs()
    weight = consumer.weight.detach().to(torch.float64).transpose(0, 1).reshape(_in_width(consumer), -1)
    return x64.abs().mean(dim=0) * weight.norm(dim=1)


@contextmanager
def _consumer_inputs(consumers: list[nn.Module], keep_grad: bool) -> Iterator[list[torch.Tensor]]:
    seen: list[torch.Tensor | None] = [None] * len(consumers)

    def recorder(index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            if keep_grad and args[0].requires_grad:
                args[0].retain_grad()
            seen[index] = args[0]

        return hook

    handles = [c.register_forward_pre_hook(recorder(i)) for i, c in enumerate(consumers)]
    try:
        yield seen  # filled during the forward pass
    finally:
        for handle in handles:
            handle.remove()


def _taylor_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The language-model loss for causal LMs; otherwise cross-entropy against the model's own predictions when it
    has logits, else the output energy (a label-free proxy for encoders)."""
    output = model(**batch)
    logits = getattr(output, "logits", None)
    if logits is not None and "input_ids" in batch and type(model).__name__.endswith("CausalLM"):
        return F.cross_entropy(logits[0, :-1], batch["input_ids"][0, 1:])
    if logits is not None:
        return F.cross_entropy(logits, logits.detach().argmax(dim=-1))
    return 0.5 * output.last_hidden_state.pow(2).mean()


# ---- whole blocks ---------------------------------------------------------------------------------------------

def _drop_layers(state: ModelState, config: PruneStructured, ctx: StepContext) -> list[str]:
    found = transformer_blocks(state.model)
    if found is None:
        raise InvalidSpec(f"prune: {type(state.model).__name__} has no repeated blocks to remove",
                          details={"target": "layers"})
    name, blocks = found
    refuse_encoded(state, [f"{name}.{p}" for p, _ in blocks.named_parameters()], "structured pruning")
    scores, notes = _block_scores(state, config, ctx, blocks)
    keep = _kept(scores, config.amount)
    apply_rewrite(state, Rewrite(DROP_BLOCKS, name, {"keep": keep}))
    dropped = sorted(set(range(len(scores))) - set(keep))
    return [*notes, f"removed blocks {dropped} of {name} ({config.importance}); kept {len(keep)}"]


def _block_scores(state: ModelState, config: PruneStructured, ctx: StepContext,
                  blocks: nn.ModuleList) -> tuple[torch.Tensor, list[str]]:
    if config.importance == "l1":
        return torch.tensor([_mean_abs_weight(block) for block in blocks]), []
    data = calibration_batches(state, config, ctx)
    totals = torch.zeros(len(blocks), dtype=torch.float64)
    device = model_device(state.model)
    for batch in data.batches:
        batch = on_device(batch, device)
        with _block_io(blocks, keep_grad=config.importance == "taylor") as io:
            if config.importance == "taylor":
                with torch.enable_grad():
                    _taylor_loss(state.model, batch).backward()
            else:
                with torch.no_grad():
                    state.model(**batch)
            totals += torch.tensor([_block_score(x, y, config.importance) for x, y in io])
    state.model.zero_grad(set_to_none=True)
    return totals, data.notes


def _mean_abs_weight(block: nn.Module) -> float:
    weights = [p.detach().abs().flatten() for p in block.parameters() if p.ndim > 1]
    return torch.cat(weights).mean().item()


def _block_score(x: torch.Tensor, y: torch.Tensor, importance: str) -> float:
    """Block influence 1 − cos(in, out) (ShortGPT), or the first-order loss change |Σ (y − x)·∂L/∂y| of skipping it."""
    if importance == "taylor":
        return ((y - x).detach() * y.grad).sum().abs().item()
    return (1 - F.cosine_similarity(x.float(), y.float(), dim=-1)).mean().item()


@contextmanager
def _block_io(blocks: nn.ModuleList, keep_grad: bool) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    seen: list[Any] = [None] * len(blocks)

    def recorder(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            if keep_grad and hidden_out.requires_grad:
                hidden_out.retain_grad()
            seen[index] = (hidden_in, hidden_out)

        return hook

    handles = [b.register_forward_hook(recorder(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


# ---- rewrites (also replayed by load_compressed) ----------------------------------------------------------------

@register_rewrite(SHRINK_UNITS)
def _shrink_units(model: nn.Module, name: str, meta: dict[str, Any]) -> None:
    """Keep only units `meta["keep"]`: slice producer rows and consumer columns, set per-unit attributes."""
    block = model.get_submodule(name) if name else model
    keep = torch.tensor(meta["keep"], dtype=torch.long)
    for relative, rows in meta["producers"].items():
        _slice_(block.get_submodule(relative), 0, _expand(keep, rows))
    _slice_(block.get_submodule(meta["consumer"]), 1, _expand(keep, meta["cols"]))
    for path, per_unit in meta["attrs"].items():
        parent, _, attr = path.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, attr, per_unit * len(keep))


def _expand(units: torch.Tensor, width: int) -> torch.Tensor:
    """Indices of the `width` consecutive rows (or columns) owned by each kept unit."""
    return (units[:, None] * width + torch.arange(width)[None, :]).flatten()


@torch.no_grad()
def _slice_(module: nn.Module, dim: int, index: torch.Tensor) -> None:
    """Keep `index` along `dim` (0 = outputs, 1 = inputs) of a Linear, Conv2d or BatchNorm2d, in place."""
    module.weight = nn.Parameter(module.weight.index_select(dim, index).contiguous())
    if dim == 0:
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias.index_select(0, index).contiguous())
        for buffer in ("running_mean", "running_var"):
            if getattr(module, buffer, None) is not None:
                setattr(module, buffer, getattr(module, buffer).index_select(0, index).contiguous())
    sizes = {nn.Linear: ("out_features", "in_features"), nn.Conv2d: ("out_channels", "in_channels"),
             nn.BatchNorm2d: ("num_features", "num_features")}
    kind = next(k for k in sizes if isinstance(module, k))
    setattr(module, sizes[kind][dim], index.numel())


@register_rewrite(DROP_BLOCKS)
def _drop_blocks(model: nn.Module, name: str, meta: dict[str, Any]) -> None:
    """Keep only blocks `meta["keep"]` of the ModuleList `name`, renumbering their `layer_idx` (KV-cache slots)."""
    blocks = model.get_submodule(name)
    kept = nn.ModuleList([blocks[i] for i in meta["keep"]])
    for index, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    parent, _, attr = name.rpartition(".")
    setattr(reduce(getattr, parent.split("."), model) if parent else model, attr, kept)
