"""int8 `nn.Linear` replacements run by torch's int8 CPU GEMMs, and the rewrites that install them.

fbgemm runs them everywhere but for dynamic modules on AMX CPUs, which oneDNN runs (faster there).

The weight is stored as int8 codes with a float scale per output channel (or one per tensor), as plain tensors, so
the artifact stays safetensors-only; the kernel's packed weight is rebuilt from them after every state-dict load
(a load_state_dict post hook), so a model rebuilt by `core.load_compressed` runs the same int8 kernels as the model
that was saved. Activations are quantized to uint8 per tensor inside the kernel: from each input's own range
(dynamic) or from a range calibrated beforehand (static). An optional per-input-channel factor (SmoothQuant's 1/s
where it cannot be folded into a preceding layer) multiplies the input first.
"""

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from core.compression.int8.cpu import cpu_has_amx_int8, cpu_has_vnni
from core.compression.rewrites import register_rewrite, set_submodule

DYNAMIC_REWRITE = "int8_dynamic_linear"
_VNNI = cpu_has_vnni()
# On AMX CPUs oneDNN's dynamic int8 GEMM is 1.2-2.3x faster than fbgemm's on MiniLM's shapes (bench.int8_gemm).
# The packed weight carries its kernel, so only packing needs the engine; oneDNN has no static fp32-output op.
_DYNAMIC_ENGINE = "onednn" if cpu_has_amx_int8() and "onednn" in torch.backends.quantized.supported_engines else None
STATIC_REWRITE = "int8_static_linear"


class _PackedWeight:
    """Holds fbgemm's packed weight (a TorchScript object). Kept inside a plain object rather than as a module
    attribute, so that torch.export, which lifts script-object attributes and cannot flatten this one, skips it."""

    packed: Any = None


