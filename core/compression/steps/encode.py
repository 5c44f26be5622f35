"""Entropy-coding steps: Huffman coding of the packed integer tensors that earlier steps stored."""

from core.compression.configs.encode import EncodeHuffman
from core.compression.registry import register_step
from core.compression.select import is_selected
from core.compression.sparsity.huffman import HUFFMAN, huffman_encoding
from core.compression.state import ModelState, StepContext, StepReport, size_metrics
from core.errors import InvalidSpec, JobCancelled


@register_step(EncodeHuffman)
def encode_huffman_step(state: ModelState, config: EncodeHuffman, ctx: StepContext) -> StepReport:
    """Huffman-code the 8-bit integer tensors (codes, indices, sparse masks) of every selected packed weight, in
    place in `state.encodings`; the model's weights do not change. Decoding on load is bit-exact.

    Run it after the steps that pack weights (prune, quantize). Example: `{"type": "encode", "method": "huffman"}`.
    """
    names = [name for name in state.encodings if is_selected(name.removesuffix(".weight"), config)]
    if not names:
        raise InvalidSpec("encode: no packed weight to code; run it after a prune or quantize step",
                          details={"targets": config.targets, "exclude": config.exclude})
    before = after = coded = 0
    for index, name in enumerate(names):
        if ctx.should_stop():
            raise JobCancelled(f"cancelled while Huffman-coding, before {name}")
        encoding = state.encodings[name]
        before += encoding.nbytes()
        candidate = None if encoding.format == HUFFMAN else huffman_encoding(encoding)
        if candidate is not None and candidate.nbytes() < encoding.nbytes():
            state.encodings[name], coded = candidate, coded + 1
        after += state.encodings[name].nbytes()
        ctx.report((index + 1) / len(names), f"coded {name}")
    metrics = {"weights_coded": coded, "weights_packed": len(names), **size_metrics(before, after)}
    notes = [f"{coded} of {len(names)} packed weights Huffman-coded; decoding happens once, on load (no speed change)"]
    return StepReport(metrics=metrics, notes=notes)
