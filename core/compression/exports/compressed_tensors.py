"""Export a compressed artifact as a compressed-tensors folder, which transformers and vLLM load directly.

    compressed-tensors/
      config.json        the model config + `quantization_config` ({"quant_method": "compressed-tensors", "format",
                         "config_groups", "ignore", "sparsity_config", ...}), written by compressed-tensors itself
      model.safetensors  `<module>.weight_packed` / `weight_scale` / `weight_zero_point` / `weight_shape`
                         (pack-quantized), `<module>.weight` + `weight_scale` (fp8), plain tensors for the rest
      tokenizer files    copied from the artifact

Our own codes and scales are exported, not re-quantized: each quantized Linear gets a compressed-tensors scheme built
from its encoding with our scales (and zero points) as its quantization parameters, and compressed-tensors'
ModelCompressor writes the codes: rounding w / scale for a weight that is exactly code x scale gives the code back.
Before anything is written, every module is decompressed by the library's own decompressor and compared bit for bit
with our decoded weight.

    packed_int (rtn, gptq, mixed)  -> int weights, strategy tensor / channel / group: pack-quantized
    int8_rtn                       -> int 8-bit weights: pack-quantized (compressed-tensors' W8A16 layout)
    fp8_e4m3                       -> float 8-bit weights: naive-quantized (the library's choice for weight-only
                                      fp8; float-quantized is the same layout, named for W8A8)
    sparse_bitmask(inner)          -> inner's format; pruned positions hold the zero code, so they stay exactly 0
    dense_float, unencoded         -> plain weights

Sparsity is recorded, not compressed: `sparsity_config` = {"format": "dense", "sparsity_structure": "2:4" or
"unstructured", "global_sparsity", "targets"}. compressed-tensors 0.15 removed its sparse compressors
(sparse-bitmask, sparse-24-bitmask) and vLLM removed their kernels, so no current loader reads those layouts.
Embeddings and weights shared by several modules (a tied lm_head) are written as their decoded values and their
Linears listed in `ignore`: vLLM has no quantized embedding, and a packed tied weight breaks transformers' tying.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.compressors import BaseCompressor, ModelCompressor
from compressed_tensors.config import CompressionFormat, DenseSparsityConfig
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
)
from compressed_tensors.utils import get_direct_state_dict
from torch import nn
from transformers import CompressedTensorsConfig, PreTrainedModel

from core.compression.artifact import copy_tokenizer_files, load_compressed, read_manifest, stored_encodings
from core.compression.encoding import INT8_RTN, PACKED_INT
from core.compression.modelio import model_class_for, read_config
from core.compression.quant.fp8 import FP8_E4M3
from core.compression.sparsity.masks import DENSE_FLOAT, SPARSE_BITMASK, unpack_bits, unwrap
from core.compression.state import Encoding
from core.errors import UnsupportedModel

CT_FOLDER = "compressed-tensors"
CONFIG_FILE = "config.json"
STRATEGIES = {"per_tensor": "tensor", "per_channel": "channel", "per_group": "group"}


@dataclass
class CompressedTensorsExport:
    """What was written: the folder, its compressed-tensors `format`, how many Linears are quantized, the encoded
    weights written as plain values (name -> why), and the recorded `sparsity_config` (None without pruning)."""

    folder: Path
    format: str
    quantized_modules: int
    dense_weights: dict[str, str] = field(default_factory=dict)
    sparsity: dict[str, Any] | None = None


@dataclass
class _Plan:
    """One quantized Linear: its weight's scheme and our quantization parameters in compressed-tensors' terms."""

    weights: QuantizationArgs
    scale: torch.Tensor
    zero_point: torch.Tensor | None


def export_compressed_tensors(artifact: Path, out_dir: Path) -> CompressedTensorsExport:
    """Write the artifact folder `artifact` (from `save_compressed`) as a compressed-tensors folder `out_dir`.

    Raises UnsupportedModel for what compressed-tensors cannot hold (structural rewrites, k-means or entropy-coded
    weights, groups that do not divide a row) and RuntimeError if a written weight would decode differently.
    Example: `export_compressed_tensors(Path("job/model"), Path("job/model/compressed-tensors"))`, then
    `AutoModelForCausalLM.from_pretrained("job/model/compressed-tensors")`.
    """
    manifest = read_manifest(artifact)
    if manifest.rewrites:
        kinds = sorted({rewrite.kind for rewrite in manifest.rewrites})
        raise UnsupportedModel(f"compressed-tensors cannot describe structural rewrites {kinds}")
    encodings = stored_encodings(artifact)
    model = load_compressed(artifact)
    shared = set(manifest.aliases) | set(manifest.aliases.values())
    plans, dense = _plans(model, encodings, shared)
    sparsity = _sparsity(model, encodings)
    compressor = _compress(model, plans)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    fmt = _write_quantization_config(compressor, out_dir, sparsity)
    copy_tokenizer_files(artifact, out_dir)
    return CompressedTensorsExport(out_dir, fmt, len(plans), dense, sparsity)


def load_compressed_tensors(folder: Path) -> PreTrainedModel:
    """The exported folder loaded by transformers' own compressed-tensors support, in eval mode.

    Symmetric formats take transformers' default path (packed weights, decompressed by compressed-tensors on the
    first forward). Asymmetric ones are dequantized while loading (`CompressedTensorsConfig(dequantize=True)`):
    the default path cannot place packed zero points with compressed-tensors 0.20, and the dequantizing path is
    only right for a single scheme, which is why asymmetric exports have one (see `_quantization_config`).
    """
    config = read_config(folder)
    options = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if _asymmetric(config) else {}
    model = model_class_for(config).from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                                    use_safetensors=True, **options)
    return model.eval()


def _asymmetric(config: Any) -> bool:
    quantization = getattr(config, "quantization_config", None) or {}
    groups = quantization.get("config_groups") or {}
    return any(not (group.get("weights") or {}).get("symmetric", True) for group in groups.values())


def _plans(model: nn.Module, encodings: dict[str, Encoding],
           shared: set[str]) -> tuple[dict[str, _Plan], dict[str, str]]:
    """Quantization plans of the Linears that compressed-tensors stores packed, and the encoded weights written as
    plain values instead (name -> reason)."""
    modules = dict(model.named_modules())
    plans: dict[str, _Plan] = {}
    dense: dict[str, str] = {}
    for name, encoding in encodings.items():
        module_name, _, param = name.rpartition(".")
        module = modules.get(module_name)
        plan = _plan(name, encoding)
        if plan is None:
            continue
        if param != "weight" or not isinstance(module, nn.Linear):
            dense[name] = f"{type(module).__name__} weights are not quantized in compressed-tensors (vLLM)"
        elif name in shared:
            dense[name] = "shared by several modules (tied embeddings): written once as plain values"
        else:
            plans[module_name] = plan
    return plans, dense


def _plan(name: str, encoding: Encoding) -> _Plan | None:
    """compressed-tensors' scheme for one encoding, or None for a float one (pruned but not quantized)."""
    if encoding.format == SPARSE_BITMASK:
        _, encoding = unwrap(encoding)
    meta, tensors = encoding.meta, encoding.tensors
    if encoding.format == DENSE_FLOAT:
        return None
    if encoding.format == PACKED_INT:
        _check_groups(name, meta)
        zero_point = tensors.get("zero_point")
        if zero_point is not None:  # our codes are unsigned, compressed-tensors' signed: shift both by 2**(bits-1)
            zero_point = (zero_point.to(torch.int16) - 2 ** (meta["bits"] - 1)).to(torch.int8)
        return _Plan(_int_args(meta["bits"], meta), tensors["scale"].float(), zero_point)
    if encoding.format == INT8_RTN:
        return _Plan(_int_args(8, meta), tensors["scale"].float(), tensors.get("zero_point"))
    if encoding.format == FP8_E4M3:
        weights = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=STRATEGIES[meta["granularity"]])
        return _Plan(weights, tensors["scale"].float(), None)
    raise UnsupportedModel(f"{name}: weight format {encoding.format!r} has no compressed-tensors equivalent")


