"""Entropy-coding step configs: `{"type": "encode", "method": ...}`."""

from typing import Literal

from core.compression.configs.base import StepConfig


class EncodeHuffman(StepConfig):
    """Huffman-codes the integer tensors (quantization codes, k-means indices) of weights that earlier steps stored
    packed; the last stage of Deep Compression (prune → quantize → Huffman). Decoded on load, bit-exact.
    A tensor is only replaced when its coded form is smaller.

    Example: `{"type": "encode", "method": "huffman"}`
    """

    type: Literal["encode"] = "encode"
    method: Literal["huffman"] = "huffman"


# Every config of this family; the first one's method is the default.
CONFIGS = (EncodeHuffman,)
