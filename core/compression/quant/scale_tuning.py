"""Block-wise tuning of GPTQ's scales: once a block's codes are chosen, each group's scale is multiplied by a factor
trained with Adam so that the block's outputs match the uncompressed model's outputs of that block (the block
reconstruction of BRECQ and AutoRound's tuned ranges, with GPTQ's codes and zero points held fixed). GPTQ sees one
layer's inputs at a time; this sees the whole block and the error the quantized blocks before it pass on."""

import torch
from torch import nn
from torch.nn.utils import parametrize

from core.compression.configs.calibration import Reconstruction
from core.compression.quant.grid import GridParams, IntGrid, expand_params, fp16_scale
from core.compression.quant.layerwise import BlockCall
from core.compression.sparsity.blockwise import BlockInput, BlockRun
from core.compression.sparsity.reconstruct import ReconstructionResult, reconstruct_block

FACTOR_BOUNDS = (0.5, 2.0)  # a scale trained further than this is not trusted, as in gptq.refitted_scales


class _ScaledCodes(nn.Module):
    """A parametrization that decodes fixed codes with trainable per-group scale factors (ignores the float weight
    it stands in for)."""

    def __init__(self, codes: torch.Tensor, params: GridParams, grid: IntGrid) -> None:
        super().__init__()
        self.params, self.grid, self.codes = params, grid, codes
        self.factor = nn.Parameter(torch.ones(params.scale.shape, device=codes.device))

    def scaled(self) -> GridParams:
        factor = self.factor.clamp(*FACTOR_BOUNDS)
        return GridParams(self.params.scale.float() * factor, self.params.zero_point)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        scale, zero = expand_params(self.scaled(), self.grid, self.codes.shape[1])
        return ((self.codes.float() - zero) * scale).to(original.dtype)


def tune_scales(
    name: str,
    block: nn.Module,
    quantized: dict[str, tuple[nn.Linear, torch.Tensor, GridParams]],
    grid: IntGrid,
    calls: list[BlockCall],
    targets: list[torch.Tensor],
    config: Reconstruction,
    seed: int = 0,
) -> tuple[dict[str, GridParams], ReconstructionResult]:
    """Train the scale factors of the `quantized` Linear layers of `block` (weight name -> module, codes, params)
    on `calls` towards `targets`; returns each weight's tuned params (float16 scales, as stored) and the block's
    error before and after. A block whose error would grow keeps GPTQ's scales."""
    decoders = {weight: _ScaledCodes(codes, params, grid) for weight, (_, codes, params) in quantized.items()}
    for weight, (module, _, _) in quantized.items():
        parametrize.register_parametrization(module, "weight", decoders[weight], unsafe=True)
    try:
        run = BlockRun(name, block, [BlockInput(call.args, call.kwargs) for call in calls], targets)
        result = reconstruct_block(run, {decoder.factor: None for decoder in decoders.values()}, config, seed)
    finally:
        for module, _, _ in quantized.values():
            # The float Parameter itself comes back (same object), so ties and the offloading engine still see it.
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    with torch.no_grad():
        tuned = {weight: decoder.scaled() for weight, decoder in decoders.items()}
    return {weight: GridParams(fp16_scale(params.scale), params.zero_point) for weight, params in tuned.items()}, result