def _int_args(bits: int, meta: dict[str, Any]) -> QuantizationArgs:
    group_size = meta.get("group_size") if meta["granularity"] == "per_group" else None
    return QuantizationArgs(num_bits=bits, type="int", symmetric=meta["symmetric"],
                            strategy=STRATEGIES[meta["granularity"]], group_size=group_size)


def _check_groups(name: str, meta: dict[str, Any]) -> None:
    columns = meta["shape"][1]
    if meta["granularity"] == "per_group" and columns % meta["group_size"]:
        raise UnsupportedModel(
            f"{name}: group_size {meta['group_size']} does not divide its {columns} columns; compressed-tensors "
            "stores whole groups only (choose a group size that divides every quantized layer's input size)"
        )


def _compress(model: nn.Module, plans: dict[str, _Plan]) -> ModelCompressor | None:
    """Attach the schemes, set our parameters, let compressed-tensors pack the model in place, then check that
    every packed module decompresses to exactly the weight it had."""
    if not plans:
        return None
    apply_quantization_config(model, _quantization_config(model, plans), show_progress=False)
    modules = dict(model.named_modules())
    decoded = {}
    with torch.no_grad():
        for name, plan in plans.items():
            module = modules[name]
            module.weight_scale.copy_(plan.scale.reshape(module.weight_scale.shape))
            if plan.zero_point is not None:
                module.weight_zero_point.copy_(plan.zero_point.reshape(module.weight_zero_point.shape))
            decoded[name] = module.weight
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    compressor.remove_decompression_hook(model)
    for name in plans:
        _check_exact(name, modules[name], decoded[name])
    return compressor


