"""Weight-only quantized Linear layers as ONNX Runtime's `com.microsoft.MatMulNBits`, carrying our codes exactly.

MatMulNBits computes `A @ dequant(B).T` with B of shape (N, K) stored as (N, blocks, block_size * bits / 8) bytes:
`block_size` consecutive input columns of one output row per block, codes packed least significant bits first
(two 4-bit codes per byte, low nibble first: our `pack_bits` order), one scale per block (the graph's float type,
float32 here) and optional unsigned zero points packed the same way per row, `ceil(blocks * bits / 8)` bytes each;
without them the zero point is 2**(bits-1), our symmetric grid's offset. Dequantized, `w = (code - zero) * scale`,
which is our `(code - zero_point) * scale` term for term: float16 scales widen to float32 exactly and every product
of an integer below 256 and a float16 is exact in float32, so each weight equals our decoded weight bit for bit.

    packed_int per_group, group_size 2**k >= 16     one block per group
    packed_int / int8_rtn per_channel or per_tensor   blocks of min(128, next power of 2 >= K), the row's scale
                                                      (and zero point) repeated in each block
    bits 2, 4, 8                                      as they are (the widths ORT's CPU kernel runs)
    bits 3, 5, 6, 7                                   the same codes on the next width (4 or 8) with explicit zero
                                                      points: code - zero_point is unchanged, so still exact
    sparse_bitmask(inner)                             inner's codes, pruned positions on the zero code (decode to 0):
                                                      the ONNX weight is dense
    anything else (floats, fp8, k-means, groups that are not a power of 2 >= 16)
                                                      stays a float32 MatMul, with the reason in `NBitsPlan.float`

A quantized nn.Embedding (4/8-bit: 2 and 3-bit codes go on 4) goes out as `com.microsoft.GatherBlockQuantized`
with the same bytes (data = B as (N, K * bits / 8), scales (N, blocks), zero points (N, bytes)) and the same formula;
its rows must be whole blocks.

The layout was checked against onnxruntime's own quantizer (`MatMulNBitsQuantizer`; tests/core/
test_export_onnx_nbits.py): its packed weights unpack with our convention to codes that, dequantized here, equal
what ORT's kernel computes.
"""

from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from core.compression.encoding import INT8_RTN, PACKED_INT
from core.compression.quant.packing import pack_bits, unpack_bits
from core.compression.sparsity.masks import SPARSE_BITMASK, unwrap
from core.compression.state import Encoding

ORT_BITS = (2, 4, 8)  # MatMulNBits' CPU kernel (onnxruntime 1.32: "Only 2b, 4b and 8b quantization is supported")
GATHER_BITS = (4, 8)  # GatherBlockQuantized's uint8 data
MIN_BLOCK, CHANNEL_BLOCK = 16, 128


