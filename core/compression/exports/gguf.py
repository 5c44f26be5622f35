"""Export a compressed Llama-family causal LM as a GGUF file, the format of llama.cpp, Ollama and LM Studio,
written with the `gguf` package (llama.cpp's own writer).

    model.gguf   `llama.*` hyperparameters, the tokenizer and chat template (`tokenizer.*`), and the weights

Our codes and scales are carried into the blocks of GGUF's types, never re-quantized from floats. A block is 32
consecutive input columns of one row with one float16 scale `d`, which is what our `packed_int` grid stores for
`granularity: per_group, group_size: 32`:

    bits 8, symmetric    -> Q8_0   q = code - 128 (int8)                 w = d * q
    bits 4, symmetric    -> Q4_0   q = code (our offset 8 is Q4_0's)      w = d * (q - 8)
    bits 4, asymmetric   -> Q4_1   q = code, m = -zero_point * d          w = d * q + m
    bits 5, symmetric    -> Q5_0   q = code (offset 16)                   w = d * (q - 16)
    bits 5, asymmetric   -> Q5_1   q = code, m = -zero_point * d          w = d * q + m
    sparse_bitmask(inner)   inner's type; pruned positions hold the grid's zero code, so they decode to exactly 0
    plain weights           F32 for norms and 1-D tensors (llama.cpp reads those as F32 only); otherwise F16, or
                            BF16, when every value is exact in it, else F32

Q4_1 and Q5_1 store `m` as a float16 too, and -zero_point * d is a float16 in only about half of our blocks (our zero
points are integers, d a float16: the product needs up to 4 more significant bits). A tensor with any block whose
`m` would be rounded is written instead as the symmetric type one bit wider, which holds code - zero_point exactly:
4-bit asymmetric as Q5_0 (5.5 bits per weight instead of 5.0), 5-bit asymmetric as Q8_0. The export says so.

llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel) permutes the rows of q_proj and k_proj so that each
rotary pair becomes adjacent; rows are output features and blocks run along the input dimension, so permuting rows
moves whole blocks and is exact. Tokenizers are carried as that converter carries them: GPT-2-style BPE
(`tokenizer.ggml.model` gpt2, with its pre-tokenizer named by the converter's hash of a probe text), Llama
sentencepiece-style BPE through `gguf.LlamaHfVocab`, special tokens, merges and the chat template through
`gguf.SpecialVocab`.

Before returning, every tensor is read back with `gguf.GGUFReader`, dequantized with `gguf.quants.dequantize`, and
compared bit for bit with our decoded weight (permuted as above).
"""

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from core.compression.artifact import load_compressed, read_manifest, stored_encodings
from core.compression.encoding import PACKED_INT
from core.compression.export_rules import GGUF_BLOCK, gguf_grid_refusal, model_export_refusal
from core.compression.modelio import load_tokenizer, read_config
from core.compression.quant.packing import unpack_bits
from core.compression.sparsity.masks import DENSE_FLOAT, SPARSE_BITMASK, unwrap
from core.compression.state import Encoding
from core.errors import UnsupportedModel

GGUF_FILE = "model.gguf"
# general.file_type: the type most of the weights are in.
FILE_TYPES = {
    QType.F32: gguf.LlamaFileType.ALL_F32, QType.F16: gguf.LlamaFileType.MOSTLY_F16,
    QType.BF16: gguf.LlamaFileType.MOSTLY_BF16, QType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    QType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, QType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    QType.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0, QType.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
}
# llama.cpp's converter names a GPT-2-style BPE pre-tokenizer by the sha256 of the token ids of its probe text
# (convert_hf_to_gguf.py, get_vocab_base_pre); these are its entries for Llama-family tokenizers.
PRE_TOKENIZER_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


@dataclass
class GGUFExport:
    """What was written: the file, how many tensors of each GGML type, the file type, the tokenizer model
    (`gpt2/<pre-tokenizer>`, `llama`, or `none`), and notes on anything a user should know."""

    path: Path
    tensor_types: dict[str, int]
    file_type: str
    tokenizer: str
    notes: list[str] = field(default_factory=list)


@dataclass
class _Tensor:
    """One GGUF tensor: its name, data (float array, or block bytes of `qtype`), the model parameter it holds and
    the row order it holds it in (None: as it is)."""

    name: str
    data: np.ndarray
    qtype: QType
    source: str
    rows: np.ndarray | None
    wider: bool = False  # asymmetric codes written one bit wider (Q5_0, Q8_0): a block minimum is not a float16