def _check_exact(name: str, module: nn.Module, weight: torch.Tensor) -> None:
    scheme = module.quantization_scheme
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    restored = compressor.decompress(get_direct_state_dict(module), scheme)["weight"]
    if not torch.equal(restored.to(weight.dtype), weight):
        raise RuntimeError(f"{name}: compressed-tensors would decode a different weight than the artifact's")


def _quantization_config(model: nn.Module, plans: dict[str, _Plan]) -> QuantizationConfig:
    """One scheme per distinct weight quantization. With a single scheme the target is "Linear" and `ignore` lists
    the Linears left unquantized (llm-compressor's usual form); several schemes target module names."""
    by_args: dict[str, list[str]] = {}
    args: dict[str, QuantizationArgs] = {}
    for name, plan in plans.items():
        key = plan.weights.model_dump_json()
        by_args.setdefault(key, []).append(name)
        args[key] = plan.weights
    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    ignore = sorted(linears - set(plans))
    if len(by_args) == 1:
        [key] = by_args
        return QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args[key])},
                                  ignore=ignore)
    if any(not weights.symmetric for weights in args.values()):
        raise UnsupportedModel("compressed-tensors exports with several schemes must be symmetric: transformers "
                               "cannot load per-layer asymmetric schemes (quantize with symmetric: true)")
    groups = {f"group_{index}": QuantizationScheme(targets=sorted(names), weights=args[key])
              for index, (key, names) in enumerate(by_args.items())}
    return QuantizationConfig(config_groups=groups, ignore=ignore)


def _write_quantization_config(compressor: ModelCompressor | None, out_dir: Path,
                               sparsity: dict[str, Any] | None) -> str:
    """Let compressed-tensors write `quantization_config` (its `ignore` lists the Linears without a scheme), then
    record the sparsity; returns the format."""
    path = out_dir / CONFIG_FILE
    if compressor is not None:
        compressor.update_config(str(out_dir))
    config = json.loads(path.read_text(encoding="utf-8"))
    quantization = config.setdefault("quantization_config", {"quant_method": "compressed-tensors",
                                                             "format": CompressionFormat.dense.value})
    quantization["sparsity_config"] = sparsity or {}
    path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    return str(quantization["format"])


def _sparsity(model: nn.Module, encodings: dict[str, Encoding]) -> dict[str, Any] | None:
    """compressed-tensors' `sparsity_config` for the pruned weights (measured from their masks), or None."""
    masks = {name: unpack_bits(e.tensors["mask"], e.meta["shape"])
             for name, e in encodings.items() if e.format == SPARSE_BITMASK}
    if not masks:
        return None
    two_four = all(_is_two_four(mask) for mask in masks.values())
    params = list(model.parameters())
    zeros = sum(int((p == 0).sum()) for p in params)
    config = DenseSparsityConfig(
        targets=sorted(name.rpartition(".")[0] for name in masks),
        global_sparsity=zeros / sum(p.numel() for p in params),
        sparsity_structure="2:4" if two_four else "unstructured",
    )
    return config.model_dump(exclude={"registry_requires_subclass"})


def _is_two_four(mask: torch.Tensor) -> bool:
    """At most 2 kept of every 4 consecutive input weights (the only N:M structure compressed-tensors names)."""
    if mask.ndim != 2 or mask.shape[1] % 4:
        return False
    return bool((mask.view(mask.shape[0], -1, 4).sum(dim=-1) <= 2).all())