@dataclass
class NBitsWeight:
    """One Linear weight (N outputs x K inputs) in MatMulNBits' inputs: packed codes (N, blocks, bytes per block),
    float32 scales (N * blocks) and packed zero points (N * bytes per row of zero points), or None for the default
    2**(bits-1). `source_bits` is the artifact's code width (narrower than `bits` when carried one width up)."""

    K: int
    N: int
    bits: int
    block_size: int
    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    source_bits: int
    sparse: bool = False

    @property
    def blocks(self) -> int:
        return -(-self.K // self.block_size)

    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + (0 if self.zero_points is None else self.zero_points.nbytes)


@dataclass
class NBitsPlan:
    """Which Linear modules go out as MatMulNBits (module name -> weight) and which encoded weights stay float32
    (parameter name -> reason)."""

    weights: dict[str, NBitsWeight] = field(default_factory=dict)
    float: dict[str, str] = field(default_factory=dict)
    embeddings: dict[str, NBitsWeight] = field(default_factory=dict)  # nn.Embedding -> GatherBlockQuantized

    def summary(self) -> dict[str, Any]:
        """What the job's metrics record: layers per (bits, block_size), widened and sparse layers, float ones."""
        kinds = Counter(f"{w.bits}-bit/block {w.block_size}" for w in self.weights.values())
        return {
            "matmul_nbits_layers": len(self.weights),
            "matmul_nbits": dict(sorted(kinds.items())),
            "gather_block_quantized": sorted(self.embeddings),
            "widened": sorted(name for name, w in self.weights.items() if w.bits != w.source_bits),
            "sparse_written_dense": sorted(name for name, w in self.weights.items() if w.sparse),
            "float_weights": dict(sorted(self.float.items())),
        }

    def notes(self) -> list[str]:
        notes = []
        widened = Counter(f"{w.source_bits}->{w.bits}" for w in self.weights.values() if w.bits != w.source_bits)
        if widened:
            notes.append("MatMulNBits runs 2, 4 and 8-bit codes only: " + ", ".join(
                f"{count} layers' {kind}-bit" for kind, count in sorted(widened.items())) + " carried on the next "
                "width with explicit zero points (exact, larger than the artifact)")
        sparse = [name for name, w in self.weights.items() if w.sparse]
        sparse_float = [name for name, reason in self.float.items() if reason.startswith("pruned")]
        if sparse or sparse_float:
            notes.append(f"sparse weights stay dense in ONNX ({len(sparse) + len(sparse_float)} pruned layers): "
                         "ONNX Runtime has no sparse MatMul kernel, so pruned positions are stored as zeros (zero "
                         "codes in MatMulNBits, 0.0 in float32) and save no space or time there")
        others = {reason for name, reason in self.float.items() if not reason.startswith("pruned")}
        if others:
            notes.append(f"{len(self.float) - len(sparse_float)} encoded weights stay float32 in ONNX: "
                         + "; ".join(sorted(others)))
        return notes


def plan_nbits(model: nn.Module, encodings: Mapping[str, Encoding], aliases: Mapping[str, str] | None = None
               ) -> NBitsPlan:
    """The MatMulNBits weights of `model`'s nn.Linear modules whose stored encoding (`stored_encodings` of the
    artifact; `aliases` maps tied parameter names to the stored one) is an integer grid ONNX Runtime can run."""
    aliases = aliases or {}
    plan = NBitsPlan()
    linears = {name: module for name, module in model.named_modules() if type(module) is nn.Linear}
    claimed = set()
    for module_name, module in model.named_modules():
        if type(module) is not nn.Embedding or module.max_norm is not None:
            continue
        stored = aliases.get(f"{module_name}.weight", f"{module_name}.weight")
        encoding = encodings.get(stored)
        if encoding is not None and _integer(encoding):
            gathered = nbits_weight(encoding, tuple(module.weight.shape), GATHER_BITS, whole_blocks=True)
            if isinstance(gathered, NBitsWeight):
                plan.embeddings[module_name] = gathered
                claimed.add(stored)
            else:
                plan.float[f"{module_name}.weight"] = f"embedding: {gathered}"
    for module_name, module in linears.items():
        name = f"{module_name}.weight"
        stored = aliases.get(name, name)
        encoding = encodings.get(stored)
        if encoding is None:
            continue
        claimed.add(stored)
        weight = nbits_weight(encoding, tuple(module.weight.shape))
        if isinstance(weight, str):
            plan.float[name] = weight
        else:
            plan.weights[module_name] = weight
    for stored, encoding in encodings.items():
        if stored not in claimed and _integer(encoding):
            plan.float.setdefault(stored, "not an nn.Linear or nn.Embedding weight (a float op in ONNX)")
    return plan


def nbits_weight(encoding: Encoding, shape: tuple[int, ...], widths: tuple[int, ...] = ORT_BITS,
                 whole_blocks: bool = False) -> NBitsWeight | str:
    """`encoding` (of a weight of `shape`) as MatMulNBits inputs (the same bytes are GatherBlockQuantized's with
    `widths` GATHER_BITS and rows of `whole_blocks`), or the reason it cannot be."""
    mask = None
    sparse = encoding.format == SPARSE_BITMASK
    if sparse:
        mask, encoding = unwrap(encoding)
    if encoding.format == PACKED_INT:
        codes, scale, zero, bits, width = _packed_int(encoding)
    elif encoding.format == INT8_RTN:
        codes, scale, zero, bits, width = _int8_rtn(encoding)
    else:
        kind = "pruned, float values" if sparse else f"format {encoding.format}"
        return f"{kind}: not integer codes MatMulNBits can carry"
    if len(shape) != 2 or tuple(codes.shape) != shape:
        return f"stored shape {tuple(codes.shape)} is not the Linear's {shape}"
    rows, columns = codes.shape
    if width is None:
        block = min(CHANNEL_BLOCK, max(MIN_BLOCK, 1 << (columns - 1).bit_length()))
        while whole_blocks and columns % block and block > MIN_BLOCK:
            block //= 2
    elif width < MIN_BLOCK or width & (width - 1):
        return (f"group_size {width}: MatMulNBits blocks are powers of 2 of at least {MIN_BLOCK} (use group_size "
                "32, 64 or 128)")
    else:
        block = width
    if whole_blocks and columns % block:
        return f"{columns} columns are not whole blocks of {block} (GatherBlockQuantized's rows are whole blocks)"
    if mask is not None:
        codes = np.where(mask.numpy(), codes, _per_column(zero, width, columns)).astype(np.uint8)
    target = next(b for b in widths if b >= bits)
    blocks = -(-columns // block)
    scales = _per_block(scale, width, block, blocks, rows).astype(np.float32)
    zeros = _per_block(zero, width, block, blocks, rows).astype(np.uint8)
    padded = np.concatenate([codes, np.repeat(zeros, block, axis=1)[:, columns:blocks * block]], axis=1)
    packed = pack_bits(torch.from_numpy(np.ascontiguousarray(padded)), target).numpy()
    default = bool(np.all(zeros == 2 ** (target - 1)))
    return NBitsWeight(K=columns, N=rows, bits=target, block_size=block,
                       packed=packed.reshape(rows, blocks, block * target // 8), scales=scales.reshape(-1),
                       zero_points=None if default else pack_zero_points(zeros, target), source_bits=bits,
                       sparse=sparse)


def pack_zero_points(zeros: np.ndarray, bits: int) -> np.ndarray:
    """(N, blocks) unsigned zero points as MatMulNBits packs them: each row's packed to whole bytes, rows back to
    back, (N * ceil(blocks * bits / 8),)."""
    per_row = -(-zeros.shape[1] * bits // 8)
    padded = np.full((zeros.shape[0], per_row * 8 // bits), 2 ** (bits - 1), dtype=np.uint8)  # ORT's padding
    padded[:, :zeros.shape[1]] = zeros
    return pack_bits(torch.from_numpy(padded), bits).numpy()


def unpack_nbits(packed: np.ndarray, zero_points: np.ndarray | None, bits: int, rows: int, blocks: int,
                 block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse: (codes (N, blocks * block_size), zero points (N, blocks)) of MatMulNBits' B and zero_points."""
    codes = unpack_bits(torch.from_numpy(np.ascontiguousarray(packed).reshape(-1)), bits, rows * blocks * block_size)
    if zero_points is None:
        zeros = np.full((rows, blocks), 2 ** (bits - 1), dtype=np.uint8)
    else:
        per_row = -(-blocks * bits // 8) * 8 // bits
        flat = unpack_bits(torch.from_numpy(np.ascontiguousarray(zero_points).reshape(-1)), bits, rows * per_row)
        zeros = flat.numpy().reshape(rows, per_row)[:, :blocks]
    return codes.numpy().reshape(rows, -1), zeros


def dequantize_nbits(weight: NBitsWeight) -> np.ndarray:
    """The float32 (N, K) weight MatMulNBits computes with, by the operator's formula (code - zero) * scale."""
    codes, zeros = unpack_nbits(weight.packed, weight.zero_points, weight.bits, weight.N, weight.blocks,
                                weight.block_size)
    scale = np.repeat(weight.scales.reshape(weight.N, -1), weight.block_size, axis=1)
    values = (codes.astype(np.float32) - np.repeat(zeros, weight.block_size, axis=1).astype(np.float32)) * scale
    return values[:, :weight.K]


def _integer(encoding: Encoding) -> bool:
    if encoding.format == SPARSE_BITMASK:
        return encoding.meta.get("inner_format") in (PACKED_INT, INT8_RTN)
    return encoding.format in (PACKED_INT, INT8_RTN)


def _packed_int(encoding: Encoding) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int | None]:
    """Unsigned codes (N, K), scales and zero points (rows or 1, groups), bits, group width (None: whole row)."""
    meta = encoding.meta
    rows, columns = meta["shape"]
    bits = meta["bits"]
    codes = unpack_bits(encoding.tensors["qweight"], bits, rows * columns).view(rows, columns).numpy()
    scale = encoding.tensors["scale"].float().numpy()
    zero_point = encoding.tensors.get("zero_point")
    zero = np.full(scale.shape, 2 ** (bits - 1), dtype=np.uint8) if zero_point is None else zero_point.numpy()
    width = meta["group_size"] if meta["granularity"] == "per_group" else None
    return codes, scale, zero.astype(np.uint8), bits, width


def _int8_rtn(encoding: Encoding) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int | None]:
    """int8_rtn's signed codes and zero points shifted by 128 (unsigned, as MatMulNBits reads them)."""
    codes = encoding.tensors["qweight"]
    if codes.ndim != 2:
        codes = codes.reshape(codes.shape[0], -1)
    scale = encoding.tensors["scale"].float().reshape(-1, 1).numpy()
    zero_point = encoding.tensors.get("zero_point")
    zero = (np.zeros(scale.shape, dtype=np.int16) if zero_point is None
            else zero_point.reshape(-1, 1).numpy().astype(np.int16))
    unsigned = (codes.numpy().astype(np.int16) + 128).astype(np.uint8)
    return unsigned, scale, (zero + 128).astype(np.uint8), 8, None


def _per_column(values: np.ndarray, width: int | None, columns: int) -> np.ndarray:
    """Per-row / per-tensor / per-group values (rows or 1, groups) repeated to one per column."""
    return np.repeat(values, width or columns, axis=1)[:, :columns]


def _per_block(values: np.ndarray, width: int | None, block: int, blocks: int, rows: int) -> np.ndarray:
    """Values per group (width == block) or per row (width None: repeated in each block), as (rows, blocks)."""
    values = np.broadcast_to(values, (rows, values.shape[1]))
    if width is None:
        return np.ascontiguousarray(np.repeat(values[:, :1], blocks, axis=1))
    return np.ascontiguousarray(values[:, :blocks])


# --- the torch side: a module whose export is one MatMulNBits node ------------------------------------------------


@torch.library.custom_op("mcs::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                 K: int, N: int, bits: int, block_size: int) -> torch.Tensor:
    """x @ W.T for W the MatMulNBits weight (eager: decoded here; in ONNX: com.microsoft.MatMulNBits)."""
    weight = NBitsWeight(K, N, bits, block_size, packed.numpy(), scales.numpy(),
                         None if zero_points is None else zero_points.numpy(), bits)
    return x @ torch.from_numpy(dequantize_nbits(weight)).to(x.dtype).T


@matmul_nbits.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
      K: int, N: int, bits: int, block_size: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], N))


class NBitsLinear(nn.Module):
    """A Linear whose weight is a MatMulNBits weight (buffers, exported as initializers) plus its float bias."""

    def __init__(self, weight: NBitsWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.spec = (weight.K, weight.N, weight.bits, weight.block_size)
        self.register_buffer("packed", torch.from_numpy(weight.packed))
        self.register_buffer("scales", torch.from_numpy(weight.scales))
        zero_points = None if weight.zero_points is None else torch.from_numpy(weight.zero_points)
        self.register_buffer("zero_points", zero_points)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mcs.matmul_nbits(x, self.packed, self.scales, self.zero_points, *self.spec)
        return y if self.bias is None else y + self.bias


@torch.library.custom_op("mcs::gather_nbits", mutates_args=())
def gather_nbits(indices: torch.Tensor, data: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                 bits: int, block_size: int) -> torch.Tensor:
    """Rows `indices` of the embedding in GatherBlockQuantized's inputs (eager: decoded here)."""
    rows, columns = data.shape[0], data.shape[1] * 8 // bits
    blocks = columns // block_size
    weight = NBitsWeight(columns, rows, bits, block_size, data.numpy().reshape(rows, blocks, -1), scales.numpy(),
                         None if zero_points is None else zero_points.numpy(), bits)
    return nn.functional.embedding(indices, torch.from_numpy(dequantize_nbits(weight)))


@gather_nbits.register_fake
def _(indices: torch.Tensor, data: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
      bits: int, block_size: int) -> torch.Tensor:
    return scales.new_empty((*indices.shape, data.shape[1] * 8 // bits))


class NBitsEmbedding(nn.Module):
    """An Embedding whose table is GatherBlockQuantized's: packed codes (rows, columns * bits / 8), float32 scales
    (rows, blocks) and packed zero points (rows, bytes), the same bytes as MatMulNBits' B."""

    def __init__(self, weight: NBitsWeight) -> None:
        super().__init__()
        self.spec = (weight.bits, weight.block_size)
        self.register_buffer("data", torch.from_numpy(weight.packed.reshape(weight.N, -1)))
        self.register_buffer("scales", torch.from_numpy(weight.scales.reshape(weight.N, -1)))
        zero_points = None if weight.zero_points is None else torch.from_numpy(weight.zero_points.reshape(weight.N, -1))
        self.register_buffer("zero_points", zero_points)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.ops.mcs.gather_nbits(indices, self.data, self.scales, self.zero_points, *self.spec)


@contextmanager
def nbits_linears(model: nn.Module, plan: NBitsPlan) -> Iterator[nn.Module]:
    """`model` with the planned Linear modules replaced by `NBitsLinear`, put back on exit."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for module_name, weight, linear in [*((n, w, True) for n, w in plan.weights.items()),
                                            *((n, w, False) for n, w in plan.embeddings.items())]:
            parent_name, _, child = module_name.rpartition(".")
            parent = model.get_submodule(parent_name)
            original = getattr(parent, child)
            replacement = NBitsLinear(weight, original.bias) if linear else NBitsEmbedding(weight)
            setattr(parent, child, replacement.eval())
            swapped.append((parent, child, original))
        yield model
    finally:
        for parent, child, original in reversed(swapped):
            setattr(parent, child, original)


def nbits_translations() -> dict[Any, Any]:
    """The ONNX translation of `mcs::matmul_nbits`: one com.microsoft MatMulNBits node."""
    from onnx.defs import OpSchema
    from onnxscript import values

    # onnx has no schema for ORT's contrib ops: the part of MatMulNBits' (ContribOperators.md) used here.
    parameter, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[parameter("A", "T1"), parameter("B", "T2"), parameter("scales", "T1"),
                parameter("zero_points", "T3", param_option=optional)],
        outputs=[parameter("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], ""), ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)"], "")],
        attributes=[OpSchema.Attribute(name, OpSchema.AttrType.INT, "") for name in ("K", "N", "bits", "block_size")],
    )
    matmul = values.Op(values.Opset("com.microsoft", 1), "MatMulNBits", schema)
    gather_schema = OpSchema(
        "GatherBlockQuantized", "com.microsoft", 1,
        inputs=[parameter("data", "T1"), parameter("indices", "Tind"), parameter("scales", "T2"),
                parameter("zero_points", "T1", param_option=optional)],
        outputs=[parameter("output", "T2")],
        type_constraints=[("T1", ["tensor(uint8)"], ""), ("T2", ["tensor(float)", "tensor(float16)"], ""),
                          ("Tind", ["tensor(int32)", "tensor(int64)"], "")],
        attributes=[OpSchema.Attribute(name, OpSchema.AttrType.INT, "")
                    for name in ("gather_axis", "quantize_axis", "block_size", "bits")],
    )
    gather = values.Op(values.Opset("com.microsoft", 1), "GatherBlockQuantized", gather_schema)

    def translate_gather(indices: Any, data: Any, scales: Any, zero_points: Any = None, bits: int = 4,
                         block_size: int = 32) -> Any:
        inputs = (data, indices, scales) if zero_points is None else (data, indices, scales, zero_points)
        return gather(*inputs, gather_axis=0, quantize_axis=1, block_size=block_size, bits=bits)

    def translate(x: Any, packed: Any, scales: Any, zero_points: Any = None, K: int = 0, N: int = 0, bits: int = 4,
                  block_size: int = 32) -> Any:
        inputs = (x, packed, scales) if zero_points is None else (x, packed, scales, zero_points)
        return matmul(*inputs, K=K, N=N, bits=bits, block_size=block_size)

    return {torch.ops.mcs.matmul_nbits.default: translate, torch.ops.mcs.gather_nbits.default: translate_gather}
