"""Weights train without leaving their compressed form (torch parametrizations around each constrained weight).

- pruned (`sparse_bitmask`): the pruned positions are exactly zero in every forward and get no gradient;
- integer grids (`int8_rtn`, `packed_int`): straight-through fake quantization of a float latent weight (QAT);
- k-means (`kmeans`): the codebook is what trains, each weight stays on its centroid (Deep Compression);
- any other format (e.g. fp8, Huffman-coded): frozen, with a note.
`release` removes the parametrizations and re-encodes every trained weight so `state.encodings` match the weights.
"""

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from core.compression.encoding import INT8_RTN, PACKED_INT, decode, quantize_rtn
from core.compression.quant.kmeans import KMEANS, grouped, ungrouped
from core.compression.quant.packing import unpack_bits
from core.compression.sparsity.masks import DENSE_FLOAT, SPARSE_BITMASK, dense_float, sparse_encoding, unwrap
from core.compression.state import Encoding, ModelState


class _Form(nn.Module):
    """A parametrization that keeps pruned positions at zero; subclasses add the quantized form."""

    def __init__(self, mask: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("mask", mask, persistent=False)
        # Multiplying by a 0/1 float copy of the mask is ~10x faster than torch.where on CPU, forward and backward,
        # and just as exact for finite weights: pruned positions are ±0 and get a zero gradient.
        keep = None if mask is None else mask.float()
        self.register_buffer("keep", keep, persistent=False)

    def masked(self, weight: torch.Tensor) -> torch.Tensor:
        return weight if self.keep is None else weight * self.keep.to(weight.dtype)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.masked(latent)

    def inner_encoding(self, latent: torch.Tensor) -> Encoding:
        return dense_float(self.masked(latent))

    def refit(self, weight: torch.Tensor) -> Encoding:
        """The encoding, in this form, closest to a new float `weight` (e.g. after merging an adapter)."""
        return self.inner_encoding(weight)


class _FakeQuant(_Form):
    """Round-to-nearest on the same grid as the stored encoding; gradients pass straight through the rounding."""

    def __init__(self, mask: torch.Tensor | None, inner: Encoding) -> None:
        super().__init__(mask)
        meta = inner.meta
        self.grid = {"bits": meta["bits"], "granularity": meta["granularity"], "symmetric": meta["symmetric"],
                     "group_size": meta.get("group_size")}

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        weight = self.masked(latent)
        quantized = decode(self.inner_encoding(latent))
        return self.masked(weight + (quantized - weight).detach())

    @torch.no_grad()
    def inner_encoding(self, latent: torch.Tensor) -> Encoding:
        return quantize_rtn(self.masked(latent.detach()), **self.grid)


class _Codebook(_Form):
    """The weight is `codebook[row, index]`: the (float32) codebook is the trained tensor, indices are fixed."""

    def __init__(self, mask: torch.Tensor | None, inner: Encoding) -> None:
        super().__init__(mask)
        self.meta = inner.meta
        rows, columns = inner.meta["shape"]
        codebook = inner.tensors["codebook"].float()
        indices = unpack_bits(inner.tensors["indices"], inner.meta["bits"], rows * columns).long()
        self.granularity = inner.meta["granularity"]
        # One row per codebook (see kmeans.grouped), so that gather picks each weight's centroid in its own row.
        self.register_buffer("indices", grouped(indices.view(rows, columns), self.granularity), persistent=False)
        self.packed_indices = inner.tensors["indices"]
        self.initial = codebook

    def forward(self, codebook: torch.Tensor) -> torch.Tensor:
        return self.masked(ungrouped(codebook.gather(1, self.indices), self.meta["shape"], self.granularity))

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return self.initial.to(weight.device)

    @torch.no_grad()
    def inner_encoding(self, codebook: torch.Tensor) -> Encoding:
        tensors = {"indices": self.packed_indices, "codebook": codebook.detach().half()}
        return Encoding(KMEANS, tensors, self.meta)

    @torch.no_grad()
    def refit(self, weight: torch.Tensor) -> Encoding:
        """Indices kept; each centroid moves to the mean of the (unpruned) weights assigned to it, which is the
        least-squares codebook for that assignment. A centroid with no such weight keeps its value."""
        values = grouped(weight.detach().float(), self.granularity)
        keep = torch.ones_like(values) if self.mask is None else grouped(self.mask, self.granularity).float()
        sums = torch.zeros_like(self.initial).scatter_add_(1, self.indices, values * keep)
        counts = torch.zeros_like(self.initial).scatter_add_(1, self.indices, keep)
        return self.inner_encoding(torch.where(counts > 0, sums / counts.clamp(min=1), self.initial))


@dataclass
class Constrained:
    """The weights that train under a parametrization, and what was frozen because its format cannot train."""

    forms: dict[str, tuple[nn.Module, _Form]] = field(default_factory=dict)  # parameter name: (module, form)
    frozen: dict[str, str] = field(default_factory=dict)  # name: format


def constrain(state: ModelState, names: list[str]) -> Constrained:
    """Put every encoded parameter among `names` (e.g. "encoder.layer.0.output.dense.weight") under its form."""
    constrained = Constrained()
    for name in names:
        encoding = state.encodings.get(name)
        if encoding is None:
            continue
        form = form_for(encoding)
        module_name, _, attr = name.rpartition(".")
        module = state.model.get_submodule(module_name)
        if form is None:
            getattr(module, attr).requires_grad_(False)
            constrained.frozen[name] = _inner_format(encoding)
            continue
        parametrize.register_parametrization(module, attr, form.to(getattr(module, attr).device))
        constrained.forms[name] = (module, form)
    return constrained


def form_for(encoding: Encoding) -> _Form | None:
    """The trainable form of an encoding, or None when its format has none."""
    mask, inner = unwrap(encoding) if encoding.format == SPARSE_BITMASK else (None, encoding)
    if inner.format == DENSE_FLOAT:
        return _Form(mask)
    if inner.format in (INT8_RTN, PACKED_INT):
        return _FakeQuant(mask, inner)
    if inner.format == KMEANS:
        return _Codebook(mask, inner)
    return None


@torch.no_grad()
def release(state: ModelState, constrained: Constrained) -> None:
    """Remove the parametrizations; each weight becomes exactly the decoding of its new encoding."""
    for name, (module, form) in constrained.forms.items():
        attr = name.rpartition(".")[2]
        inner = _on_cpu(form.inner_encoding(getattr(module.parametrizations, attr).original))
        encoding = inner if form.mask is None else sparse_encoding(form.mask.cpu(), inner)
        parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
        weight = getattr(module, attr)
        weight.copy_(decode(encoding).to(weight.device, weight.dtype))
        state.encodings[name] = encoding


def reencode(encoding: Encoding, weight: torch.Tensor) -> Encoding | None:
    """`encoding`'s format refitted to a new float weight (pruned positions forced back to zero), or None when the
    format has no trainable form."""
    form = form_for(encoding)
    if form is None:
        return None
    form = form.cpu()  # its mask came from the encoding, which may live on the GPU; the refit happens on the CPU
    inner = _on_cpu(form.refit(weight.detach().cpu()))
    return inner if form.mask is None else sparse_encoding(form.mask, inner)


def _on_cpu(encoding: Encoding) -> Encoding:
    tensors = {key: tensor.cpu() for key, tensor in encoding.tensors.items()}
    return Encoding(encoding.format, tensors, encoding.meta)


def _inner_format(encoding: Encoding) -> str:
    return encoding.meta.get("inner_format", encoding.format) if encoding.format == SPARSE_BITMASK else encoding.format
