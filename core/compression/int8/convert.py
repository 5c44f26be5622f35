"""Which Linear modules a W8A8 step converts, and how one float Linear becomes an int8 module in the model state."""

from collections.abc import Iterator

import torch
from torch import nn

from core.compression.configs.quantize import _Int8ActivationFields
from core.compression.encoding import quantize_rtn
from core.compression.int8.layers import DYNAMIC_REWRITE, STATIC_REWRITE, Int8Linear, StaticInt8Linear
from core.compression.rewrites import apply_rewrite
from core.compression.select import Selection, select_modules
from core.compression.state import ModelState, Rewrite, StepReport, each_in_memory, size_metrics


def select_linears(model: nn.Module, config: _Int8ActivationFields) -> Selection[nn.Linear]:
    """The `nn.Linear` modules a W8A8 step converts; a tied one (lm_head sharing the input embedding) is skipped
    and stays float: the int8 module has no float `weight` for transformers to tie on load, and quantizing the
    shared tensor would change the embedding too."""
    return select_modules(model, config, (nn.Linear,), tied="skipped")


def each_linear(state: ModelState, linears: dict[str, nn.Linear]) -> Iterator[tuple[str, nn.Linear]]:
    """(name, Linear) of `linears` in model order, its block in memory while it is yielded (an offloaded model
    keeps what the caller changed or installed when the block is let go)."""
    return each_in_memory(state, list(linears.items()), lambda item: item[0])


@torch.no_grad()
def install_int8(
    state: ModelState,
    name: str,
    linear: nn.Linear,
    config: _Int8ActivationFields,
    input_qparams: tuple[float, int] | None = None,
    input_factor: torch.Tensor | None = None,
) -> Int8Linear:
    """Replace `linear` (at `name`) by an int8 module holding its symmetric int8 weight: static with the activation
    `input_qparams` (scale, zero point) when given, else dynamic. The replacement is recorded as a rewrite so
    `load_compressed` rebuilds the same module. `input_factor` (per input channel) multiplies inputs at run time:
    SmoothQuant's 1/s where it cannot be folded into a preceding layer."""
    meta = {
        "in_features": linear.in_features,
        "out_features": linear.out_features,
        "bias": linear.bias is not None,
        "per_channel": config.granularity == "per_channel",
        "smoothed": input_factor is not None,
    }
    if input_qparams is None:
        meta["reduce_range"] = bool(config.reduce_range)
    encoding = quantize_rtn(linear.weight, bits=8, granularity=config.granularity, symmetric=True)
    apply_rewrite(state, Rewrite(DYNAMIC_REWRITE if input_qparams is None else STATIC_REWRITE, name, meta))
    module = state.model.get_submodule(name)
    if input_factor is not None:
        module.input_factor.copy_(input_factor)
    if isinstance(module, StaticInt8Linear) and input_qparams is not None:
        module.set_input_qparams(*input_qparams)
    module.set_weight(encoding.tensors["qweight"], encoding.tensors["scale"], linear.bias)
    # The float Linear is out of the model now, but the step's selection still holds it: let its weights go, or an
    # offloaded model would keep every replaced layer's float32 copy (3.9 GB on the TinyLlama shape).
    linear.to("meta")
    return module


def int8_report(state: ModelState, selection: Selection[nn.Linear], original_bytes: int) -> StepReport:
    """Metrics every W8A8 step reports: how many Linears now run int8 and how much their weights shrank."""
    modules = [state.model.get_submodule(name) for name in selection.modules]
    packed = sum(_stored_bytes(module) for module in modules)
    metrics: dict[str, float | int | str] = {
        "modules_quantized": len(modules),
        "params_quantized": sum(module.qweight.numel() for module in modules),
        **size_metrics(original_bytes, packed),
    }
    notes = [f"{name} kept float: its weight is tied to another module" for name in selection.skipped]
    return StepReport(metrics=metrics, notes=notes)


def linear_bytes(selection: Selection[nn.Linear]) -> int:
    """Bytes of the selected Linears' float weights and biases, before conversion."""
    return sum(_stored_bytes(linear) for linear in selection.modules.values())


def _stored_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())