def export_gguf(artifact: Path, out_file: Path) -> GGUFExport:
    """Write the artifact folder `artifact` (from `save_compressed`) as the GGUF file `out_file` and check it.

    Raises UnsupportedModel for what GGUF's llama architecture or its types cannot hold (another architecture,
    structural rewrites, k-means or fp8 weights, other grids, rows not a multiple of 32) and RuntimeError if a
    written tensor would dequantize to anything but the artifact's weight.
    Example: `export_gguf(Path("job/model"), Path("job/model/model.gguf"))`, then `llama-cli -m model.gguf` or
    `load_gguf(Path("job/model/model.gguf"))`.
    """
    manifest = read_manifest(artifact)
    if manifest.rewrites:
        kinds = sorted({rewrite.kind for rewrite in manifest.rewrites})
        raise UnsupportedModel(f"GGUF's llama architecture cannot describe structural rewrites {kinds}")
    config = read_config(artifact)
    _check_architecture(config)
    weights = load_compressed(artifact).state_dict()
    encodings = stored_encodings(artifact)
    tensors = list(_tensors(weights, config, encodings, manifest.aliases))
    notes = _fallback_notes(tensors)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    file_type = _file_type(tensors, weights)
    _add_hyperparameters(writer, config, file_type, getattr(manifest, "job_id", None))
    tokenizer = _add_vocabulary(writer, artifact, config, notes)
    for tensor in tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.qtype)
    partial = out_file.with_name(out_file.name + ".partial")
    try:  # checked before it takes its name: a file that would not decode to the artifact is never left there
        _write(writer, partial)
        _check_exact(partial, tensors, weights)
        os.replace(partial, out_file)
    finally:
        partial.unlink(missing_ok=True)
    types = Counter(tensor.qtype.name for tensor in tensors)
    return GGUFExport(out_file, dict(sorted(types.items())), file_type.name, tokenizer, notes)


def load_gguf(path: Path) -> PreTrainedModel:
    """The GGUF file loaded by transformers' own GGUF loader (which dequantizes it to float32), in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 local_files_only=True, trust_remote_code=False)
    return model.eval()


def _check_architecture(config: Any) -> None:
    architectures = getattr(config, "architectures", None) or [config.model_type]
    for architecture in architectures:
        reason = model_export_refusal(["gguf"], architecture)
        if reason is not None or config.model_type != "llama":
            raise UnsupportedModel(reason or f"GGUF export writes model_type llama, not {config.model_type}")
    rope_type = _rope(config).get("rope_type", "default")
    if rope_type not in ("default", "linear"):
        raise UnsupportedModel(f"rope_type {rope_type!r} is not written to GGUF yet (default and linear are)")


def _rope(config: Any) -> dict[str, Any]:
    """rope_theta and scaling: transformers 5 keeps them in `rope_parameters`, 4.x in `rope_theta`/`rope_scaling`."""
    parameters = getattr(config, "rope_parameters", None)
    if parameters:
        return dict(parameters)
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.get("type", "default"))
    return {"rope_theta": getattr(config, "rope_theta", 10000.0), **scaling}


# --- tensors ----------------------------------------------------------------------------------------------------


def _tensors(weights: dict[str, torch.Tensor], config: Any, encodings: dict[str, Encoding],
             aliases: dict[str, str]) -> Iterator[_Tensor]:
    """The GGUF tensors of the model's float32 `weights` (its state_dict), in their order; a tied lm_head is left
    out (llama.cpp then uses token_embd for the output, as transformers' GGUF loader does)."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, weight in weights.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UnsupportedModel(f"{name} has no tensor in GGUF's llama architecture")
        encoding = encodings.get(aliases.get(name, name))
        rows = _row_order(name, weight.shape[0], config)
        if encoding is None or _is_float(encoding):
            data, qtype = _float_tensor(gguf_name, _values(weight, rows))
            yield _Tensor(gguf_name, data, qtype, name, rows)
            continue
        data, qtype = _quantized_tensor(name, encoding)
        wider = _grid_meta(encoding).get("symmetric") is False and qtype in (QType.Q5_0, QType.Q8_0)
        yield _Tensor(gguf_name, data if rows is None else data[rows], qtype, name, rows, wider)


def _row_order(name: str, rows: int, config: Any) -> np.ndarray | None:
    """The row order llama.cpp's converter gives a weight: q_proj and k_proj (weights and biases) permuted so that
    the two halves of each head's rotary dimensions interleave (LlamaModel.permute); None for every other tensor."""
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        heads = config.num_attention_heads
    elif name.endswith(("k_proj.weight", "k_proj.bias")):
        heads = config.num_key_value_heads or config.num_attention_heads
    else:
        return None
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)


