"""SmoothQuant's activation-to-weight migration: per input channel j of a Linear, s_j = max|X_j|^alpha /
max|W_:,j|^(1 - alpha); the Linear computes (X / s)(W · s)^T = X W^T, but X / s has far smaller outliers.

1/s is folded into the layer that produces X when that layer's output feeds nothing else: in Llama-style pre-norm
blocks the norms before q/k/v and gate/up (the residual stream bypasses them), v_proj before o_proj (attention is
linear in V, per head), up_proj before down_proj (silu(gate) * up is linear in up). Post-norm models (BERT) feed
their LayerNorm output into the residual too, so their Linears can only be smoothed at run time.
"""

from dataclasses import dataclass

import torch
from torch import nn

MIN_SCALE = 1e-5


@dataclass
class FoldGroup:
    """Linears (`consumers`) reading the output channels of one `producer` (a norm or a Linear).

    `repeat` > 1 for grouped-query attention: each v_proj channel feeds `repeat` o_proj channels (one per query head
    of its group), laid out as (kv_heads, repeat, head_dim) on o_proj's input.
    """

    producer: str
    consumers: list[str]
    repeat: int = 1
    head_dim: int = 1
    layer: str = ""  # the decoder layer holding producer and consumers


def llama_fold_groups(model: nn.Module) -> list[FoldGroup]:
    """The foldable groups of every Llama-style decoder layer (input_layernorm, self_attn.{q,k,v,o}_proj,
    post_attention_layernorm, mlp.{gate,up,down}_proj), found by attribute names; [] for other architectures."""
    groups = []
    for name, layer in model.named_modules():
        if not _is_llama_layer(layer):
            continue
        attn, mlp = f"{name}.self_attn", f"{name}.mlp"
        config = model.config
        heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        groups += [
            FoldGroup(f"{name}.input_layernorm", [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"], layer=name),
            FoldGroup(f"{name}.post_attention_layernorm", [f"{mlp}.gate_proj", f"{mlp}.up_proj"], layer=name),
            FoldGroup(f"{attn}.v_proj", [f"{attn}.o_proj"], heads // (kv_heads or heads), head_dim, name),
            FoldGroup(f"{mlp}.up_proj", [f"{mlp}.down_proj"], layer=name),
        ]
    return groups


def _is_llama_layer(layer: nn.Module) -> bool:
    parts = ("input_layernorm", "post_attention_layernorm", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.up_proj", "mlp.down_proj", "mlp.gate_proj")
    return all(_has(layer, part) for part in parts)


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def smoothing_scale(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s per input channel for Linears sharing one input (their weights' column maxima are pooled)."""
    weight_absmax = torch.stack([w.detach().abs().amax(dim=0) for w in weights]).amax(dim=0).float()
    scale = act_absmax.clamp(min=MIN_SCALE).pow(alpha) / weight_absmax.clamp(min=MIN_SCALE).pow(1 - alpha)
    return scale.clamp(min=MIN_SCALE)


def to_producer(values: torch.Tensor, group: FoldGroup) -> torch.Tensor:
    """A consumer-input-sized vector reduced (max) to the producer's channels."""
    if group.repeat == 1:
        return values
    return values.reshape(-1, group.repeat, group.head_dim).amax(dim=1).reshape(-1)


def to_consumer(values: torch.Tensor, group: FoldGroup) -> torch.Tensor:
    """A producer-channel vector repeated out to the consumers' input channels."""
    if group.repeat == 1:
        return values
    per_head = values.reshape(-1, 1, group.head_dim).expand(-1, group.repeat, group.head_dim)
    return per_head.reshape(-1)


@torch.no_grad()
def fold(model: nn.Module, group: FoldGroup, scale: torch.Tensor) -> None:
    """Divide the producer's output channels by `scale` (producer-sized) and multiply the consumers' weight
    columns by it: the model computes the same function, with smaller activations at the consumers' input."""
    producer = model.get_submodule(group.producer)
    if isinstance(producer, nn.Linear):
        producer.weight.div_(scale[:, None])
    else:  # a LayerNorm / RMSNorm: elementwise weight (and bias)
        producer.weight.div_(scale)
    if getattr(producer, "bias", None) is not None:
        producer.bias.div_(scale)
    expanded = to_consumer(scale, group)
    for name in group.consumers:
        model.get_submodule(name).weight.mul_(expanded)