class Int8Linear(nn.Module):
    """Shared storage of the int8 Linear modules: `qweight` (int8, out x in), `weight_scale` (out, or 1 per
    tensor), optional fp32 `bias` and `input_factor` (in). Parameters are frozen; they count as parameters."""

    _engine: str | None = None  # the quantized engine that packs (None: torch's default, x86/fbgemm)

    def __init__(self, in_features: int, out_features: int, bias: bool, per_channel: bool, smoothed: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qweight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features if per_channel else 1))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.register_buffer("input_factor", torch.ones(in_features) if smoothed else None)
        self._kernel = _PackedWeight()
        # Packed by set_weight (conversion), or at the first forward after a load_state_dict (artifact load, or a
        # block engine reading some of a block's modules): never from placeholder zeros or meta tensors.
        self.register_load_state_dict_post_hook(lambda module, keys: module.drop_kernel())

    @torch.no_grad()
    def set_weight(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Fill in the quantized weight (codes int8, scale per row or per tensor) and bias, then repack."""
        self.qweight.copy_(codes)
        self.weight_scale.copy_(scale.reshape(-1))
        if self.bias is not None and bias is not None:
            self.bias.copy_(bias)
        self.repack()

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the kernel multiplies by (codes x scale), e.g. for ONNX export or checks."""
        return self.qweight.to(torch.float32) * self.weight_scale.reshape(-1, 1)

    def repack(self) -> None:
        """Rebuild the kernel's packed weight from the stored codes and scales."""
        with _quantized_engine(self._engine):
            self._kernel.packed = torch.ops.quantized.linear_prepack(
                _quantized_weight(self.qweight, self.weight_scale), None if self.bias is None else self.bias.detach())

    def drop_kernel(self) -> None:
        """Let the packed weight go (the block engines call this when the codes leave memory); the next forward
        packs it again from the codes then in memory."""
        self._kernel.packed = None

    def _packed(self) -> Any:
        if self._kernel.packed is None:
            self.repack()
        return self._kernel.packed

    def _factored(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_factor is None else x * self.input_factor

    def extra_repr(self) -> str:
        per = "per_channel" if self.weight_scale.numel() > 1 else "per_tensor"
        return f"in_features={self.in_features}, out_features={self.out_features}, {per}"


class DynamicInt8Linear(Int8Linear):
    """int8 x int8 Linear; each input is quantized to uint8 per tensor from its own min and max.

    `reduce_range` uses 7-bit activations. The CPU that runs the module decides too: without VNNI, fbgemm sums
    u8 x s8 products pairwise in saturating int16, so 7 bits are used there whatever the artifact says.
    """

    _engine = _DYNAMIC_ENGINE

    def __init__(self, in_features: int, out_features: int, bias: bool, per_channel: bool, smoothed: bool,
                 reduce_range: bool) -> None:
        self.reduce_range = reduce_range
        super().__init__(in_features, out_features, bias, per_channel, smoothed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._factored(x)
        if torch.compiler.is_exporting():  # fbgemm's packed weight cannot be traced: export an op ONNX can map
            return torch.ops.mcs.int8_linear_dynamic(x, self.qweight, self.weight_scale, self.bias)
        return torch.ops.quantized.linear_dynamic(x, self._packed(), self.reduce_range or not _VNNI)


class StaticInt8Linear(Int8Linear):
    """int8 x int8 Linear; inputs are quantized to uint8 with a calibrated `input_scale` and `input_zero_point`."""

    def __init__(self, in_features: int, out_features: int, bias: bool, per_channel: bool, smoothed: bool) -> None:
        super().__init__(in_features, out_features, bias, per_channel, smoothed)
        self.register_buffer("input_scale", torch.ones(1))
        self.register_buffer("input_zero_point", torch.zeros(1, dtype=torch.int32))

    @torch.no_grad()
    def set_input_qparams(self, scale: float, zero_point: int) -> None:
        self.input_scale.fill_(scale)
        self.input_zero_point.fill_(zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._factored(x)
        if torch.compiler.is_exporting():
            return torch.ops.mcs.int8_linear_static(x, self.qweight, self.weight_scale, self.bias, self.input_scale,
                                                    self.input_zero_point)
        scale, zero_point = float(self.input_scale), int(self.input_zero_point)
        packed = self._packed()
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x, scale, zero_point, packed)


# Export-only ops: what the int8 modules compute, as graph nodes that `core.compression.exports.onnx` translates into
# ONNX's DynamicQuantizeLinear / QuantizeLinear + MatMulInteger. Their eager bodies are the same arithmetic in float
# (a reference; the modules call fbgemm outside export).
@torch.library.custom_op("mcs::int8_linear_dynamic", mutates_args=())
def int8_linear_dynamic(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    low, high = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = (high - low) / 255 if high > low else 1.0
    return _reference_linear(x, scale, round(-low / scale), qweight, weight_scale, bias)


@torch.library.custom_op("mcs::int8_linear_static", mutates_args=())
def int8_linear_static(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                       input_scale: torch.Tensor, input_zero_point: torch.Tensor) -> torch.Tensor:
    return _reference_linear(x, input_scale.item(), int(input_zero_point.item()), qweight, weight_scale, bias)


@int8_linear_dynamic.register_fake
def _(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@int8_linear_static.register_fake
def _(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
      input_scale: torch.Tensor, input_zero_point: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _reference_linear(x: torch.Tensor, scale: float, zero_point: int, qweight: torch.Tensor,
                      weight_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    codes = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
    weight = qweight.to(torch.float32) * weight_scale.reshape(-1, 1)
    return torch.nn.functional.linear((codes - zero_point) * scale, weight, bias)


@contextmanager
def _quantized_engine(name: str | None) -> Iterator[None]:
    previous = torch.backends.quantized.engine
    if name is not None:
        torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def _quantized_weight(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The int8 codes viewed as the qint8 tensor fbgemm packs (exactly these codes, no re-rounding)."""
    with warnings.catch_warnings():
        # torch deprecates quantized tensor types (pytorch#184982) but its int8 CPU GEMM still takes them;
        # docs/decisions.md records the way out (ONNX Runtime) if they go.
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        if scale.numel() == 1:
            return torch._make_per_tensor_quantized_tensor(codes.detach(), float(scale), 0)
        zero_points = torch.zeros(scale.numel(), dtype=torch.long)
        return torch._make_per_channel_quantized_tensor(codes.detach(), scale.double(), zero_points, 0)


@register_rewrite(DYNAMIC_REWRITE)
def _install_dynamic(model: nn.Module, name: str, meta: dict[str, Any]) -> None:
    set_submodule(model, name, DynamicInt8Linear(**meta))


@register_rewrite(STATIC_REWRITE)
def _install_static(model: nn.Module, name: str, meta: dict[str, Any]) -> None:
    set_submodule(model, name, StaticInt8Linear(**meta))