def _values(weight: torch.Tensor, rows: np.ndarray | None) -> np.ndarray:
    """A float32 weight as numpy in GGUF's row order (a view of the model's memory when the order is unchanged)."""
    values = weight.detach().float().numpy()
    return values if rows is None else values[rows]


def _is_float(encoding: Encoding) -> bool:
    if encoding.format == SPARSE_BITMASK:
        return encoding.meta["inner_format"] == DENSE_FLOAT
    return encoding.format == DENSE_FLOAT


def _float_tensor(gguf_name: str, weight: np.ndarray) -> tuple[np.ndarray, QType]:
    """F32 for norms and 1-D tensors (llama.cpp reads them as F32 only, as its converter writes them); otherwise
    the narrowest of F16 and BF16 that holds every value exactly, else F32."""
    if weight.ndim <= 1 or gguf_name.endswith("_norm.weight"):
        return weight, QType.F32
    half = weight.astype(np.float16)
    if _same_bits(half.astype(np.float32), weight):
        return half, QType.F16
    bf16 = torch.from_numpy(weight).to(torch.bfloat16)
    if _same_bits(bf16.float().numpy(), weight):
        return bf16.view(torch.uint8).numpy(), QType.BF16
    return weight, QType.F32


def _quantized_tensor(name: str, encoding: Encoding) -> tuple[np.ndarray, QType]:
    """Block bytes (rows x blocks * bytes per block) of a `packed_int` weight, pruned positions on the zero code."""
    mask = None
    if encoding.format == SPARSE_BITMASK:
        mask, encoding = unwrap(encoding)
    if encoding.format != PACKED_INT:
        raise UnsupportedModel(f"{name}: weight format {encoding.format!r} has no GGUF type")
    meta = encoding.meta
    _check_grid(name, meta, encoding.tensors["scale"])
    rows, columns = meta["shape"]
    codes = unpack_bits(encoding.tensors["qweight"], meta["bits"], rows * columns).view(rows, columns).numpy()
    scale = encoding.tensors["scale"].numpy()
    zero_point = encoding.tensors.get("zero_point")
    zero = None if zero_point is None else zero_point.numpy()
    if mask is not None:
        zero_code = np.repeat(zero, GGUF_BLOCK, axis=1) if zero is not None else 2 ** (meta["bits"] - 1)
        codes = np.where(mask.numpy(), codes, zero_code).astype(np.uint8)
    return _blocks(codes.reshape(rows, -1, GGUF_BLOCK), scale, zero, meta["bits"])


def _check_grid(name: str, meta: dict[str, Any], scale: torch.Tensor) -> None:
    """What submission already refused (`gguf_grid_refusal`), checked again against the stored grid, plus what only
    the stored weight tells: its rows must be whole blocks and its scales float16."""
    reason = gguf_grid_refusal(meta["bits"], meta["granularity"], meta["group_size"], meta["symmetric"])
    if reason is not None:
        raise UnsupportedModel(f"{name}: {reason}")
    if meta["shape"][1] % GGUF_BLOCK:
        raise UnsupportedModel(f"{name}: {meta['shape'][1]} input columns are not whole blocks of {GGUF_BLOCK}")
    if scale.dtype != torch.float16:
        raise UnsupportedModel(f"{name}: GGUF block scales are float16, these are {scale.dtype}")


def _blocks(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int) -> tuple[np.ndarray, QType]:
    """Our unsigned codes (rows, blocks, 32), float16 scales (rows, blocks) and integer zero points as GGML blocks."""
    d = _half_bytes(scale)
    if zero is None:
        if bits == 8:
            return _rows(d, (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)), QType.Q8_0
        if bits == 4:
            return _rows(d, _low_nibbles(codes)), QType.Q4_0
        return _rows(d, _fifth_bits(codes), _low_nibbles(codes)), QType.Q5_0
    minimum = -zero.astype(np.float32) * scale.astype(np.float32)
    if _same_bits(minimum.astype(np.float16).astype(np.float32), minimum):
        m = _half_bytes(minimum.astype(np.float16))
        if bits == 4:
            return _rows(d, m, _low_nibbles(codes)), QType.Q4_1
        return _rows(d, m, _fifth_bits(codes), _low_nibbles(codes)), QType.Q5_1
    # Some block's minimum is not a float16: code - zero_point on the symmetric grid one bit wider holds it exactly.
    signed = codes.astype(np.int16) - zero[..., None]
    if bits == 4:
        wider = (signed + 16).astype(np.uint8)
        return _rows(d, _fifth_bits(wider), _low_nibbles(wider)), QType.Q5_0
    return _rows(d, signed.astype(np.int8).view(np.uint8)), QType.Q8_0


