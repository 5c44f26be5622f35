"""Entropy-coding step configs: `{"type": "encode", "method": ...}`."""

from typing import Literal

from core.compression.configs.base import COMPRESSED_TENSORS, GGUF, ONNX, StepConfig, Traits


class EncodeHuffman(StepConfig):
    """Huffman-codes the integer tensors (quantization codes, k-means indices) of weights that earlier steps stored
    packed; the last stage of Deep Compression (prune → quantize → Huffman). Decoded on load, bit-exact.
    A tensor is only replaced when its coded form is smaller.

    Example: `{"type": "encode", "method": "huffman"}`
    """

    traits = Traits(
        changes_weights=False, trains=False, packs_weights=False, quantizes_activations=False, before_packing=None,
        after_weight_changes="entropy coding (encode) must come after every step that changes weights; move it to "
        "the end",
        exports={ONNX: None, COMPRESSED_TENSORS: "entropy-coded weights have no compressed-tensors format; drop the "
                 "encode step (the quantized codes are exported as they are)",
                 GGUF: "entropy-coded weights have no GGUF type; drop the encode step (the quantized codes are "
                 "exported as they are)"},
        streams_per_tensor=False, runs_by_block=False,
    )

    type: Literal["encode"] = "encode"
    method: Literal["huffman"] = "huffman"


# Every config of this family; the first one's method is the default.
CONFIGS = (EncodeHuffman,)
