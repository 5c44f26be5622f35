"""How much each weight entry's error costs on calibration inputs, for importance-weighted k-means.

A Linear's output error from perturbing W[i, j] by e is e·x_j, so over calibration tokens its expected square is
e²·E[x_j²]: one importance per input column (the diagonal of the Hessian GPTQ uses). An Embedding row only
matters when its token appears, so a row's importance is its token's frequency: its count in the calibration text,
and for the tokens the text never shows an equal share of the mass Good-Turing gives unseen tokens (the count of
tokens seen exactly once): a short calibration text says little, so unseen rows keep much weight; a long one, little.
Each weight's importances are scaled to mean 1, and a weight shared by several modules (tied embeddings) sums those
of its users.
"""

from collections.abc import Callable

import torch
from torch import nn

from core.compression.sparsity.calibration import Batch, on_device, recording


@torch.no_grad()
def input_importance(model: nn.Module, modules: dict[str, nn.Module], batches: list[Batch]) -> dict[int, torch.Tensor]:
    """id(weight) -> importance broadcastable to the weight: (1, in_features) for a Linear, (rows, 1) for an
    Embedding. One forward pass of `model` over `batches`."""
    linears = {name: m for name, m in modules.items() if isinstance(m, nn.Linear)}
    tables = {name: m for name, m in modules.items() if isinstance(m, nn.Embedding)}
    counts = {name: torch.zeros(m.num_embeddings, dtype=torch.float64) for name, m in tables.items()}
    handles = [m.register_forward_pre_hook(_counter(counts[name])) for name, m in tables.items()]
    device = next(model.parameters()).device
    try:
        with recording(linears, {"sq"}) as stats:
            for batch in batches:
                inputs = on_device(batch, device)
                model(**inputs, use_cache=False) if hasattr(model.config, "use_cache") else model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    per_module = {name: (stats[name].sq_sum / max(stats[name].count, 1))[None, :] for name in linears}
    per_module |= {name: _smoothed(count)[:, None] for name, count in counts.items()}
    importance: dict[int, torch.Tensor] = {}
    for name, value in per_module.items():
        weight = modules[name].weight
        scaled = (value / value.mean().clamp(min=1e-30)).float()
        importance[id(weight)] = importance[id(weight)] + scaled if id(weight) in importance else scaled
    return importance


def _smoothed(count: torch.Tensor) -> torch.Tensor:
    """Token counts with the unseen tokens sharing the Good-Turing mass of unseen events (singletons, at least 1)."""
    unseen = count == 0
    if not unseen.any():
        return count
    mass = max(int((count == 1).sum()), 1)
    return torch.where(unseen, mass / int(unseen.sum()), count)


def _counter(count: torch.Tensor) -> Callable[[nn.Module, tuple], None]:
    def hook(module: nn.Module, args: tuple) -> None:
        count.add_(torch.bincount(args[0].reshape(-1).cpu(), minlength=count.numel()).double())

    return hook