def _half_bytes(values: np.ndarray) -> np.ndarray:
    """(rows, blocks) float16 values as (rows, blocks, 2) little-endian bytes."""
    return np.ascontiguousarray(values.astype("<f2")).view(np.uint8).reshape(*values.shape, 2)


def _low_nibbles(codes: np.ndarray) -> np.ndarray:
    """Byte j of a block holds the low 4 bits of weight j (low nibble) and of weight j + 16 (high nibble)."""
    return (codes[..., :16] & 0x0F) | ((codes[..., 16:] & 0x0F) << 4)


def _fifth_bits(codes: np.ndarray) -> np.ndarray:
    """Q5's `qh`: bit i of a little-endian uint32 is bit 4 of weight i."""
    return np.packbits((codes >> 4) & 1, axis=-1, bitorder="little")


def _rows(*parts: np.ndarray) -> np.ndarray:
    """Block parts (rows, blocks, bytes) side by side, as (rows, blocks * bytes per block)."""
    blocks = np.concatenate(parts, axis=-1)
    return blocks.reshape(blocks.shape[0], -1)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def _fallback_notes(tensors: list[_Tensor]) -> list[str]:
    """A note when asymmetric codes went into the wider symmetric type."""
    wider = [tensor for tensor in tensors if tensor.wider]
    if not wider:
        return []
    types = ", ".join(f"{count} {qtype}" for qtype, count in sorted(Counter(t.qtype.name for t in wider).items()))
    return [f"asymmetric codes written one bit wider ({types}) instead of Q4_1/Q5_1: those store each block's "
            "minimum -zero_point * scale as a float16, which it is not in every block, while code - zero_point fits "
            "the symmetric type one bit wider exactly (symmetric: true gives Q4_0)"]


def _grid_meta(encoding: Encoding) -> dict[str, Any]:
    if encoding.format == SPARSE_BITMASK:
        return dict(encoding.meta["inner_meta"])
    return dict(encoding.meta)


def _file_type(tensors: list[_Tensor], weights: dict[str, torch.Tensor]) -> gguf.LlamaFileType:
    """general.file_type: the type holding the most weights of the 2-D tensors."""
    counts: Counter[QType] = Counter()
    for tensor in tensors:
        if weights[tensor.source].ndim == 2:
            counts[tensor.qtype] += weights[tensor.source].numel()
    return FILE_TYPES[counts.most_common(1)[0][0]] if counts else gguf.LlamaFileType.ALL_F32


# --- metadata and vocabulary -------------------------------------------------------------------------------------


def _add_hyperparameters(writer: gguf.GGUFWriter, config: Any, file_type: gguf.LlamaFileType,
                         name: str | None) -> None:
    """The keys llama.cpp's converter writes for a Llama (TextModel + LlamaModel.set_gguf_parameters); the job id
    as `general.name`."""
    if name:
        writer.add_name(str(name))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = _rope(config)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type(file_type)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_vocabulary(writer: gguf.GGUFWriter, folder: Path, config: Any, notes: list[str]) -> str:
    """The tokenizer as llama.cpp's converter writes a Llama's (LlamaModel.set_vocab): Llama sentencepiece-style
    BPE through gguf.LlamaHfVocab, else GPT-2-style BPE; then special tokens, merges and chat template."""
    tokenizer = load_tokenizer(folder, config)
    if tokenizer is None:
        writer.add_tokenizer_model("none")
        notes.append("the artifact has no tokenizer files, so the GGUF has no vocabulary (llama.cpp then takes "
                     "token ids only)")
        return "none"
    vocab_size = config.vocab_size
    kind = _add_llama_tokens(writer, folder, vocab_size, notes) or _add_gpt2_tokens(writer, tokenizer, vocab_size,
                                                                                    notes)
    special = gguf.SpecialVocab(folder, load_merges=kind.startswith("gpt2"), n_vocab=vocab_size)
    if special.chat_template is None and isinstance(getattr(tokenizer, "chat_template", None), str):
        special.chat_template = tokenizer.chat_template
    _add_special_flags(special, tokenizer)
    special.add_to_gguf(writer, quiet=True)
    _add_space_prefix(writer, folder)
    return kind


