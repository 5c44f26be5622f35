"""LoRA recovery (peft): low-rank adapters train on frozen compressed weights, then merge or stay beside them."""

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from torch.nn.utils import parametrize

from core.compression.configs.lora import LoRA
from core.compression.encoding import decode
from core.compression.registry import register_step
from core.compression.rewrites import apply_rewrite, register_rewrite, set_submodule
from core.compression.select import nothing_selected, select_modules
from core.compression.sparsity.masks import mask_of
from core.compression.state import ModelState, Rewrite, StepContext, StepReport, encoded_bytes
from core.compression.training.constraints import form_for, reencode
from core.compression.training.objectives import Distillation, default_loss, evaluate, is_causal_lm
from core.compression.training.run import fit, load_teacher, prepare_data, pruned_sparsity
from core.errors import InvalidSpec

ADAPTER = "default"


@register_step(LoRA)
def lora_step(state: ModelState, config: LoRA, ctx: StepContext) -> StepReport:
    """Train LoRA adapters on the selected `nn.Linear` modules of `state.model`, in place; only adapters train.

    `merge: true` folds each adapter into its weight, re-applies the pruning mask exactly and re-encodes a quantized
    weight (rtn grids re-rounded, k-means centroids refitted); `merge: false` keeps the adapters (a `lora_adapters`
    rewrite rebuilds them on load). The report gives held-out numbers before, after training and after the merge.

    Example recipe step: `{"type": "lora", "rank": 8, "alpha": 16, "objective": "distill", "merge": true}`.
    """
    if config.objective == "task" and not is_causal_lm(state.model):
        raise InvalidSpec("lora: objective \"task\" is next-token prediction and needs a causal LM; use \"distill\"",
                          details={"field": "objective"})
    teacher = load_teacher(config, ctx)  # also what held-out numbers compare against under the task objective
    data = prepare_data(state, config, ctx)
    targets, notes = _targets(state, config)
    sparsity_before = pruned_sparsity(state)
    adapters = Rewrite("lora_adapters", "", _adapter_meta(config, targets))
    apply_rewrite(state, adapters)
    _move_encodings(state, targets, ".weight", ".base_layer.weight")
    state.model.to(ctx.device)
    masked = _mask_deltas(state, targets) if config.merge else []
    params = {name: p for name, p in state.model.named_parameters() if ".lora_" in name}
    objective = Distillation(teacher, config.loss or default_loss(state.model), config.temperature,
                             list(range(getattr(state.model.config, "num_hidden_layers", 0))))
    outcome = fit(state, config, ctx, objective, params, data, task=config.objective == "task")
    for base in masked:
        parametrize.remove_parametrizations(base, "weight", leave_parametrized=False)
    if config.merge:
        _merge(state, targets)
        state.rewrites.remove(adapters)  # the modules are plain Linears again
        heldout = [{k: v.to(ctx.device) for k, v in b.items()} for b in data.heldout_batches(config.batch_size)]
        outcome.metrics.update({f"heldout_{k}_merged": v for k, v in evaluate(objective, state.model, heldout).items()})
        notes.append(f"adapters merged into {len(targets)} weights; masks re-applied, quantized weights re-encoded")
    else:
        notes.append(f"adapters kept unmerged on {len(targets)} modules (rank {config.rank}); the artifact stores "
                     "them beside the frozen weights and load_compressed rebuilds them (needs peft)")
    metrics = {**outcome.metrics, "adapted_modules": len(targets), "sparsity_before": sparsity_before,
               "sparsity_after": pruned_sparsity(state), "encoded_bytes": encoded_bytes(state)}
    return StepReport(metrics=metrics, notes=notes + outcome.notes)


def _targets(state: ModelState, config: LoRA) -> tuple[list[str], list[str]]:
    """Selected Linear modules; with merge, only those whose weight encoding can be refitted after the merge."""
    targets, notes = [], []
    for name in select_modules(state.model, config, (nn.Linear,), tied="shared").modules:
        encoding = state.encodings.get(f"{name}.weight")
        if config.merge and encoding is not None and form_for(encoding) is None:
            notes.append(f"{name}: no adapter ({encoding.format} weights cannot be refitted after a merge)")
            continue
        targets.append(name)
    if not targets:
        raise nothing_selected(config, "nn.Linear module whose weights can be refitted after a merge")
    return targets, notes


def _adapter_meta(config: LoRA, targets: list[str]) -> dict:
    return {"rank": config.rank, "alpha": config.alpha, "dropout": config.dropout, "targets": targets}


@register_rewrite("lora_adapters")
def _inject(model: nn.Module, name: str, meta: dict) -> None:
    """Wrap each target Linear in a peft LoRA layer (its weight moves to `<module>.base_layer.weight`)."""
    lora = LoraConfig(r=meta["rank"], lora_alpha=meta["alpha"], lora_dropout=meta["dropout"],
                      target_modules=meta["targets"])
    inject_adapter_in_model(lora, model, adapter_name=ADAPTER)


def _move_encodings(state: ModelState, targets: list[str], old: str, new: str) -> None:
    for name in targets:
        if f"{name}{old}" in state.encodings:
            state.encodings[f"{name}{new}"] = state.encodings.pop(f"{name}{old}")


class _MaskedDelta(nn.Module):
    """Parametrization of a pruned base weight while its adapter trains: W + ΔW ⊙ mask, so the model trains exactly
    as it will be once merged (a merge re-applies the mask, which would otherwise drop the delta's pruned half)."""

    def __init__(self, layer: nn.Module, keep: torch.Tensor) -> None:
        super().__init__()
        self._layer = (layer,)  # a tuple, so the adapter layer is not registered as a child (it is the parent)
        self.register_buffer("keep", keep, persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self._layer[0].get_delta_weight(ADAPTER).to(weight.dtype) * self.keep


def _mask_deltas(state: ModelState, targets: list[str]) -> list[nn.Module]:
    """Route the adapters of pruned targets through their base weight, masked; return those base layers."""
    bases = []
    for name in targets:
        mask = mask_of(state, f"{name}.base_layer.weight")
        if mask is None:
            continue
        layer = state.model.get_submodule(name)
        layer.set_adapter([])  # peft's own unmasked path off; the parametrization applies the delta instead
        base = layer.get_base_layer()
        keep = mask.to(base.weight.device, base.weight.dtype)
        parametrize.register_parametrization(base, "weight", _MaskedDelta(layer, keep), unsafe=True)
        bases.append(base)
    return bases


@torch.no_grad()
def _merge(state: ModelState, targets: list[str]) -> None:
    """Replace each LoRA layer by its base Linear holding W + ΔW, refitted to the weight's encoding."""
    for name in targets:
        layer = state.model.get_submodule(name)
        base = layer.get_base_layer()
        merged = base.weight + layer.get_delta_weight(ADAPTER).to(base.weight.dtype)
        encoding = state.encodings.pop(f"{name}.base_layer.weight", None)
        if encoding is not None:
            encoding = reencode(encoding, merged)
            state.encodings[f"{name}.weight"] = encoding
            merged = decode(encoding).to(base.weight.device)
        base.weight.copy_(merged)
        set_submodule(state.model, name, base)