def _add_llama_tokens(writer: gguf.GGUFWriter, folder: Path, vocab_size: int, notes: list[str]) -> str | None:
    """A sentencepiece-style BPE tokenizer.json (byte fallback: Llama 2, TinyLlama) as the converter's
    `_set_vocab_llama_hf` writes it, unused ids up to the model's vocab_size padded as its sentencepiece path pads
    them (llama.cpp wants one token per embedding row); None for any other tokenizer."""
    try:
        vocab = gguf.LlamaHfVocab(folder)
    except (FileNotFoundError, TypeError, KeyError):
        return None
    tokens, scores, types = (list(column) for column in zip(*vocab.all_tokens(), strict=True))
    for index in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{index}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    if (folder / "tokenizer.model").is_file():
        notes.append("tokenizer.model (sentencepiece) was not read, so token scores are placeholders: llama.cpp's "
                     "converter reads it with the sentencepiece package, which this export does not use")
    return "llama"


def _add_gpt2_tokens(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, vocab_size: int,
                     notes: list[str]) -> str:
    """A GPT-2-style byte-level BPE as the converter's `_set_vocab_gpt2` writes it (get_vocab_base): one token per
    id up to the model's vocab_size, added tokens CONTROL (special) or USER_DEFINED, unused ids `[PAD<i>]`."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str()).get("model", {}) if backend is not None else {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UnsupportedModel(f"tokenizer model {model.get('type') or type(tokenizer).__name__} has no GGUF "
                               "vocabulary type here (llama.cpp reads byte-level BPE and sentencepiece-style BPE)")
    tokens, types = _gpt2_vocabulary(tokenizer, vocab_size)
    chkhsh = sha256(str(tokenizer.encode(PRE_TOKENIZER_TEXT)).encode()).hexdigest()
    pre = PRE_TOKENIZERS.get(chkhsh, "default")
    if pre == "default":
        notes.append(f"the BPE pre-tokenizer is not one llama.cpp's converter names (sha256 {chkhsh[:16]}...), so "
                     "tokenizer.ggml.pre is 'default': llama.cpp may split text differently than transformers")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    return f"gpt2/{pre}"


def _gpt2_vocabulary(tokenizer: PreTrainedTokenizerBase,
                     vocab_size: int) -> tuple[list[str], list[gguf.TokenType]]:
    reverse = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[gguf.TokenType] = []
    for index in range(vocab_size):
        token = reverse.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            if not added[index].normalized:  # llama.cpp expects added tokens pre-normalized
                token = str(tokenizer.decode(tokenizer.encode(token, add_special_tokens=False)))
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[index].special or _looks_special(token)
                         else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _looks_special(token: str) -> bool:
    """The converter's does_token_look_special, for the control tokens some tokenizers forget to mark."""
    return token in ("<pad>", "<mask>") or (token.startswith("<|") and token.endswith("|>"))


def _add_special_flags(special: gguf.SpecialVocab, tokenizer: PreTrainedTokenizerBase) -> None:
    """add_bos/add_eos where the tokenizer files do not state them: what the tokenizer actually does, so llama.cpp
    adds the same special tokens as transformers."""
    ids = tokenizer("a")["input_ids"]
    if "bos" not in special.add_special_token:
        special.add_special_token["bos"] = bool(ids) and ids[0] == tokenizer.bos_token_id
    if "eos" not in special.add_special_token:
        special.add_special_token["eos"] = len(ids) > 1 and ids[-1] == tokenizer.eos_token_id


def _add_space_prefix(writer: gguf.GGUFWriter, folder: Path) -> None:
    """tokenizer_config's add_prefix_space, as the converter carries it (LlamaModel.set_vocab)."""
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        prefix = json.loads(config_file.read_text(encoding="utf-8")).get("add_prefix_space")
        if isinstance(prefix, bool):
            writer.add_add_space_prefix(prefix)


# --- writing and checking -----------------------------------------------------------------------------------------


def _write(writer: gguf.GGUFWriter, path: Path) -> None:
    """Header, metadata and tensors."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer.write_header_to_file(path=path)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _check_exact(path: Path, tensors: list[_Tensor], weights: dict[str, torch.Tensor]) -> None:
    """Every tensor of the written file, dequantized by the gguf package, equals our decoded weight (in GGUF's row
    order) bit for bit."""
    reader = gguf.GGUFReader(path)
    written = {tensor.name: tensor for tensor in tensors}
    if sorted(written) != sorted(t.name for t in reader.tensors):
        raise RuntimeError("the GGUF file does not hold the tensors written")
    for stored in reader.tensors:
        tensor = written[stored.name]
        expected = _values(weights[tensor.source], tensor.rows)
        values = gguf.quants.dequantize(stored.data, stored.tensor_type).reshape(expected.shape)
        if not _same_bits(values.astype(np.float32, copy=False), expected):
            raise RuntimeError(f"{stored.name} ({stored.tensor_type.name}) would dequantize to other values than the "
                               "artifact's weight")
